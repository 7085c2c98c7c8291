"""Load HeartCodec-oss checkpoints (spec §1.5) and write tiny ones in the same on-disk format (§10).

On disk the SQ-Codec convs carry weight norm as (g, v) pairs, under either the `parametrizations` names
(`<L>.parametrizations.weight.original0/1`, what the reference writes) or the legacy `<L>.weight_g/weight_v`.
The loader folds each pair into a plain `<L>.weight = g * v / ||v||` in fp32 (norm over every dim but 0, no
epsilon) and only then casts to the target dtype.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gpu_worker.checkpoints.checkpoint_files import (
    CheckpointError,
    ProblemReport,
    WeightFiles,
    compare_shapes,
    folder_checksums,
    read_json,
    write_state_dict,
)
from gpu_worker.model.heartcodec import WINDOW_FRAMES, CodecConfigError, HeartCodec, HeartCodecConfig, build_random_heartcodec
from gpu_worker.model.meta_build import meta_modules

CODEC_FOLDER = "HeartCodec-oss"
CONFIG_NAME = "config.json"

PARAMETRIZATION_NAMES = ("parametrizations.weight.original0", "parametrizations.weight.original1")  # (g, v)
LEGACY_NAMES = ("weight_g", "weight_v")

_IGNORABLE = re.compile(
    r"flow_matching\.vq_embed\.layers\.\d+\._codebook\.(initted|cluster_size|embed_avg)"  # EMA training state
    r"|flow_matching\.vq_embed\.project_in\.(weight|bias)"  # encoding only
    r"|scalar_model\.encoder\..+"  # encoding only
    r"|(backbone|decoder)_causal_mask"  # saved caches of a reference model
)


def is_ignorable(name: str) -> bool:
    """Tensors that may be present or absent and are never loaded (§1.5 item 7)."""
    return _IGNORABLE.fullmatch(name) is not None


@dataclass
class LoadedCodec:
    model: HeartCodec
    config: HeartCodecConfig
    checksums: dict[str, str]  # "HeartCodec-oss/<file>" -> sha256


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v|| in fp32, the norm over every dim except 0 (per input channel for ConvTranspose)."""
    v = v.float()
    norm = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
    return g.float() * v / norm


def read_codec_config(folder: Path) -> HeartCodecConfig:
    try:
        return HeartCodecConfig.from_dict(read_json(folder / CONFIG_NAME))
    except CodecConfigError as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {folder / CONFIG_NAME}: {exc}") from exc


def _weight_norm_names(files: WeightFiles, layer: str, weight_shape: tuple[int, ...],
                       report: ProblemReport) -> dict[str, tuple[int, ...]]:
    """Expected on-disk names/shapes of one weight-norm layer, after picking the convention it uses."""
    g_shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    conventions = {}
    for g_suffix, v_suffix in (PARAMETRIZATION_NAMES, LEGACY_NAMES):
        g_name, v_name = f"{layer}.{g_suffix}", f"{layer}.{v_suffix}"
        present = [name for name in (g_name, v_name) if name in files.tensors]
        if present:
            conventions[(g_name, v_name)] = present
    if len(conventions) > 1:
        report.add("weight-norm conflicts", f"{layer}: both the parametrizations.weight.original0/1 and the "
                   "legacy weight_g/weight_v pair are present; keep one")
    expected: dict[str, tuple[int, ...]] = {}
    for (g_name, v_name), present in conventions.items():
        if len(present) == 1:
            other = v_name if present[0] == g_name else g_name
            report.add("weight-norm conflicts", f"{layer}: {present[0]} without {other} (half a weight-norm pair)")
        shapes = {g_name: g_shape, v_name: weight_shape}
        expected.update({name: shapes[name] for name in present})
    if not conventions:  # neither convention: report the published names as missing
        g_name, v_name = (f"{layer}.{suffix}" for suffix in PARAMETRIZATION_NAMES)
        expected = {g_name: g_shape, v_name: weight_shape}
    return expected


def _pair_names(files: WeightFiles, layer: str) -> tuple[str, str]:
    for g_suffix, v_suffix in (PARAMETRIZATION_NAMES, LEGACY_NAMES):
        if f"{layer}.{g_suffix}" in files.tensors:
            return f"{layer}.{g_suffix}", f"{layer}.{v_suffix}"
    raise AssertionError(f"{layer}: no weight-norm pair (checked earlier)")


