"""Triton kernels for the fast path's frame step: fewer, larger kernels for the same arithmetic.

A profile of one 3B frame (H100, bf16, CFG, bench/profile_gpu.py) showed ~1,650 kernels: GEMMs 5.5 ms
and ~1,300 small kernels (casts, RMSNorm pieces, RoPE, cache writes, SiLU, sampling) 3 ms; at 3,000
filled positions PyTorch's memory-efficient attention added 3.5 ms, because it runs one CTA per
(row, KV head): 16 of the 132 SMs for one song. These kernels replace them (launched by
`fast_generate.FrameEngine` when `fused_kernels` is on, captured into its CUDA graphs):

* `rms_norm`: heartmula.RMSNorm in one kernel (fp32 statistics, cast back, then the scale multiply).
* `rope_to_cache`: RoPE of q and k from the fused qkv projection, k and v written into the KV cache
  at each row's position, q written out in the folded-GQA layout; replaces ~10 kernels.
* `decode_attention`: split-K ("flash-decoding") attention for a few query rows per KV head: the key
  range is cut into chunks spread over the SMs, each row attends over its own filled length (no mask
  tensor, no work past the end), and a second kernel merges the chunks by their log-sum-exp.
* `silu_mul`: SwiGLU's silu(gate) * up from the fused gate|up projection.
* `guided_logits` + `topk_race_sample`: the CFG mix, temperature and forbidden-id mask, then top-k
  filtering, softmax and the Exponential race of `generate.top_k_race`, one program per song with the
  row in registers (the exact k-th largest value by a radix select: torch.topk took 36-48 us a call);
  the race also writes the next decoder step's embedding row per row.

Rounding follows the eager code: bf16 results are rounded where PyTorch rounds them (RMSNorm before
the scale, silu before the product); fp32 reductions may sum in a different order (last-bit
differences, as between two GEMM kernels). Every kernel has an eager twin in `fast_generate` and a
test that runs it through Triton's interpreter on the CPU (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on hosts without Triton
    triton = None
    tl = None


TOPK_WARPS = 32  # one program holds a whole 8197-logit row; bench/profile_gpu.py --only kernels compares


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, eps, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
        mean_square = tl.sum(x * x, axis=0) / dim
        normed = (x * (1.0 / tl.sqrt(mean_square + eps))).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=inside)

    # seq (1 or 2 new tokens) is not specialised on: one compiled kernel serves both (Triton would
    # otherwise compile a variant for the value 1); every compile adds ~1 s to a new machine's first frame
    @triton.jit(do_not_specialize=["seq"])
    def _rope_to_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, base_ptr, cache_row_ptr, q_ptr, k_ptr, v_ptr,
                              seq, heads, kv_heads, head_dim, qkv_stride,
                              k_sn, k_sh, k_sp, v_sn, v_sh, v_sp,
                              HALF: tl.constexpr):
        token = tl.program_id(0)  # n * seq + s
        head = tl.program_id(1)  # 0..heads-1: q; heads..heads+kv_heads-1: k (and v)
        n = token // seq
        s = token % seq
        position = tl.load(base_ptr + n) + s
        pair = tl.arange(0, HALF)
        inside = pair < head_dim // 2
        src = qkv_ptr + token * qkv_stride + head * head_dim + 2 * pair
        x0 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        x1 = tl.load(src + 1, mask=inside, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + position * (head_dim // 2) + pair, mask=inside, other=0.0)
        sin = tl.load(sin_ptr + position * (head_dim // 2) + pair, mask=inside, other=0.0)
        y0 = x0 * cos - x1 * sin
        y1 = x1 * cos + x0 * sin
        if head < heads:
            dst = q_ptr + ((n * heads + head) * seq + s) * head_dim + 2 * pair
            tl.store(dst, y0.to(q_ptr.dtype.element_ty), mask=inside)
            tl.store(dst + 1, y1.to(q_ptr.dtype.element_ty), mask=inside)
        else:
            kv = head - heads
            row = tl.load(cache_row_ptr + n)  # the cache row this token's keys and values go to
            dst = k_ptr + row * k_sn + kv * k_sh + position * k_sp + 2 * pair
            tl.store(dst, y0.to(k_ptr.dtype.element_ty), mask=inside)
            tl.store(dst + 1, y1.to(k_ptr.dtype.element_ty), mask=inside)
            v_src = qkv_ptr + token * qkv_stride + (heads + kv_heads + kv) * head_dim + 2 * pair
            v_dst = v_ptr + row * v_sn + kv * v_sh + position * v_sp + 2 * pair
            tl.store(v_dst, tl.load(v_src, mask=inside, other=0.0), mask=inside)
            tl.store(v_dst + 1, tl.load(v_src + 1, mask=inside, other=0.0), mask=inside)

    @triton.jit(do_not_specialize=["seq"])
    def _attention_chunk_kernel(q_ptr, k_ptr, v_ptr, base_ptr, cache_row_ptr, part_out_ptr, part_lse_ptr,
                                kv_heads, queries, seq, head_dim, chunk, scale,
                                k_sn, k_sh, k_sp, v_sn, v_sh, v_sp,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                IEEE: tl.constexpr):
        """Attention of the `queries` folded rows of one (row, KV head) over one chunk of keys."""
        pair = tl.program_id(0)  # n * kv_heads + kv
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        n = pair // kv_heads
        kv = pair % kv_heads
        row = tl.load(cache_row_ptr + n)  # the cache row whose keys this query row attends
        m_idx = tl.arange(0, BLOCK_M)
        d_idx = tl.arange(0, BLOCK_D)
        m_ok = m_idx < queries
        d_ok = d_idx < head_dim
        # folded query m = g * seq + s sees keys 0 .. base + s (its own position, inclusive)
        limit = tl.load(base_ptr + n) + (m_idx % seq) + 1
        limit = tl.where(m_ok, limit, 0)
        q = tl.load(q_ptr + (pair * queries + m_idx[:, None]) * head_dim + d_idx[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        start = split * chunk
        stop = tl.minimum(start + chunk, tl.max(limit, axis=0))
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for key0 in range(start, stop, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            k_ok = keys < stop
            k = tl.load(k_ptr + row * k_sn + kv * k_sh + keys[:, None] * k_sp + d_idx[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:  # fp32 models: no TF32 rounding of the inputs
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(keys[None, :] < limit[:, None], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(scores - safe[:, None])
            rescale = tl.exp(best - safe)
            total = total * rescale + tl.sum(p, axis=1)
            v = tl.load(v_ptr + row * v_sn + kv * v_sh + keys[:, None] * v_sp + d_idx[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        lse = tl.where(total > 0, best + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        part = (pair * splits + split) * BLOCK_M + m_idx
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + d_idx[None, :], out, mask=m_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=m_ok)

    @triton.jit
    def _attention_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, queries, head_dim, splits, part_stride,
                                BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_D: tl.constexpr):
        pair = tl.program_id(0)
        m = tl.program_id(1)
        s_idx = tl.arange(0, BLOCK_S)
        s_ok = s_idx < splits
        d_idx = tl.arange(0, MERGE_D)  # MERGE_D >= part_stride (the partials' padded head size)
        part = (pair * splits + s_idx) * BLOCK_M + m
        lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, axis=0)
        weight = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - top), 0.0)
        values = tl.load(part_out_ptr + part[:, None] * part_stride + d_idx[None, :],
                         mask=s_ok[:, None] & (d_idx[None, :] < part_stride), other=0.0)
        merged = tl.sum(values * weight[:, None], axis=0) / tl.sum(weight, axis=0)
        tl.store(out_ptr + (pair * queries + m) * head_dim + d_idx, merged.to(out_ptr.dtype.element_ty),
                 mask=d_idx < head_dim)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, width, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + width + cols, mask=inside, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _guided_logits_kernel(logits_ptr, logits_stride, forbidden_ptr, out_ptr, vocab, cfg_ptr, temperature_ptr,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr):
        song = tl.program_id(0)
        cfg_scale = tl.load(cfg_ptr + song)
        temperature = tl.load(temperature_ptr + song)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < vocab
        cond = tl.load(logits_ptr + (song * ROWS) * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
        if ROWS == 2:
            uncond = tl.load(logits_ptr + (song * ROWS + 1) * logits_stride + cols, mask=inside,
                             other=0.0).to(tl.float32)
            # a scale-1 song takes its conditional row as it is (the plain path's one-row song)
            guided = tl.where(cfg_scale > 1.0, uncond + cfg_scale * (cond - uncond), cond)
        else:
            guided = cond
        z = guided / temperature
        banned = tl.load(forbidden_ptr + cols, mask=inside, other=1) != 0
        tl.store(out_ptr + song * vocab + cols, tl.where(banned, float("-inf"), z), mask=inside)

    @triton.jit
    def _mix32(x):
        # sampling_noise._mix32 on int64 values in [0, 2**32): the same integers as the torch ops
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x4CA68B27) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _hashed_race(seed_ptr, frame_ptr, song, counters):
        """sampling_noise.race_noise for one song's row: Exponential(1) draws of (seed, frame, counter)."""
        seed = tl.load(seed_ptr + song)
        frame = tl.load(frame_ptr + song)
        lo = seed & 0xFFFFFFFF
        hi = (seed >> 32) & 0xFFFFFFFF
        key = _mix32(lo ^ _mix32((hi + 0x1E3779B9) & 0xFFFFFFFF))
        key = _mix32(key ^ ((frame * 0x1E3779B9) & 0xFFFFFFFF))
        bits = _mix32(_mix32(key ^ ((counters * 0x1E3779B9) & 0xFFFFFFFF)) ^ key)
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        return -tl.log(uniform)

    @triton.jit
    def _topk_race_kernel(z_ptr, noise_ptr, noise_stride, seed_ptr, frame_ptr, counter_base, code_ptr, row_ptr,
                          vocab, top_k_ptr, row_offset, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                          HASHED: tl.constexpr):
        """top_k_race for one song, whole row in registers: exact k-th largest by a radix select over
        order-preserving integer keys (32 counting steps), then keep z >= it, softmax, argmax(p / noise)
        (first index). HASHED: the noise is computed here from the song's seed and frame (no buffer)."""
        song = tl.program_id(0)
        top_k = tl.load(top_k_ptr + song).to(tl.int32)
        cols = tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(z_ptr + song * vocab + cols, mask=inside, other=float("-inf")) + 0.0  # -0.0 -> +0.0
        bits = z.to(tl.int32, bitcast=True)
        # float order -> signed int order (negative floats: flip the magnitude bits) -> unsigned order
        key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) ^ -2147483648).to(tl.uint32, bitcast=True)
        key = tl.where(inside, key, 0)  # padding sorts below every real value, -inf included
        # the k-th largest key, bit by bit from the top: the largest value with at least k keys >= it
        # (a 4-pass histogram radix select measured 64 us against 37 us for this on an H100)
        kth = tl.full([], 0, tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            candidate = kth | (1 << bit)
            enough = tl.sum((key >= candidate).to(tl.int32), axis=0) >= top_k
            kth = tl.where(enough, candidate, kth)
        keep = (key >= kth) & (z > float("-inf"))
        top = tl.max(tl.where(keep, z, float("-inf")), axis=0)
        weights = tl.where(keep, tl.exp(z - top), 0.0)
        total = tl.sum(weights, axis=0)
        if HASHED:
            race = _hashed_race(seed_ptr, frame_ptr, song, counter_base + cols.to(tl.int64))
        else:
            race = tl.load(noise_ptr + song * noise_stride + cols, mask=inside, other=1.0)
        scores = (weights / total) / race
        scores = tl.where(keep & (scores == scores), scores, float("-inf"))
        best = tl.max(scores, axis=0)
        code = tl.where(best > float("-inf"), tl.argmax(scores, axis=0), -1)
        tl.store(code_ptr + song, code.to(tl.int32))
        embed_row = tl.maximum(code, 0).to(tl.int64) + row_offset
        for r in tl.static_range(ROWS):
            tl.store(row_ptr + song * ROWS + r, embed_row)


# --------------------------------------------------------------------------------------------- launchers

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of every row of `x [M, D]` (last dim contiguous) -> `[M, D]` in x's dtype."""
    rows, dim = x.shape
    out = torch.empty((rows, dim), dtype=x.dtype, device=x.device) if out is None else out
    _rms_norm_kernel[(rows,)](x, scale, out, dim, eps, x.stride(0), out.stride(0), BLOCK=_pow2(dim),
                              num_warps=8 if dim >= 2048 else 4)
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
        HALF=max(SHARED_HALF, _pow2(head_dim // 2)), num_warps=2)
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
    part_out = torch.empty((pairs, splits, block_m, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((pairs, splits, block_m), dtype=torch.float32, device=q.device)
    _attention_chunk_kernel[(pairs, splits)](
        q, k_cache, v_cache, base, rows, part_out, part_lse, kv_heads, queries, seq, head_dim, chunk,
        1.0 / math.sqrt(head_dim),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    out = torch.empty_like(q)
    _attention_merge_kernel[(pairs, queries)](part_out, part_lse, out, queries, head_dim, splits, block_d,
                                              BLOCK_M=block_m, BLOCK_S=MAX_SPLITS,
                                              MERGE_D=max(SHARED_MERGE_D, block_d), num_warps=8)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[M, 2I]` (gate | up) -> silu(gate) * up `[M, I]`, each rounded to the input dtype as PyTorch does."""
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(width))
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block, num_warps=4)
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
        ROWS=rows, BLOCK=block, num_warps=4)
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
                                num_warps=num_warps or TOPK_WARPS if block >= 8192 else 4)
    return codes, embed_rows
