"""HeartCodec-oss decode path in plain PyTorch (model-spec §7).

codes [8, T] at 12.5 Hz -> RVQ lookup -> conditioning at 25 Hz -> flow-matching DiT (10 Euler steps, CFG 1.25)
per 29.76 s window -> latents [744, 256] -> SQ-Codec decoder, one stream per stereo channel -> cross-faded
windows -> float32 [2, T*3840] at 48 kHz.

Parameter names are exactly the published state-dict names (§7.1). The SQ decoder's weight norm is folded by
the loader (heartcodec_checkpoint.py), so every conv here holds a plain `weight`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.model.meta_build import meta_modules
from gpu_worker.model.token_validation import validate_codes

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48000
SAMPLES_PER_FRAME = 3840  # one 12.5 Hz code frame
LATENTS_PER_FRAME = 2  # conditioning is upsampled x2 to 25 Hz
SAMPLES_PER_LATENT = SAMPLES_PER_FRAME // LATENTS_PER_FRAME  # total SQ decoder upsampling, 1920

WINDOW_FRAMES = 372  # 29.76 s
HOP_FRAMES = 320
OVERLAP_FRAMES = WINDOW_FRAMES - HOP_FRAMES  # 52
WINDOW_LATENTS = WINDOW_FRAMES * LATENTS_PER_FRAME  # 744
PREFIX_LATENTS = OVERLAP_FRAMES * LATENTS_PER_FRAME  # 104
WINDOW_SAMPLES = WINDOW_FRAMES * SAMPLES_PER_FRAME  # 1,428,480
HOP_SAMPLES = HOP_FRAMES * SAMPLES_PER_FRAME  # 1,228,800
OVERLAP_SAMPLES = OVERLAP_FRAMES * SAMPLES_PER_FRAME  # 199,680


@dataclass(frozen=True)
class WindowGeometry:
    """How a song's code frames are cut into codec windows (§7.6): the published 372 / 320 by default.

    A checkpoint's config may set `window_frames` / `hop_frames` (a songpipe extension, absent from the
    published config): the tests' tiny checkpoints use small windows so that a CPU song spans several.
    """

    window_frames: int = WINDOW_FRAMES
    hop_frames: int = HOP_FRAMES

    def __post_init__(self) -> None:
        if not 0 < self.hop_frames < self.window_frames:
            raise CodecConfigError("hop_frames", f"must be in 1..window_frames-1 = {self.window_frames - 1}, "
                                   f"got {self.hop_frames}")

    @property
    def overlap_frames(self) -> int:
        return self.window_frames - self.hop_frames

    @property
    def prefix_latents(self) -> int:
        return self.overlap_frames * LATENTS_PER_FRAME

    @property
    def window_samples(self) -> int:
        return self.window_frames * SAMPLES_PER_FRAME

    @property
    def hop_samples(self) -> int:
        return self.hop_frames * SAMPLES_PER_FRAME

    @property
    def overlap_samples(self) -> int:
        return self.overlap_frames * SAMPLES_PER_FRAME

    def window(self, w: int) -> slice:
        """The code frames of window w."""
        return slice(self.hop_frames * w, self.hop_frames * w + self.window_frames)

    def frames_needed(self, w: int) -> int:
        """Frames a song must have for window w to be decodable before the song ends."""
        return self.hop_frames * w + self.window_frames

    def final_samples_after(self, w: int) -> int:
        """Samples that no later window changes once window w (not the last) is cross-faded in."""
        return (w + 1) * self.hop_samples


PUBLISHED_WINDOWS = WindowGeometry()

NUM_STEPS = 10
GUIDANCE_SCALE = 1.25
TIMESTEP_CHANNELS = 512  # sinusoidal timestep features: 256 cos | 256 sin (fixed, not tied to `dim`)
ROPE_BASE = 10000.0
NORM_EPS = 1e-6
RESIDUAL_DILATIONS = (1, 3, 5, 7, 9)


# --------------------------------------------------------------------------------------------------------- config

class CodecConfigError(ValueError):
    """A codec config.json value this implementation does not support; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"codec config key {key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class HeartCodecConfig:
    """The keys of HeartCodec-oss `config.json`; defaults are the published values (§1.3)."""

    dim: int = 512
    codebook_size: int = 8192
    codebook_dim: int = 32
    num_quantizers: int = 8
    decay: float = 0.9  # decay .. threshold_ema_dead_code: training only
    commitment_weight: float = 1.0
    threshold_ema_dead_code: int = 2
    use_cosine_sim: bool = False
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    num_layers: int = 24
    num_layers_2: int = 6
    in_channels: int = 1024
    out_channels: int = 256
    norm_type: str = "ada_norm_single"
    num_bands: int = 1
    sample_rate: int = 48000
    causal: bool = True
    num_samples: int = 2
    downsample_factors: tuple[int, ...] = (3, 4, 4, 4, 5)
    downsample_kernel_sizes: tuple[int, ...] = (6, 8, 8, 8, 10)
    upsample_factors: tuple[int, ...] = (5, 4, 4, 4, 3)
    upsample_kernel_sizes: tuple[int, ...] = (10, 8, 8, 8, 6)
    latent_hidden_dim: int = 128
    default_kernel_size: int = 7
    delay_kernel_size: int = 5
    init_channel: int = 64
    res_kernel_size: int = 7
    window_frames: int = WINDOW_FRAMES  # songpipe extension keys (absent from the published config)
    hop_frames: int = HOP_FRAMES

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def published(cls) -> HeartCodecConfig:
        return cls()

    @classmethod
    def tiny(cls) -> HeartCodecConfig:
        """Test size (spec §10): same code path and window constants, small widths."""
        return cls(dim=32, codebook_dim=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                   num_layers_2=1, out_channels=16, in_channels=64, latent_hidden_dim=8, init_channel=4)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeartCodecConfig:
        """Parse config.json: missing keys take the published value (logged), unknown keys are ignored."""
        if data.get("model_type", "heartcodec") != "heartcodec":
            raise CodecConfigError("model_type", f"expected 'heartcodec', got {data['model_type']!r}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            default = f.default
            if f.name not in data:
                if f.name in EXTENSION_KEYS:
                    continue
                logger.warning("codec config: key %r missing, using the published value %r", f.name, default)
                continue
            values[f.name] = _coerce(f.name, data[f.name], default)
        known = {f.name for f in fields(cls)} | {"model_type"}
        for key in sorted(set(data) - known):
            logger.debug("codec config: ignoring key %r", key)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return {"model_type": "heartcodec", **data}

    def validate(self) -> None:
        positive = ("dim", "codebook_size", "codebook_dim", "num_quantizers", "attention_head_dim",
                    "num_attention_heads", "num_layers", "num_layers_2", "latent_hidden_dim", "init_channel",
                    "default_kernel_size", "delay_kernel_size", "res_kernel_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise CodecConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.use_cosine_sim:
            raise CodecConfigError("use_cosine_sim", "true is not supported (decoding assumes plain codebooks)")
        if self.norm_type != "ada_norm_single":
            raise CodecConfigError("norm_type", f"only 'ada_norm_single' is supported, got {self.norm_type!r}")
        if not self.causal:
            raise CodecConfigError("causal", "false is not supported (the SQ decoder is causal)")
        if self.num_bands != 1:
            raise CodecConfigError("num_bands", f"only 1 is supported, got {self.num_bands}")
        if self.num_samples != 2:
            raise CodecConfigError("num_samples", f"only 2 (stereo) is supported, got {self.num_samples}")
        if self.in_channels != 2 * self.out_channels + self.dim:
            raise CodecConfigError("in_channels", f"must equal 2*out_channels + dim = "
                                   f"{2 * self.out_channels + self.dim}, got {self.in_channels}")
        if self.out_channels != self.num_samples * self.latent_hidden_dim:
            raise CodecConfigError("out_channels", f"must equal 2*latent_hidden_dim = "
                                   f"{2 * self.latent_hidden_dim}, got {self.out_channels}")
        if len(self.downsample_factors) != len(self.downsample_kernel_sizes):
            raise CodecConfigError("downsample_kernel_sizes", f"{len(self.downsample_kernel_sizes)} entries but "
                                   f"downsample_factors has {len(self.downsample_factors)}")
        if len(self.upsample_factors) != len(self.upsample_kernel_sizes):
            raise CodecConfigError("upsample_kernel_sizes", f"{len(self.upsample_kernel_sizes)} entries but "
                                   f"upsample_factors has {len(self.upsample_factors)}")
        for factor, kernel in zip(self.upsample_factors, self.upsample_kernel_sizes):
            if kernel != 2 * factor:
                raise CodecConfigError("upsample_kernel_sizes", f"kernel {kernel} for factor {factor}; "
                                       "only kernel = 2*factor is supported")
        # The window constants assume 25 Hz latents -> 48 kHz (x960, then x2 in the PostProcessor).
        if math.prod(self.upsample_factors) * 2 != SAMPLES_PER_LATENT:
            raise CodecConfigError("upsample_factors", f"product must be {SAMPLES_PER_LATENT // 2}, got "
                                   f"{math.prod(self.upsample_factors)} for {list(self.upsample_factors)}")
        if self.sample_rate != SAMPLE_RATE:
            raise CodecConfigError("sample_rate", f"only {SAMPLE_RATE} is supported, got {self.sample_rate}")
        if self.window_frames < 2:
            raise CodecConfigError("window_frames", f"must be >= 2, got {self.window_frames}")
        self.windows  # noqa: B018 - validates hop_frames against window_frames

    @property
    def windows(self) -> WindowGeometry:
        return WindowGeometry(self.window_frames, self.hop_frames)

    @property
    def inner_dim(self) -> int:
        """Width of the first transformer stack (24 x 64 = 1536)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def inner_dim_2(self) -> int:
        """Width of the second stack: same head count, twice the head dim (3072)."""
        return 2 * self.inner_dim

    @property
    def sq_channels(self) -> list[int]:
        """SQ decoder widths: layer 0 output, then each upsampling block's output (2048 ... 64)."""
        n = len(self.upsample_factors)
        return [self.init_channel * 2 ** (n - i) for i in range(n + 1)]


EXTENSION_KEYS = frozenset({"window_frames", "hop_frames"})  # silently defaulted: published configs lack them


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise CodecConfigError(key, f"expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecConfigError(key, f"expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CodecConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise CodecConfigError(key, f"expected a string, got {value!r}")
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CodecConfigError(key, f"expected a list of integers, got {value!r}")
    return tuple(value)


# ------------------------------------------------------------------------------------------------------ estimator

def swiglu_hidden_dim(dim: int) -> int:
    """256 * ceil(int(8D/3) / 256): 4096 for D = 1536, 8192 for D = 3072."""
    return 256 * math.ceil(int(8 * dim / 3) / 256)


def rope_cos_sin(seq_len: int, head_dim: int, *, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, hd/2] for positions 0..S-1, base 10000, no scaling; fp32 tables (fp64 for fp64 models)."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=table_dtype) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=table_dtype), inv_freq)
    return angles.cos(), angles.sin()


RopeTables = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (cos, sin) per stack


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [B, S, H, hd] in the table dtype, then cast back."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), in the activation dtype (the reference does not upcast)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    """Bidirectional multi-head attention with interleaved RoPE on q and k; no biases, no mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq, dim = x.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).view(shape), *rope)
        k = apply_rope(self.k_proj(x).view(shape), *rope)
        v = self.v_proj(x).view(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Pre-norm DiT block with adaLN-single modulation (shift, scale, gate for attention and MLP)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = FeedForward(dim, swiglu_hidden_dim(dim))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # mod [B, 6, D] from the stack's adaln_single; each chunk [B, 1, D] broadcasts over time
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (self.scale_shift_table[None] + mod).chunk(6, dim=1)
        x = x + gate_a * self.attn(self.attn_norm(x) * (1 + scale_a) + shift_a, rope)
        x = x + gate_m * self.mlp(self.mlp_norm(x) * (1 + scale_m) + shift_m)
        return x


class ProjectLayer(nn.Module):
    """Conv1d over time (k 3, zero padding 1) scaled by 1/sqrt(3), then a Linear; x is [B, S, C]."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.ffn_1 = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        self.ffn_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn_1(x.transpose(1, 2)).transpose(1, 2) * self.kernel_size ** -0.5
        return self.ffn_2(h)


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """[cos(a) | sin(a)] with a = t * exp(-ln(10000) j / 256) * 1000, j = 0..255; fp32, cos first."""
    half = TIMESTEP_CHANNELS // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :] * 1000.0
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class AdaLNSingle(nn.Module):
    """One timestep embedding per stack: `emb` [B, D] and the six block modulations `mod` [B, 6, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(dim)})
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb["timestep_embedder"](timestep_features(t).to(dtype))
        mod = self.linear(F.silu(emb)).unflatten(-1, (6, -1))
        return mod, emb


class Estimator(nn.Module):
    """Velocity field v(x, t): two DiT stacks (D, then 2D) joined by connection_proj (§7.4)."""

    def __init__(self, config: HeartCodecConfig):
        super().__init__()
        dim, dim_2, heads = config.inner_dim, config.inner_dim_2, config.num_attention_heads
        self.proj_in = ProjectLayer(config.in_channels, dim)
        self.adaln_single = AdaLNSingle(dim)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.connection_proj = ProjectLayer(config.in_channels + dim, dim_2)
        self.adaln_single_2 = AdaLNSingle(dim_2)
        self.transformer_blocks_2 = nn.ModuleList(TransformerBlock(dim_2, heads) for _ in range(config.num_layers_2))
        self.scale_shift_table_2 = nn.Parameter(torch.zeros(2, dim_2))
        self.proj_out = ProjectLayer(dim_2, config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        """x [B, S, in_channels], t [B] (fp32) -> velocity [B, S, out_channels].

        `rope`: the two stacks' tables from `rope_tables` (the fast codec computes them once); None builds
        them here, the same values.
        """
        rope_1, rope_2 = (None, None) if rope is None else rope
        s = self._stack(self.proj_in(x), t, self.adaln_single, self.transformer_blocks, self.scale_shift_table,
                        rope_1)
        x2 = self.connection_proj(torch.cat([x, s], dim=-1))
        x2 = self._stack(x2, t, self.adaln_single_2, self.transformer_blocks_2, self.scale_shift_table_2, rope_2)
        return self.proj_out(x2)

    def rope_tables(self, seq_len: int, *, device: torch.device, dtype: torch.dtype) -> RopeTables:
        """Both stacks' RoPE cos/sin for `seq_len` positions and activations of `dtype`, as `forward` builds them."""
        return (rope_cos_sin(seq_len, _head_dim(self.transformer_blocks), device=device, dtype=dtype),
                rope_cos_sin(seq_len, _head_dim(self.transformer_blocks_2), device=device, dtype=dtype))

    @staticmethod
    def _stack(s: torch.Tensor, t: torch.Tensor, adaln: AdaLNSingle, blocks: nn.ModuleList,
               table: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        mod, emb = adaln(t, s.dtype)
        if rope is None:
            rope = rope_cos_sin(s.shape[1], _head_dim(blocks), device=s.device, dtype=s.dtype)
        for block in blocks:
            s = block(s, mod, rope)
        shift, scale = (table[None] + emb[:, None]).chunk(2, dim=1)
        return F.layer_norm(s, (s.shape[-1],), eps=NORM_EPS) * (1 + scale) + shift


def _head_dim(blocks: nn.ModuleList) -> int:
    first = blocks[0]
    assert isinstance(first, TransformerBlock)
    return first.attn.head_dim


# ------------------------------------------------------------------------------------------ RVQ + flow matching

class Codebook(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, codebook_size, codebook_dim))  # published shape keeps dim 0


class VQLayer(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self._codebook = Codebook(codebook_size, codebook_dim)


class ResidualVQ(nn.Module):
    """Decode-only residual VQ: sum of per-codebook rows, then project_out (§7.2)."""

    def __init__(self, config: HeartCodecConfig):
        super().__init__()
        self.layers = nn.ModuleList(VQLayer(config.codebook_size, config.codebook_dim)
                                    for _ in range(config.num_quantizers))
        self.project_out = nn.Linear(config.codebook_dim, config.dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [Q, T] (validated, long) -> features [T, dim]; plain indexing of each codebook table."""
        summed = self._table(0)[codes[0]]
        for q in range(1, len(self.layers)):
            summed = summed + self._table(q)[codes[q]]
        return self.project_out(summed)

    def _table(self, q: int) -> torch.Tensor:
        layer = self.layers[q]
        assert isinstance(layer, VQLayer)
        return layer._codebook.embed[0]


class FlowMatching(nn.Module):
    def __init__(self, config: HeartCodecConfig):
        super().__init__()
        self.vq_embed = ResidualVQ(config)
        self.cond_feature_emb = nn.Linear(config.dim, config.dim)
        self.zero_cond_embedding1 = nn.Parameter(torch.zeros(config.dim))  # published, unused at inference
        self.estimator = Estimator(config)

    def conditioning(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [Q, F] -> mu [2F, dim]: each code frame feeds two 25 Hz latent frames."""
        features = self.cond_feature_emb(self.vq_embed.lookup(codes))
        return features.repeat_interleave(LATENTS_PER_FRAME, dim=0)

    def solve(self, mu: torch.Tensor, prefix: torch.Tensor | None, generator: torch.Generator,
              estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Euler solve of one window (§7.3): mu [S, dim], prefix [n, C] or None -> latents [S, C].

        `estimate` replaces the estimator call (the fast codec runs it in bf16 / as a CUDA graph);
        the draws and the fp32 Euler update stay the same.
        """
        estimate = estimate or self.estimator
        seq, channels = mu.shape[0], self.estimator.proj_out.ffn_2.out_features
        z = torch.randn((1, seq, channels), generator=generator, device=mu.device, dtype=mu.dtype)[0]
        n = 0 if prefix is None else prefix.shape[0]
        in_context = torch.zeros_like(z)
        if n:
            assert prefix is not None
            in_context[:n] = prefix
        # Conditional row 1 sees mu, unconditional row 0 sees zeros (not zero_cond_embedding1).
        cond = torch.stack([torch.zeros_like(mu), mu])
        x = z.clone()
        # Timesteps accumulate in fp32 exactly like the reference (t += dt; dt = t_span[k+1] - t); host floats
        # are exact copies of those fp32 values, so no device sync is needed.
        t_span = torch.linspace(0, 1, NUM_STEPS + 1, dtype=torch.float32)
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, NUM_STEPS + 1):
            if n:
                assert prefix is not None
                x[:n] = float(1 - (1 - 1e-6) * t) * z[:n] + float(t) * prefix
            inputs = torch.cat([x.expand(2, -1, -1), in_context.expand(2, -1, -1), cond], dim=-1)
            timestep = torch.full((2,), float(t), device=mu.device, dtype=torch.float32)
            v_uncond, v_cond = estimate(inputs, timestep).unbind(0)
            x = x + float(dt) * (v_uncond + GUIDANCE_SCALE * (v_cond - v_uncond))
            t = t + dt
            if step < NUM_STEPS:
                dt = t_span[step + 1] - t
        if n:
            assert prefix is not None
            x[:n] = prefix
        return x


# ----------------------------------------------------------------------------------------------- SQ-Codec decoder

class SQConv1d(nn.Conv1d):
    """Conv1d with causal (left-only, dilation*(k-1)) or centred zero padding.

    `weight_norm` marks layers stored on disk as (g, v) pairs; the loader folds them into `weight`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1,
                 causal: bool = True, weight_norm: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        total = dilation * (kernel_size - 1)
        self.pad = (total, 0) if causal else (total // 2, total - total // 2)
        self.weight_norm = weight_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class WNConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d stored with weight norm; g is per *input* channel (dim 0 of [Cin, Cout, k])."""

    weight_norm = True


class CausalUpsample(nn.Module):
    """ConvTranspose1d (kernel 2s, stride s) whose last s samples are dropped: T -> T*s."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int):
        super().__init__()
        self.stride = stride
        self.layer = WNConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[..., :-self.stride]


class ResidualUnit(nn.Module):
    """x + PReLU_2(conv2_k1(PReLU_1(causal dilated conv1(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv1 = SQConv1d(channels, channels, kernel_size, dilation=dilation)
        self.activation1 = nn.PReLU(init=0.25)
        self.conv2 = SQConv1d(channels, channels, 1)
        self.activation2 = nn.PReLU(init=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.activation2(self.conv2(self.activation1(self.conv1(x))))


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int, res_kernel_size: int):
        super().__init__()
        self.up_conv = CausalUpsample(in_channels, out_channels, stride, kernel_size)
        self.convs = nn.ModuleList(ResidualUnit(out_channels, res_kernel_size, d) for d in RESIDUAL_DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(x)  # no activation after the upsampling conv
        for unit in self.convs:
            x = unit(x)
        return x


class PostProcessor(nn.Module):
    """Repeat every time step twice, causal conv (plain weights), PReLU."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = SQConv1d(channels, channels, kernel_size, weight_norm=False)
        self.activation = nn.PReLU(init=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x.repeat_interleave(2, dim=-1)))


class ScalarModel(nn.Module):
    """SQ-Codec, decoder only (§7.5): latents -> one waveform per stereo channel."""

    def __init__(self, config: HeartCodecConfig):
        super().__init__()
        self.num_samples = config.num_samples
        self.latent_hidden_dim = config.latent_hidden_dim
        widths = config.sq_channels
        layers: list[nn.Module] = [SQConv1d(config.latent_hidden_dim, widths[0], config.delay_kernel_size,
                                            causal=False)]  # two frames of look-ahead
        for b, (stride, kernel) in enumerate(zip(config.upsample_factors, config.upsample_kernel_sizes)):
            layers.append(DecoderBlock(widths[b], widths[b + 1], stride, kernel, config.res_kernel_size))
        layers.append(PostProcessor(widths[-1], config.default_kernel_size))
        layers.append(SQConv1d(widths[-1], 1, config.default_kernel_size))
        self.decoder = nn.Sequential(*layers)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [S, 256] -> audio [2, S*1920]; stream 0 = channels 0..127 (left), stream 1 = 128..255."""
        return self.decode_batch(latents[None])[0]

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, S, 256] (N windows) -> audio [N, 2, S*1920]: one pass, the 2N streams as batch rows.

        Every conv treats batch rows independently, so row (w, c) is window w's stream c decoded alone.
        """
        windows, seq = latents.shape[0], latents.shape[1]
        x = latents.transpose(1, 2).reshape(windows * self.num_samples, self.latent_hidden_dim, seq)
        x = torch.round(x * 9) / 9  # scalar quantisation grid of the SQ codec
        return self.decoder(x).squeeze(1).unflatten(0, (windows, self.num_samples))


# -------------------------------------------------------------------------------------------- windows and codec

@dataclass(frozen=True)
class WindowPlan:
    """How T code frames are covered by windows (372 frames with a 320-frame hop, published; §7.6)."""

    frames: int  # T
    padded_frames: int  # P: codes wrap around to fill the last window
    num_windows: int  # W
    geometry: WindowGeometry = PUBLISHED_WINDOWS

    def window(self, w: int) -> slice:
        return self.geometry.window(w)

    @property
    def output_samples(self) -> int:
        """Samples before the crop: (W-1) hops plus one window, = P * 3840."""
        return (self.num_windows - 1) * self.geometry.hop_samples + self.geometry.window_samples

    @property
    def cropped_samples(self) -> int:
        return self.frames * SAMPLES_PER_FRAME


def plan_windows(num_frames: int, geometry: WindowGeometry = PUBLISHED_WINDOWS) -> WindowPlan:
    if num_frames < 1:
        raise ValueError(f"need at least one code frame, got {num_frames}")
    g = geometry
    if num_frames <= g.window_frames:
        padded = g.window_frames
    else:
        padded = math.ceil((num_frames - g.overlap_frames) / g.hop_frames) * g.hop_frames + g.overlap_frames
    return WindowPlan(num_frames, padded, (padded - g.overlap_frames) // g.hop_frames, g)


def overlap_add(out: torch.Tensor, audio: torch.Tensor, w: int, geometry: WindowGeometry = PUBLISHED_WINDOWS) -> None:
    """Write window w's audio [2, window samples] into out, cross-fading linearly over the overlap.

    The ramp is linspace(0, 1) with inclusive ends in float64, as in the reference.
    """
    g = geometry
    start = w * g.hop_samples
    if w == 0:
        out[:, :g.window_samples] = audio
        return
    ramp = torch.linspace(0, 1, g.overlap_samples, dtype=torch.float64, device=out.device)
    faded = out[:, start:start + g.overlap_samples].double() * (1 - ramp) + audio[:, :g.overlap_samples].double() * ramp
    out[:, start:start + g.overlap_samples] = faded.to(out.dtype)
    out[:, start + g.overlap_samples:start + g.window_samples] = audio[:, g.overlap_samples:]


class WindowByWindow:
    """A song decoded one window at a time, in order, as its frames become available (docs/streaming.md).

    Window w > 0 takes window w-1's last latents as its in-context prefix, so windows go strictly in
    order; each draws its noise from `generator` in that order. After `add(w)` the samples before
    window w+1's cross-fade are final (`final_samples`); `finish(T)` adds nothing and crops to T frames.
    `HeartCodec.decode` runs through this class, so a song decoded while it streams and one decoded
    from its finished tokens are the same samples.
    """

    def __init__(self, geometry: WindowGeometry, generator: torch.Generator, capacity_frames: int, *,
                 device: torch.device, solve_window: Callable[..., torch.Tensor],
                 decode_latents: Callable[[torch.Tensor], torch.Tensor]):
        self.geometry, self.generator = geometry, generator
        self.solve_window, self.decode_latents = solve_window, decode_latents
        capacity = plan_windows(max(capacity_frames, 1), geometry).output_samples
        self.out = torch.empty(2, capacity, dtype=torch.float32, device=device)
        self.windows = 0  # windows added so far
        self.final_samples = 0
        self._latents: torch.Tensor | None = None

    def add(self, codes: torch.Tensor, *, last: bool = False) -> None:
        """Solve and decode the next window: codes [Q, window_frames] (long, on the codec's device)."""
        g, w = self.geometry, self.windows
        if (w + 1) * g.hop_samples + g.overlap_samples > self.out.shape[1]:
            raise ValueError(f"window {w} is past the {self.out.shape[1]} samples planned for this song")
        prefix = None if self._latents is None else self._latents[-g.prefix_latents:]
        self._latents = self.solve_window(codes, prefix, self.generator)
        audio = self.decode_latents(torch.stack([self._latents]))
        overlap_add(self.out, audio[0].float(), w, g)
        del audio
        self.windows = w + 1
        self.final_samples = w * g.hop_samples + g.window_samples if last else g.final_samples_after(w)

    def samples(self, start: int, end: int) -> torch.Tensor:
        """Final samples [start, end) as float32 [2, n] on the CPU."""
        if end > self.final_samples:
            raise ValueError(f"samples up to {end} requested, only {self.final_samples} are final")
        return self.out[:, start:end].cpu()


class HeartCodec(nn.Module):
    def __init__(self, config: HeartCodecConfig):
        super().__init__()
        self.config = config
        self.flow_matching = FlowMatching(config)
        self.scalar_model = ScalarModel(config)

    @property
    def device(self) -> torch.device:
        return self.flow_matching.cond_feature_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flow_matching.cond_feature_emb.weight.dtype

    def weight_norm_layers(self) -> list[str]:
        """Module names whose `weight` is stored on disk as a weight-norm (g, v) pair."""
        return [name for name, module in self.named_modules() if getattr(module, "weight_norm", False)]

    def solve_window(self, codes: torch.Tensor, prefix: torch.Tensor | None,
                     generator: torch.Generator) -> torch.Tensor:
        """One window's flow-matching solve: codes [Q, 372] (long, on device) -> latents [744, C]."""
        return self.flow_matching.solve(self.flow_matching.conditioning(codes), prefix, generator)

    def decode_window(self, codes: torch.Tensor, prefix: torch.Tensor | None,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One window: codes [Q, 372] (long, on device) -> (latents [744, C], audio [2, WINDOW_SAMPLES])."""
        latents = self.solve_window(codes, prefix, generator)
        return latents, self.scalar_model.decode(latents)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, *, generator: torch.Generator,
               progress: Callable[[int, int], None] | None = None,
               solve_window: Callable[..., torch.Tensor] | None = None,
               decode_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
               sq_batch_windows: int = 1) -> torch.Tensor:
        """codes [8, T] (any integer dtype, any device) -> float32 [2, T*3840] on the CPU, 48 kHz.

        Validation runs on the host before anything reaches the lookup. `generator` lives on the codec's
        device and gives one randn [1, 744, 256] per window, in window order.

        The windows are solved one after another (each takes the previous window's last 104 latents as its
        prefix); `progress(w, W)` is called as window w is solved. The SQ decoder then runs over up to
        `sq_batch_windows` solved windows at once (`decode_latents`: latents [N, 744, C] -> audio
        [N, 2, WINDOW_SAMPLES]), and their audio is cross-faded in window order. 1 (the default) decodes
        each window right after its solve, the least memory (by estimate, a window's SQ decoder peaks at
        ~2.6 GB of activations in fp32 at the published size, most of it in the post-processor).
        The `solve_window` and `decode_latents` arguments stand in for `self.solve_window` and
        `self.scalar_model.decode_batch` (the fast codec: its estimator, its SQ dtype); windows, prefixes,
        draws and cross-fades stay here.
        """
        solve_window = solve_window or self.solve_window
        decode_latents = decode_latents or self.scalar_model.decode_batch
        if sq_batch_windows < 1:
            raise ValueError(f"sq_batch_windows must be >= 1, got {sq_batch_windows}")
        validate_codes(codes, codebook_size=self.config.codebook_size, num_quantizers=self.config.num_quantizers)
        device = self.device
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device}, the codec on {device}; "
                             "pass a generator created on the codec's device")
        geometry = self.config.windows
        plan = plan_windows(codes.shape[1], geometry)
        wrapped = torch.arange(plan.padded_frames) % plan.frames
        padded = codes.detach().to("cpu", torch.long)[:, wrapped].to(device)
        if sq_batch_windows == 1:
            song = WindowByWindow(geometry, generator, plan.frames, device=device, solve_window=solve_window,
                                  decode_latents=decode_latents)
            for w in range(plan.num_windows):
                song.add(padded[:, plan.window(w)], last=w == plan.num_windows - 1)
                if progress is not None:
                    progress(w + 1, plan.num_windows)
            return song.samples(0, plan.cropped_samples)
        out = torch.empty(2, plan.output_samples, dtype=torch.float32, device=device)
        solved: list[torch.Tensor] = []  # latents of the windows not yet through the SQ decoder
        latents = None
        for w in range(plan.num_windows):
            prefix = None if latents is None else latents[-geometry.prefix_latents:]
            latents = solve_window(padded[:, plan.window(w)], prefix, generator)
            solved.append(latents)
            if progress is not None:
                progress(w + 1, plan.num_windows)
            if len(solved) == sq_batch_windows or w == plan.num_windows - 1:
                audio = decode_latents(torch.stack(solved))
                first = w + 1 - len(solved)
                for i in range(len(solved)):
                    overlap_add(out, audio[i].float(), first + i, geometry)
                solved = []
                del audio
        return out[:, :plan.cropped_samples].cpu()


# --------------------------------------------------------------------------------------------- random weights

@torch.no_grad()
def init_random_weights_(model: HeartCodec, generator: torch.Generator) -> None:
    """Deterministic test/benchmark init (spec §10): N(0, 0.02) everywhere, except codebooks N(0, 1),
    norm scales 1 and PReLU slopes 0.25. Visits parameters in registration order."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if isinstance(module, Codebook):
                param.normal_(0.0, 1.0, generator=generator)
            elif isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif isinstance(module, nn.PReLU):
                param.fill_(0.25)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_random_heartcodec(config: HeartCodecConfig, *, device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32, seed: int = 0) -> HeartCodec:
    """A codec with random weights made directly on `device` (no CPU copy, no files)."""
    with meta_modules():
        model = HeartCodec(config)
    model = model.to_empty(device=device).to(dtype)
    init_random_weights_(model, torch.Generator(device=device).manual_seed(seed))
    return model.eval().requires_grad_(False)
