"""The Triton kernels of the fast frame step, on their own: this module imports Triton and never torch.

The launchers that size and call them from torch tensors are in gpu_worker/kernels/fused_ops.py, which
says what each kernel does. The kernels live apart so that a process compiling them ahead of the first
frame (gpu_worker/generation/compile_child.py) can do so without starting torch.
"""
from __future__ import annotations

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
    from triton.language.extra import cuda as tl_cuda
except ImportError:  # pragma: no cover - exercised on hosts without Triton
    triton = None
    tl = None
    tl_cuda = None


if triton is not None:

    @triton.jit
    def _wait_for_previous_grid(GDC: tl.constexpr):
        # Programmatic dependent launch (sm_90+): this grid may start while the previous kernel drains;
        # it waits here until that kernel's memory is visible, then lets the next kernel start early.
        if GDC:
            tl_cuda.gdc_wait()
            tl_cuda.gdc_launch_dependents()

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, eps, x_stride, out_stride, BLOCK: tl.constexpr, GDC: tl.constexpr):
        _wait_for_previous_grid(GDC)
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
                              HALF: tl.constexpr, GDC: tl.constexpr):
        _wait_for_previous_grid(GDC)
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
                                IEEE: tl.constexpr, DIRECT: tl.constexpr, GDC: tl.constexpr):
        """Attention of the `queries` folded rows of one (row, KV head) over one chunk of keys.

        DIRECT (a single chunk): the chunk's output is the attention itself, written in the model dtype to
        `part_out_ptr` as the merge kernel would write it (it would weigh the one chunk by exactly 1)."""
        _wait_for_previous_grid(GDC)
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
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        if DIRECT:
            # the merge of one chunk: out * 1 / 1, or 0 / 0 for a query that saw no key
            out = tl.where(total[:, None] > 0, out, float("nan"))
            tl.store(part_out_ptr + (pair * queries + m_idx[:, None]) * head_dim + d_idx[None, :],
                     out.to(part_out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        else:
            lse = tl.where(total > 0, best + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
            part = (pair * splits + split) * BLOCK_M + m_idx
            tl.store(part_out_ptr + part[:, None] * BLOCK_D + d_idx[None, :], out, mask=m_ok[:, None])
            tl.store(part_lse_ptr + part, lse, mask=m_ok)

    @triton.jit
    def _attention_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, queries, head_dim, splits, part_stride,
                                BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_D: tl.constexpr, GDC: tl.constexpr):
        _wait_for_previous_grid(GDC)
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

    # the row count is not specialised on: 16 rows (8 songs) would otherwise compile other kernels than
    # the one-slot warm-up traced (Triton keys integers by divisibility by 16 and the value 1)
    @triton.jit(do_not_specialize=["rows"])
    def _skinny_gemm_kernel(x_ptr, w_ptr, out_ptr, rows, n, k, x_stride, w_stride, out_stride,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            ADD: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr):
        """out[m, :] (+)= x[m, :] @ w.T for a tile of BLOCK_M rows and BLOCK_N output columns.

        The whole of K is reduced by one program, in order, with the row tile fixed: a row's result does
        not depend on which other rows share its launch. ADD accumulates onto out in fp32 and rounds
        once (addmm with beta = 1). EVEN: N and K are multiples of the blocks (no column masks)."""
        _wait_for_previous_grid(GDC)
        m_idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_idx = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_idx = tl.arange(0, BLOCK_K)
        m_ok = m_idx < rows
        n_ok = n_idx < n
        x_rows = x_ptr + m_idx[:, None] * x_stride
        w_rows = w_ptr + n_idx[:, None] * w_stride
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + k_idx
            if EVEN:
                a = tl.load(x_rows + cols[None, :], mask=m_ok[:, None], other=0.0)
                b = tl.load(w_rows + cols[None, :])
            else:
                k_ok = cols < k
                a = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:  # fp32 weights: no TF32 rounding of the inputs
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        target = out_ptr + m_idx[:, None] * out_stride + n_idx[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if ADD:
            acc += tl.load(target, mask=ok, other=0.0).to(tl.float32)
        tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, width, x_stride, out_stride, BLOCK: tl.constexpr, GDC: tl.constexpr):
        _wait_for_previous_grid(GDC)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + width + cols, mask=inside, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _guided_logits_kernel(logits_ptr, logits_stride, forbidden_ptr, out_ptr, vocab, cfg_ptr, temperature_ptr,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr):
        _wait_for_previous_grid(GDC)
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
                          HASHED: tl.constexpr, GDC: tl.constexpr):
        """top_k_race for one song, whole row in registers: exact k-th largest by a radix select over
        order-preserving integer keys (16 counting steps of two bits), then keep z >= it, softmax, argmax(p / noise)
        (first index). HASHED: the noise is computed here from the song's seed and frame (no buffer)."""
        _wait_for_previous_grid(GDC)
        song = tl.program_id(0)
        top_k = tl.load(top_k_ptr + song).to(tl.int32)
        cols = tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(z_ptr + song * vocab + cols, mask=inside, other=float("-inf")) + 0.0  # -0.0 -> +0.0
        bits = z.to(tl.int32, bitcast=True)
        # float order -> signed int order (negative floats: flip the magnitude bits) -> unsigned order
        key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) ^ -2147483648).to(tl.uint32, bitcast=True)
        key = tl.where(inside, key, 0)  # padding sorts below every real value, -inf included
        # the k-th largest key, two bits at a time from the top: the largest value with at least k keys >= it
        # (a 4-pass histogram radix select measured 64 us against 37 us for one bit a pass on an H100). Each
        # pass counts the keys >= the prefix with 01, 10 and 11 appended in one reduction (three 21-bit
        # counts packed in an int64) and keeps the largest with at least k. The loop stops early once exactly
        # k keys are >= the prefix found so far: the final value only grows, and at least k keys stay >= it,
        # so those k keys are the set it keeps anyway.
        kth = tl.full([], 0, tl.uint32)
        at_least = tl.full([], BLOCK, tl.int32)  # keys >= kth (every key is >= 0)
        shift = tl.full([], 30, tl.int32)
        while (shift >= 0) & (at_least != top_k):
            step = shift.to(tl.uint32)
            t1 = kth | (tl.full([], 1, tl.uint32) << step)
            t2 = kth | (tl.full([], 2, tl.uint32) << step)
            t3 = kth | (tl.full([], 3, tl.uint32) << step)
            packed = tl.sum((key >= t1).to(tl.int64) + ((key >= t2).to(tl.int64) << 21)
                            + ((key >= t3).to(tl.int64) << 42), axis=0)
            n1 = (packed & 0x1FFFFF).to(tl.int32)
            n2 = ((packed >> 21) & 0x1FFFFF).to(tl.int32)
            n3 = (packed >> 42).to(tl.int32)
            # the largest of the three prefixes with at least k keys (the counts only fall as the prefix rises)
            pick3, pick2, pick1 = n3 >= top_k, n2 >= top_k, n1 >= top_k
            kth = tl.where(pick3, t3, tl.where(pick2, t2, tl.where(pick1, t1, kth)))
            at_least = tl.where(pick3, n3, tl.where(pick2, n2, tl.where(pick1, n1, at_least)))
            shift -= 2
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
