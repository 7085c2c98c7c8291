"""Triton kernels for the fast path's frame step: fewer, larger kernels for the same arithmetic.

A profile of one 3B frame (H100, bf16, CFG, bench/profile_gpu.py) showed ~1,650 kernels: GEMMs 5.5 ms
and ~1,300 small kernels (casts, RMSNorm pieces, RoPE, cache writes, SiLU, sampling) 3 ms; at 3,000
filled positions PyTorch's memory-efficient attention added 3.5 ms, because it runs one CTA per
(row, KV head): 16 of the 132 SMs for one song. These kernels replace them (launched by
`fast_generate.FrameEngine` when `fused_kernels` is on, captured into its CUDA graphs). The kernels
themselves are in gpu_worker/kernels/triton_kernels.py (torch-free); this module sizes and launches them:

* `rms_norm`: heartmula.RMSNorm in one kernel (fp32 statistics, cast back, then the scale multiply).
* `rope_to_cache`: RoPE of q and k from the fused qkv projection, k and v written into the KV cache
  at each row's position, q written out in the folded-GQA layout; replaces ~10 kernels.
* `decode_attention`: split-K ("flash-decoding") attention for a few query rows per KV head: the key
  range is cut into chunks spread over the SMs, each row attends over its own filled length (no mask
  tensor, no work past the end), and a second kernel merges the chunks by their log-sum-exp (a single
  chunk, as in the decoder, is written out by the chunk kernel itself).
* `linear`, `linear_add_`: the projections of a frame step (at most 16 rows: one song's two CFG rows,
  or 8 songs') through `_skinny_gemm_kernel`, one fixed 16-row tile reducing all of K in order; cuBLAS
  picks a kernel per shape and read the weights no faster at these sizes. More rows go to cuBLAS.
* `silu_mul`: SwiGLU's silu(gate) * up from the fused gate|up projection.
* `guided_logits` + `topk_race_sample`: the CFG mix, temperature and forbidden-id mask, then top-k
  filtering, softmax and the Exponential race of `generate.top_k_race`, one program per song with the
  row in registers (the exact k-th largest value by a radix select, two bits a pass: torch.topk took
  36-48 us a call);
  the race also writes the next decoder step's embedding row per row.

Rounding follows the eager code: bf16 results are rounded where PyTorch rounds them (RMSNorm before
the scale, silu before the product); fp32 reductions may sum in a different order (last-bit
differences, as between two GEMM kernels). On sm_90 and later every kernel is launched with programmatic
dependent launch (PDL): it starts while the kernel before it drains and waits for its results on the
card (`_wait_for_previous_grid`), which hides most of a launch gap between the step's ~700 kernels.
Every kernel has an eager twin (gpu_worker/model/transformer_block.py's ops, `fast_generate`) and a
test that runs it through Triton's interpreter on the CPU (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from gpu_worker.kernels.triton_kernels import triton

if triton is not None:
    from gpu_worker.kernels.triton_kernels import (
        _attention_chunk_kernel,
        _attention_merge_kernel,
        _guided_logits_kernel,
        _rms_norm_kernel,
        _rope_to_cache_kernel,
        _silu_mul_kernel,
        _skinny_gemm_kernel,
        _topk_race_kernel,
    )


TOPK_WARPS = 32  # one program holds a whole 8197-logit row; bench/profile_gpu.py --only kernels compares


PDL = True  # programmatic dependent launch where the card has it; bench/frame_profile.py turns it off to compare


def triton_available() -> bool:
    return triton is not None


@functools.cache
def _cuda_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _pdl_for(device: torch.device) -> bool:
    """PDL for kernels on `device`: a CUDA card of compute capability 9.0 or later, or the meta device
    while Triton's active target is one (the warm-up compiles the very kernels the card will run)."""
    if not PDL:
        return False
    if device.type == "cuda":
        return _cuda_has_pdl(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        try:
            target = triton.runtime.driver.active.get_current_target()
        except RuntimeError:  # no Triton driver on this host
            return False
        return target.backend == "cuda" and int(target.arch) >= 90
    return False


def _launch(device: torch.device) -> dict:
    """The launch options every fused kernel takes: its GDC constant and, with PDL, Triton's launch flag."""
    return {"GDC": True, "launch_pdl": True} if _pdl_for(device) else {"GDC": False}


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# --------------------------------------------------------------------------------------------- launchers

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of every row of `x [M, D]` (last dim contiguous) -> `[M, D]` in x's dtype."""
    rows, dim = x.shape
    out = torch.empty((rows, dim), dtype=x.dtype, device=x.device) if out is None else out
    _rms_norm_kernel[(rows,)](x, scale, out, dim, eps, x.stride(0), out.stride(0), BLOCK=_pow2(dim),
                              num_warps=8 if dim >= 2048 else 4, **_launch(x.device))
    return out


def _identity_rows(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, base: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, *, heads: int, kv_heads: int,
                  head_dim: int, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
    """qkv `[N, S, (H + 2 KV) * hd]` at positions base[n] + s -> q `[N, H, S, hd]`; k, v into the caches.

    `cos`, `sin`: fp32 `[max_positions, hd / 2]`; caches `[rows, KV, slots, hd]` (last dim contiguous);
    row n's keys and values go to cache row `cache_rows[n]` (default: n).
    """
    n, seq, width = qkv.shape
    flat = qkv.reshape(n * seq, width)
    q = torch.empty((n, heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device)
    rows = _identity_rows(n, qkv.device) if cache_rows is None else cache_rows
    _rope_to_cache_kernel[(n * seq, heads + kv_heads)](
        flat, cos, sin, base, rows, q, k_cache, v_cache, seq, heads, kv_heads, head_dim, flat.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=max(SHARED_HALF, _pow2(head_dim // 2)), num_warps=2, **_launch(qkv.device))
    return q


MAX_SPLITS = 32  # also the merge kernel's fixed block: one compiled merge for every KV bucket
ATTENTION_TARGET_PROGRAMS = 1024  # (row, KV head, chunk) programs at a full cache: a few waves of SMs
# Block sizes shared by both transformers (head_dim 128 and 384 for HeartMuLa), so RoPE and the merge
# compile once each: a new machine compiles every kernel at its first frame (~1 s a kernel).
SHARED_HALF = 256
SHARED_MERGE_D = 512


def attention_splits(capacity: int, pairs: int, target_programs: int = 264, min_chunk: int = 64) -> int:
    """How many key chunks to spread `pairs` (row, KV head) programs over, for a key capacity."""
    by_work = max(1, capacity // min_chunk)
    return max(1, min(by_work, math.ceil(target_programs / max(pairs, 1)), MAX_SPLITS))


def attention_chunk(cache_len: int, pairs: int, target_programs: int | None = None) -> int:
    """A fixed key chunk for a cache of `cache_len` slots read by `pairs` (row, KV head) programs.

    With the chunk fixed, a row's keys are reduced in the same chunks whatever the capacity of the
    step (the key-length bucket, set by the longest song in the batch): only empty trailing chunks
    come and go, and they merge in as exact zeros. That is what keeps a song's attention independent
    of its batch mates' lengths, and a resumed song's replayed rows equal to its decoded ones.
    """
    target = ATTENTION_TARGET_PROGRAMS if target_programs is None else target_programs
    splits = max(1, min(MAX_SPLITS, math.ceil(target / max(pairs, 1))))
    block_n = 64 if cache_len >= 64 else 16
    chunk = math.ceil(math.ceil(cache_len / splits) / block_n) * block_n
    return max(chunk, math.ceil(cache_len / MAX_SPLITS / block_n) * block_n)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, base: torch.Tensor, *,
                     seq: int, capacity: int, splits: int | None = None, chunk: int | None = None,
                     cache_rows: torch.Tensor | None = None, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int | None = None) -> torch.Tensor:
    """Attention of folded queries `q [N, KV, G * S, hd]` (query g * S + s sits at position base[n] + s and
    sees keys 0..base[n] + s) over the first `capacity` slots of cache row `cache_rows[n]` (default n)
    -> `[N, KV, G * S, hd]`.

    `chunk` fixes the key chunk each program reduces (see `attention_chunk`); without it the split
    follows `capacity` and `splits`. The scale is 1 / sqrt(hd), as F.scaled_dot_product_attention's default.
    `block_n`, `num_warps`, `num_stages`: the launch configuration (bench/frame_profile.py sweeps them).
    """
    n, kv_heads, queries, head_dim = q.shape
    q = q.contiguous()
    pairs = n * kv_heads
    block_n = block_n or (64 if capacity >= 64 else 16)
    if chunk is None:
        splits = min(splits or attention_splits(capacity, pairs), MAX_SPLITS)
        chunk = math.ceil(math.ceil(capacity / splits) / block_n) * block_n
    elif chunk % block_n and chunk < capacity:
        raise ValueError(f"chunk {chunk} must be a multiple of {block_n}")
    splits = math.ceil(capacity / chunk)
    if splits > MAX_SPLITS:
        raise ValueError(f"capacity {capacity} needs {splits} chunks of {chunk} keys; at most {MAX_SPLITS}")
    rows = _identity_rows(n, q.device) if cache_rows is None else cache_rows
    block_m = max(16, _pow2(queries))
    block_d = max(16, _pow2(head_dim))
    out = torch.empty_like(q)
    direct = splits == 1  # one chunk needs no merge: the chunk kernel writes the output itself
    if direct:
        part_out, part_lse = out, out
    else:
        part_out = torch.empty((pairs, splits, block_m, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((pairs, splits, block_m), dtype=torch.float32, device=q.device)
    _attention_chunk_kernel[(pairs, splits)](
        q, k_cache, v_cache, base, rows, part_out, part_lse, kv_heads, queries, seq, head_dim, chunk,
        1.0 / math.sqrt(head_dim),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32, DIRECT=direct,
        num_warps=num_warps, **_launch(q.device),
        **({} if num_stages is None else {"num_stages": num_stages}))
    if direct:
        return out
    _attention_merge_kernel[(pairs, queries)](part_out, part_lse, out, queries, head_dim, splits, block_d,
                                              BLOCK_M=block_m, BLOCK_S=MAX_SPLITS,
                                              MERGE_D=max(SHARED_MERGE_D, block_d), num_warps=8,
                                              **_launch(q.device))
    return out


SKINNY_MAX_ROWS = 16  # at 32 rows a 16-row tile reads the weights twice and loses to cuBLAS (bench/RESULTS.md)
SKINNY_BLOCK_M = 16  # fixed for every launch: a row's reduction never depends on the row count
SKINNY_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of `_skinny_gemm_kernel`: its column and depth blocks, warps, pipeline stages
    and row block (production launches keep SKINNY_BLOCK_M; bench/frame_profile.py --sweep-wide tries taller)."""

    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3
    block_m: int = SKINNY_BLOCK_M


def skinny_config(n: int, k: int) -> GemmConfig:
    """The tile for out `[rows, n]` = x `[rows, k]` @ w.T, picked by a sweep on an H200; bench/frame_profile.py
    --only gemm times the picks against cuBLAS (bench/RESULTS.md)."""
    if k >= 8192:
        return GemmConfig(block_n=32, block_k=512)
    if n <= 4096:
        return GemmConfig(block_n=32, block_k=256, stages=4)
    return GemmConfig(block_n=64, block_k=256)


def uses_skinny_gemm(rows: int, w: torch.Tensor) -> bool:
    """Whether `linear` sends `rows` rows against weight `w` to the skinny kernel: the shape and dtype
    decide, never the values, so a frame step's kernels stay the same from one step to the next."""
    return (triton is not None and w.device.type in ("cuda", "meta") and 0 < rows <= SKINNY_MAX_ROWS
            and w.dtype in SKINNY_DTYPES and w.stride(1) == 1)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, *, add_to: torch.Tensor | None = None,
                config: GemmConfig | None = None) -> torch.Tensor:
    """x `[M, K]` @ w `[N, K]`.T through `_skinny_gemm_kernel` -> `[M, N]`, or added into `add_to` in place
    (rounded once, as addmm with beta = 1). Rows of x and the output may be strided; columns contiguous."""
    rows, depth = x.shape
    width = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device) if add_to is None else add_to
    cfg = config or skinny_config(width, depth)
    even = width % cfg.block_n == 0 and depth % cfg.block_k == 0
    grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(width, cfg.block_n))
    _skinny_gemm_kernel[grid](x, w, out, rows, width, depth, x.stride(0), w.stride(0), out.stride(0),
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              ADD=add_to is not None, EVEN=even, IEEE=x.dtype == torch.float32,
                              num_warps=cfg.warps, num_stages=cfg.stages, **_launch(x.device))
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias for x `[M, K]`: the skinny kernel for a few rows, cuBLAS otherwise."""
    if uses_skinny_gemm(x.shape[0], w):
        return skinny_gemm(x, w)
    return torch.nn.functional.linear(x, w)


def linear_add_(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc += x @ w.T in place, rounded once (addmm_ with beta = 1), through the kernel `linear` picks."""
    if uses_skinny_gemm(x.shape[0], w):
        return skinny_gemm(x, w, add_to=acc)
    return acc.addmm_(x, w.t())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[M, 2I]` (gate | up) -> silu(gate) * up `[M, I]`, each rounded to the input dtype as PyTorch does."""
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(width))
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block, num_warps=4,
                                                        **_launch(gate_up.device))
    return out


def guided_logits(logits: torch.Tensor, forbidden: torch.Tensor, *, rows: int, cfg_scale: torch.Tensor,
                  temperature: torch.Tensor) -> torch.Tensor:
    """Raw logits `[B * rows, V]` (row 0 of each song conditional; rows may be padded views of wider
    rows), `forbidden` int8 `[V]` -> fp32 `[B, V]`: (uncond + cfg (cond - uncond)) / temperature with the
    forbidden ids at -inf (generate.cfg_mix, then top_k_race's z); `cfg_scale`, `temperature` fp32 `[B]`."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    total, vocab = logits.shape
    songs = total // rows
    out = torch.empty((songs, vocab), dtype=torch.float32, device=logits.device)
    block = 2048
    _guided_logits_kernel[(songs, triton.cdiv(vocab, block))](
        logits, logits.stride(0), forbidden, out, vocab, cfg_scale, temperature,
        ROWS=rows, BLOCK=block, num_warps=4, **_launch(logits.device))
    return out


def topk_race_sample(z: torch.Tensor, noise: torch.Tensor | None, *, top_k: torch.Tensor, rows: int,
                     row_offset: int, num_warps: int | None = None,
                     hashed: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """generate.top_k_race on `z [B, V]` (already /temperature and masked) with Exponential draws
    `noise [B, V]` (or `hashed` = (seeds int64 [B], frames int64 [B], codebook): the very draws of
    sampling_noise.race_noise, computed in the kernel) and per-song `top_k` int64 `[B]` -> (codes int32 [B],
    -1 where nothing is eligible;
    embedding rows int64 [B * rows] =
    max(code, 0) + row_offset, each song's row repeated `rows` times for its CFG rows)."""
    songs, vocab = z.shape
    codes = torch.empty(songs, dtype=torch.int32, device=z.device)
    embed_rows = torch.empty(songs * rows, dtype=torch.int64, device=z.device)
    block = _pow2(vocab)
    if hashed is not None:
        seeds, frames, codebook = hashed
        noise_args = (z, 0, seeds, frames, codebook * vocab)  # z stands in for the unused noise pointer
    elif noise is not None:
        noise_args = (noise, noise.stride(0), top_k, top_k, 0)  # the seed/frame pointers are unused
    else:
        raise ValueError("pass noise or hashed=(seeds, frames, codebook)")
    _topk_race_kernel[(songs,)](z, *noise_args, codes, embed_rows, vocab, top_k, row_offset, ROWS=rows, BLOCK=block,
                                HASHED=hashed is not None,
                                num_warps=num_warps or TOPK_WARPS if block >= 8192 else 4, **_launch(z.device))
    return codes, embed_rows
