"""HeartMuLa token generation, the plain reference-quality path (spec §4.4, §5, §6).

One frame = the backbone on one new position (the whole prompt for frame 0), codebook 0 from its
head, then the local decoder for codebooks 1..7. With CFG (cfg_scale > 1) row 0 is conditional and
row 1 unconditional; each codebook's logits are mixed in fp32 and sampled once for both rows.

Our rules where the reference differs: special ids other than audio EOS are masked at every draw;
audio EOS in any codebook of any frame ends the song (that frame is dropped); at most
N = max_audio_length_ms // 80 frames in total; the context limit is checked before prefill.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_worker.generation.sampling_noise import SEED_LIMIT, song_noise
from gpu_worker.model.heartmula import HeartMuLa
from gpu_worker.model.prompt import Prompt
from gpu_worker.model.token_validation import CODEBOOK_SIZE, validate_codes

MS_PER_FRAME = 80  # 12.5 frames per second
AUDIO_VOCAB_SIZE = 8197

LogitsHook = Callable[[int, int, torch.Tensor], torch.Tensor]

# cuDNN attention builds an execution plan for every new key length (measured on an H200: ~63 instead
# of ~30 ms per frame at positions not seen before); the plain path's key length grows every frame.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class GenerationCancelled(Exception):
    """`should_cancel` asked to stop."""


class EmptySongError(ValueError):
    """Audio EOS in frame 0: nothing to decode."""


class ContextLimitError(ValueError):
    """Prompt plus requested frames do not fit the backbone's context."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_k: int
    cfg_scale: float
    max_audio_length_ms: int

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 1 <= self.top_k <= AUDIO_VOCAB_SIZE:
            raise ValueError(f"top_k must be in 1..{AUDIO_VOCAB_SIZE}, got {self.top_k}")
        if not self.cfg_scale >= 1:
            raise ValueError(f"cfg_scale must be >= 1, got {self.cfg_scale}")
        if not self.max_audio_length_ms >= MS_PER_FRAME:
            raise ValueError(f"max_audio_length_ms must be >= {MS_PER_FRAME}, got {self.max_audio_length_ms}")

    @property
    def max_frames(self) -> int:
        return self.max_audio_length_ms // MS_PER_FRAME

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1


StopReason = Literal["eos", "max_length"]


@dataclass
class GenerationResult:
    frames: torch.Tensor  # [8, T] int32 on CPU, every value 0..8191
    stop_reason: StopReason
    prompt_length: int


def forbidden_ids_mask(vocab_size: int, audio_eos_id: int, *, device: torch.device | str) -> torch.Tensor:
    """True for ids the codec cannot take and that do not end the song: codebook_size.. minus EOS (spec §6)."""
    forbidden = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    forbidden[CODEBOOK_SIZE:] = True
    forbidden[audio_eos_id] = False
    return forbidden


def top_k_race(logits: torch.Tensor, race: torch.Tensor, *, temperature: float | torch.Tensor,
               top_k: int | torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """Draw one id per row of `logits [R, V]` (fp32) with the Exponential(1) draws `race` (same shape)
    -> int32 `[R]`, without a host sync (spec §4.4); -1 where no id is eligible (all NaN or -inf).

    `temperature` and `top_k` are one value for every row or per-row tensors `[R]` (the batching engine
    serves songs with different settings in one frame step).
    """
    if isinstance(temperature, torch.Tensor):
        temperature = temperature[:, None]
    z = (logits / temperature).masked_fill(forbidden, float("-inf"))
    if isinstance(top_k, torch.Tensor):  # the per-row k-th largest: the same value torch.topk would give
        kth_largest = z.sort(dim=-1, descending=True).values.gather(-1, (top_k - 1)[:, None])
    else:
        kth_largest = torch.topk(z, top_k, dim=-1).values[..., -1:]
    keep = (z >= kth_largest) & (z > float("-inf"))  # ties with the k-th value are kept
    probs = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1, dtype=torch.float32)
    # argmax(p / q) with q ~ Exp(1) samples from p; a 0/0 or a dropped entry must never win
    scores = probs / race
    scores = scores.masked_fill(~keep | scores.isnan(), float("-inf"))
    best = scores.argmax(dim=-1)
    best = torch.where(scores.amax(dim=-1) > float("-inf"), best, torch.full_like(best, -1))
    return best.to(torch.int32).reshape(-1)