def load_heartcodec(ckpt_root: Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> LoadedCodec:
    """Load `ckpt_root/HeartCodec-oss` straight to `device`/`dtype`; one CheckpointError lists every problem."""
    folder = Path(ckpt_root) / CODEC_FOLDER
    if not folder.is_dir():
        raise CheckpointError(f"cannot load checkpoint {folder}: folder not found")
    config = read_codec_config(folder)
    files = WeightFiles(folder)
    with meta_modules():
        model = HeartCodec(config)
    module_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weight_norm_layers = model.weight_norm_layers()

    report = ProblemReport(folder)
    expected = dict(module_shapes)
    for layer in weight_norm_layers:
        expected.update(_weight_norm_names(files, layer, expected.pop(f"{layer}.weight"), report))
    compare_shapes(files, expected, report, ignorable=is_ignorable)
    files.check_float_dtypes(report, expected)
    report.raise_if_any()

    state: dict[str, torch.Tensor] = {}
    for layer in weight_norm_layers:
        # fold on the target device in fp32, then cast: never keep the (g, v) pair around
        g_name, v_name = _pair_names(files, layer)
        g = files.load(g_name, device=device, dtype=torch.float32)
        v = files.load(v_name, device=device, dtype=torch.float32)
        state[f"{layer}.weight"] = fold_weight_norm(g, v).to(dtype)
    for name in module_shapes:
        if name not in state:
            state[name] = files.load(name, device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    checksums = {f"{CODEC_FOLDER}/{name}": digest for name, digest in folder_checksums(folder).items()}
    return LoadedCodec(model=model, config=config, checksums=checksums)


# ------------------------------------------------------------------------------------------ tiny checkpoints

def _encoder_tensors(config: HeartCodecConfig, generator: torch.Generator, legacy: bool) -> dict[str, torch.Tensor]:
    """A few SQ-Codec encoder tensors: ignorable at load time, present in the published files."""
    g_suffix, v_suffix = LEGACY_NAMES if legacy else PARAMETRIZATION_NAMES
    channels, kernel = config.init_channel, config.default_kernel_size
    v = torch.randn(channels, 1, kernel, generator=generator) * 0.02
    return {
        f"scalar_model.encoder.0.{g_suffix}": v.norm(dim=(1, 2), keepdim=True),
        f"scalar_model.encoder.0.{v_suffix}": v,
        "scalar_model.encoder.0.bias": torch.zeros(channels),
    }


AUDIBLE_RMS = 0.1  # -20 dBFS: the tiny checkpoint's noise is heard, not a DC offset


def _conv_fan_in(module: torch.nn.Conv1d | torch.nn.ConvTranspose1d) -> float:
    weight = module.weight
    if isinstance(module, torch.nn.ConvTranspose1d):  # [Cin, Cout, k]: each output sees Cin * k / stride taps
        return weight.shape[0] * weight.shape[2] / module.stride[0]
    return weight.shape[1] * weight.shape[2]


@torch.no_grad()
def make_audible_(model: HeartCodec, *, seed: int, target_rms: float = AUDIBLE_RMS) -> None:
    """Rescale a random codec's SQ decoder so that it turns latents into noise at `target_rms`.

    N(0, 0.02) weights shrink the signal at every conv (the waveform ends up a constant bias, std ~3e-5).
    Each conv is made variance-preserving (std 1/sqrt(fan-in), no bias), then the last conv is scaled and
    offset so that N(0, 1) latents, what the flow solve starts from, decode to zero-mean audio at
    `target_rms`. The weights stay random; only their scale changes. Only the tiny checkpoints written to
    disk get this; `build_random_heartcodec` (the numerics tests' model) is untouched.
    """
    convs = [m for m in model.scalar_model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    for conv in convs:
        conv.weight.mul_(1.0 / (conv.weight.std() * _conv_fan_in(conv) ** 0.5))
        if conv.bias is not None:
            conv.bias.zero_()
    generator = torch.Generator().manual_seed(seed + 2)
    latents = torch.randn(1, 2 * WINDOW_FRAMES, model.config.out_channels, generator=generator)
    audio = model.scalar_model.decode_batch(latents)
    last = convs[-1]
    last.weight.mul_(target_rms / float(audio.std()))
    assert last.bias is not None, "the SQ decoder's last conv has a bias"
    last.bias.fill_(-float(audio.mean()) * target_rms / float(audio.std()))


def tiny_codec_tensors(config: HeartCodecConfig, *, seed: int, layout: str) -> dict[str, torch.Tensor]:
    """On-disk tensors (F32) for a random codec: weight norm unfolded with g = ||v||, plus ignorable extras.

    The SQ decoder is rescaled to make audible noise (`make_audible_`)."""
    if layout not in ("sharded", "single"):
        raise ValueError(f"layout must be 'sharded' or 'single', got {layout!r}")
    legacy = layout == "single"
    model = build_random_heartcodec(config, seed=seed)
    make_audible_(model, seed=seed)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    g_suffix, v_suffix = LEGACY_NAMES if legacy else PARAMETRIZATION_NAMES
    for layer in model.weight_norm_layers():
        v = state.pop(f"{layer}.weight")
        state[f"{layer}.{g_suffix}"] = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
        state[f"{layer}.{v_suffix}"] = v
    generator = torch.Generator().manual_seed(seed + 1)
    vq = "flow_matching.vq_embed"
    state[f"{vq}.project_in.weight"] = torch.randn(config.codebook_dim, config.dim, generator=generator) * 0.02
    state[f"{vq}.project_in.bias"] = torch.zeros(config.codebook_dim)
    for q in range(config.num_quantizers):
        book = f"{vq}.layers.{q}._codebook"
        state[f"{book}.embed_avg"] = state[f"{book}.embed"].clone()
        state[f"{book}.cluster_size"] = torch.ones(1, config.codebook_size)
        # older vector-quantize-pytorch (the 20260123 files) stores [1]; 1.27.15 stores []
        state[f"{book}.initted"] = torch.tensor(1.0) if legacy else torch.tensor([1.0])
    state.update(_encoder_tensors(config, generator, legacy))
    return state


def write_tiny_heartcodec(ckpt_root: Path, *, seed: int = 0, layout: str = "sharded",
                          windows: tuple[int, int] | None = None) -> None:
    """Write `ckpt_root/HeartCodec-oss` at the tiny sizes of spec §10.

    "sharded": 2 shards + index, `parametrizations.weight.original0/1`, `initted` [1].
    "single": `model.safetensors`, legacy `weight_g/weight_v`, `initted` [].
    `windows` (window_frames, hop_frames) replaces the published window geometry: a tiny song of a few
    seconds then spans several windows (the streaming tests).
    """
    config = HeartCodecConfig.tiny()
    if windows is not None:
        config = replace(config, window_frames=windows[0], hop_frames=windows[1])
    tensors = tiny_codec_tensors(config, seed=seed, layout=layout)
    folder = Path(ckpt_root) / CODEC_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    write_state_dict(folder, tensors, shards=2 if layout == "sharded" else 1)
