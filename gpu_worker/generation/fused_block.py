"""The transformer block through the Triton kernels of `fused_ops`: the fast path's fused frame step.

The block is gpu_worker/model/transformer_block.py's `transformer_block`; this module gives it the
fused kernels as its ops and attention (the model package must not import the kernels).
"""
from __future__ import annotations

from functools import partial

import torch

from gpu_worker.kernels import fused_ops
from gpu_worker.model.model_flavors import TransformerArgs
from gpu_worker.model.transformer_block import BlockWeights, transformer_block


class FusedOps:
    """BlockOps through `fused_ops`: the residual adds are GEMMs with beta = 1 into the residual, in place
    (one rounding instead of two); a step of a few rows runs the skinny Triton GEMM."""

    # each method looks its launcher up in `fused_ops` when called, so a benchmark that swaps one is followed
    def norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return fused_ops.rms_norm(x, scale, eps)

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fused_ops.linear(x, w)

    def add_project(self, residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fused_ops.linear_add_(residual, x, w)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        return fused_ops.silu_mul(gate_up)


FUSED_OPS = FusedOps()


def fused_attention(qkv: torch.Tensor, n: int, seq: int, *, args: TransformerArgs,
                    tables: tuple[torch.Tensor, torch.Tensor], base: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, capacity: int, cache_rows: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """`Attend` through the kernels: RoPE and the KV writes in one, then split-K attention (no mask)."""
    heads, kv_heads, hd = args.num_heads, args.num_kv_heads, args.head_dim
    q = fused_ops.rope_to_cache(qkv.view(n, seq, -1), *tables, base, k_cache, v_cache, heads=heads,
                                kv_heads=kv_heads, head_dim=hd, cache_rows=cache_rows)
    out = fused_ops.decode_attention(q.view(n, kv_heads, (heads // kv_heads) * seq, hd), k_cache, v_cache, base,
                                     seq=seq, capacity=capacity, chunk=chunk, cache_rows=cache_rows)
    return out.view(n, heads, seq, hd).transpose(1, 2).reshape(n * seq, heads * hd)


def fused_block(x: torch.Tensor, w: BlockWeights, args: TransformerArgs, tables: tuple[torch.Tensor, torch.Tensor],
                base: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, capacity: int, *,
                cache_rows: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The block for a few new tokens per row through the kernels (CUDA graphs).

    `x [N, S, D]` sits at positions base[n] .. base[n] + S - 1 of cache row `cache_rows[n]` and is updated
    in place. `tables` are the fp32 cos and sin tables. Attention covers the first `capacity` cache slots
    in key chunks of `chunk`, each row up to its own position.
    """
    attend = partial(fused_attention, args=args, tables=tables, base=base, k_cache=k_cache, v_cache=v_cache,
                     capacity=capacity, cache_rows=cache_rows, chunk=chunk)
    return transformer_block(x, w, args, FUSED_OPS, attend)
