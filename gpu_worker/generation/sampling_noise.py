"""Counter-based sampling noise: the Exponential(1) draw of (seed, frame, codebook, id) is a pure function.

Why not a torch.Generator: a generator's draws depend on its history, so frame 2,900 of a song can only
be drawn by drawing frames 0..2,899 first, a song's draws would have to be made one song at a time outside
the CUDA graph, and the numbers differ between the CPU and CUDA generators. Here every draw is an integer
hash of its coordinates, computed with exact int64 tensor ops inside the frame step (graph-safe, the same
integers on every device), so:
* a song's draws do not depend on its batch mates, its slot or how many frames the engine stepped;
* an attempt that resumes at frame f draws exactly what an uninterrupted run draws from frame f on;
* the plain path, the fast path and the batching engine draw the same numbers for the same seed.

The hash is a 32-bit xor-shift-multiply mixer (two rounds per draw); multipliers stay below 2**31 so no
int64 product overflows. A draw's 24 high bits make a uniform u in (0, 1) and the noise is -log(u).
"""
from __future__ import annotations

import torch

SCHEME = "counter-hash-v1"  # recorded with every token attempt: a replay needs the same scheme
SEED_LIMIT = 2**63 - 1  # the scheme's seeds are non-negative int64 (the API's seed range)

_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x4CA68B27
_GOLDEN = 0x1E3779B9  # odd; spreads consecutive counters before mixing


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def frame_keys(seeds: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, frame): int64 `[B]` from int64 seeds (0..2**63-1) and frame indices `[B]`."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(lo ^ _mix32((hi + _GOLDEN) & _MASK32))
    return _mix32(key ^ ((frames * _GOLDEN) & _MASK32))


def race_noise(seeds: torch.Tensor, frames: torch.Tensor, codebooks: int, vocab: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Exponential(1) draws fp32 `[B, codebooks, vocab]` for songs with `seeds [B]` at frame indices `frames [B]`.

    Tensors are int64 on one device; `out` (fp32, that shape) is filled in place when given (CUDA graphs).
    """
    keys = frame_keys(seeds, frames)[:, None]  # [B, 1]
    counters = torch.arange(codebooks * vocab, device=seeds.device, dtype=torch.int64)[None, :]
    bits = _mix32(_mix32(keys ^ ((counters * _GOLDEN) & _MASK32)) ^ keys)
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    noise = torch.log(uniform).neg_().view(-1, codebooks, vocab)
    if out is None:
        return noise
    return out.copy_(noise)


def song_noise(seed: int, frame: int, codebooks: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """The draws of one song's one frame, `[codebooks, vocab]` (the plain path's per-frame call)."""
    seeds = torch.tensor([seed], dtype=torch.int64, device=device)
    frames = torch.tensor([frame], dtype=torch.int64, device=device)
    return race_noise(seeds, frames, codebooks, vocab)[0]