def cfg_mix(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Guided logits `u + s (c - u)` from raw logits `[2, V]` (row 0 conditional) in fp32; `[1, V]` passes."""
    if logits.shape[0] == 1:
        return logits
    cond, uncond = logits[0:1].float(), logits[1:2].float()
    return uncond + cfg_scale * (cond - uncond)


class _FrameSampler:
    """Samples the 8 codebooks of one frame with that frame's counter-based draws (sampling_noise)."""

    def __init__(self, model: HeartMuLa, params: SamplingParams, forbidden: torch.Tensor, seed: int,
                 logits_hook: LogitsHook | None):
        self.model = model
        self.params = params
        self.forbidden = forbidden
        self.seed = seed
        self.logits_hook = logits_hook
        self.batch_size = 2 if params.uses_cfg else 1

    def _sample(self, frame_index: int, codebook: int, logits: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        guided = cfg_mix(logits, self.params.cfg_scale)
        if self.logits_hook is not None:
            guided = self.logits_hook(frame_index, codebook, guided)
        return top_k_race(guided, race[codebook:codebook + 1], temperature=self.params.temperature,
                          top_k=self.params.top_k, forbidden=self.forbidden)

    def frame(self, frame_index: int, last_h: torch.Tensor) -> torch.Tensor:
        """Codes `[8]` int32 of one frame from the backbone's last hidden state `[B, D]`."""
        model = self.model
        args = model.args
        race = song_noise(self.seed, frame_index, args.audio_num_codebooks, args.audio_vocab_size, last_h.device)
        codes = [self._sample(frame_index, 0, model.codebook0_logits(last_h), race)]
        logits = model.decoder_first_logits(last_h, codes[0])
        codes.append(self._sample(frame_index, 1, logits, race))
        for codebook in range(2, args.audio_num_codebooks):
            logits = model.decoder_next_logits(codebook, codes[-1], self.batch_size)
            codes.append(self._sample(frame_index, codebook, logits, race))
        return torch.cat(codes)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_LIMIT:
        raise ValueError(f"seed must be an int in 0..{SEED_LIMIT}, got {seed!r}")


def check_prompt(model: HeartMuLa, prompt: Prompt) -> None:
    """Out-of-range ids must fail here, on the host, not as a device-side assert in an embedding."""
    args = model.args
    text = prompt.tokens[:, -1][prompt.mask[:, -1]]
    if text.numel() and (text.min() < 0 or text.max() >= args.text_vocab_size):
        raise ValueError(f"prompt text ids must be in 0..{args.text_vocab_size - 1}, "
                         f"got {int(text.min())}..{int(text.max())}")
    audio = prompt.tokens[:, :-1]
    if audio.numel() and (audio.min() < 0 or audio.max() >= args.audio_vocab_size):
        raise ValueError(f"prompt audio ids must be in 0..{args.audio_vocab_size - 1}, "
                         f"got {int(audio.min())}..{int(audio.max())}")
    if not 0 <= prompt.muq_idx < prompt.length:
        raise ValueError(f"muq_idx {prompt.muq_idx} is outside the prompt (length {prompt.length})")


@torch.inference_mode()
@sdpa_kernel(SDPA_BACKENDS)
def generate(model: HeartMuLa, prompt: Prompt, params: SamplingParams, *, seed: int,
             progress: Callable[[int, int], None] | None = None,
             should_cancel: Callable[[], bool] | None = None,
             progress_every: int = 25, logits_hook: LogitsHook | None = None) -> GenerationResult:
    """Generate up to `params.max_frames` frames for `prompt` (spec §5, our rules).

    `seed` is the only source of randomness: frame f's draws are a function of (seed, f)
    (gpu_worker/generation/sampling_noise.py), so every path and a resumed attempt draw the same numbers.
    `progress(frames_done, frames_total)` and `should_cancel()` run every `progress_every` frames;
    `progress` runs once more at the end. `logits_hook(frame, codebook, logits [1, V])` may replace
    the guided logits just before sampling (tests inject EOS or special ids with it).
    """
    args = model.args
    device = model.device
    total = params.max_frames
    limit = args.backbone.max_seq_len
    if prompt.length + total > limit:
        raise ContextLimitError(
            f"prompt length L={prompt.length} + max frames N={total} = {prompt.length + total} exceeds the "
            f"context limit {limit} (max_seq_len); shorten the lyrics or max_audio_length_ms")
    if params.top_k > args.audio_vocab_size:
        raise ValueError(f"top_k must be in 1..{args.audio_vocab_size}, got {params.top_k}")
    check_seed(seed)
    if progress_every < 1:
        raise ValueError(f"progress_every must be >= 1, got {progress_every}")
    check_prompt(model, prompt)

    forbidden = forbidden_ids_mask(args.audio_vocab_size, prompt.audio_eos_id, device=device)
    sampler = _FrameSampler(model, params, forbidden, seed, logits_hook)
    batch = sampler.batch_size
    model.setup_caches(batch)

    length = prompt.length
    h = model.embed_prompt(prompt.tokens.to(device), prompt.mask.to(device), prompt.muq_idx, batch)
    last_h = model.backbone_step(h, torch.arange(length, device=device), kv_len=length)
    frames: list[torch.Tensor] = []
    stop_reason: StopReason = "max_length"
    for index in range(total):
        if index > 0:  # feed the previous frame at the next position
            position = length + index - 1
            h = model.embed_frame(frames[-1], batch)
            last_h = model.backbone_step(h, torch.arange(position, position + 1, device=device), kv_len=position + 1)
        frame = sampler.frame(index, last_h)
        codes = frame.tolist()  # the plain path reads every frame back: one host sync per frame
        if -1 in codes:
            raise RuntimeError(f"no eligible id at frame {index}, codebook {codes.index(-1)}: "
                               "every logit was NaN or -inf")
        if prompt.audio_eos_id in codes:
            stop_reason = "eos"
            break
        frames.append(frame)
        done = len(frames)
        if done % progress_every == 0 and done < total:
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {done} of {total} frames")
            if progress is not None:
                progress(done, total)

    if not frames:
        raise EmptySongError("EOS at frame 0: the model ended the song before its first frame")
    if progress is not None:
        progress(len(frames), total)
    grid = torch.stack(frames, dim=1).cpu()
    validate_codes(grid, num_quantizers=args.audio_num_codebooks, codebook_size=CODEBOOK_SIZE)
    return GenerationResult(frames=grid, stop_reason=stop_reason, prompt_length=length)
