"""The HeartMuLa transformer block, written once for every path that runs it.

`transformer_block` is the pre-norm Llama block of the spec. The plain path (heartmula.TransformerBlock),
the fast path's eager frame step and its Triton frame step (gpu_worker/generation/) all call it; they
differ only in the `BlockOps` they pass (`EAGER_OPS` here; the fused kernels live in
gpu_worker/generation/fused_block.py, because this package sits below the kernels) and in their
attention: `eager_attention` with the caller's RoPE and KV cache, or the fused kernels'.

The block works on flat rows `[N*S, D]`, because the fused kernels take matrices; the eager ops give
the same per-row numbers on either shape. Its weights are `BlockWeights`: q|k|v and w1|w3 fused into
one tensor each (`fuse_block_`), so each pair is one GEMM, while the modules' own parameters are views
of them and the state dict keeps the published names.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.model.model_flavors import TransformerArgs

if TYPE_CHECKING:  # heartmula imports this module; the annotations only name its classes
    from gpu_worker.model.heartmula import Transformer, TransformerBlock

# (flat qkv [N*S, (H + 2 KV) * hd], N, S) -> attention output [N*S, H * hd], before the output projection
Attend = Callable[[torch.Tensor, int, int], torch.Tensor]
# [N, S, heads, hd] -> the same, rotated at the caller's positions
RopeFn = Callable[[torch.Tensor], torch.Tensor]
# (k, v) [N, KV, S, hd] -> the keys and values to attend over, [N, KV, slots, hd] each
WriteKV = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BlockWeights:
    """One layer's weights as the block reads them: q|k|v rows in one tensor, w1 (gate) | w3 (up) in another."""

    wqkv: torch.Tensor
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    sa_scale: torch.Tensor
    mlp_scale: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for statistics and rotations, unless the model runs in float64 (numerical self-checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: statistics in fp32 (no weight inside), cast back, then the scale multiply."""
    # casting back before the multiply is the reference's order, which matters in bf16
    return F.rms_norm(x.to(compute_dtype(x.dtype)), (x.shape[-1],), eps=eps).to(x.dtype) * scale


@runtime_checkable
class BlockOps(Protocol):
    """The kernels of a block besides attention, on flat rows `[M, features]`."""

    def norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm` of every row."""
        ...

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T (F.linear without bias)."""
        ...

    def add_project(self, residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """residual + x @ w.T; an implementation may add into `residual` in place and return it."""
        ...

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the fused gate | up projection."""
        ...


class EagerOps:
    """BlockOps in plain PyTorch: the reference ops, and the CPU path."""

    def norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, scale, eps)

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def add_project(self, residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return residual + F.linear(x, w)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


EAGER_OPS = EagerOps()


def transformer_block(x: torch.Tensor, w: BlockWeights, args: TransformerArgs, ops: BlockOps,
                      attend: Attend) -> torch.Tensor:
    """One pre-norm block over `x [N, S, D]` -> `[N, S, D]`: attention, then SwiGLU, each added to its residual.

    With in-place `add_project` ops the result is written into `x` where `x` is contiguous.
    """
    n, seq, dim = x.shape
    eps = args.norm_eps
    flat = x.reshape(n * seq, dim)
    qkv = ops.project(ops.norm(flat, w.sa_scale, eps), w.wqkv)
    h = ops.add_project(flat, attend(qkv, n, seq), w.wo)
    gate_up = ops.project(ops.norm(h, w.mlp_scale, eps), w.w13)
    return ops.add_project(h, ops.swiglu(gate_up), w.w2).view(n, seq, dim)


def eager_attention(qkv: torch.Tensor, n: int, seq: int, *, args: TransformerArgs, rope: RopeFn,
                    write_kv: WriteKV, mask: torch.Tensor | None) -> torch.Tensor:
    """`Attend` in PyTorch: RoPE on q and k, k and v through `write_kv`, SDPA under `mask` (folded-GQA layout)."""
    heads, kv_heads, hd = args.num_heads, args.num_kv_heads, args.head_dim
    group = heads // kv_heads
    qkv = qkv.view(n, seq, -1)
    qk = rope(qkv[..., :(heads + kv_heads) * hd].view(n, seq, heads + kv_heads, hd))
    v = qkv[..., (heads + kv_heads) * hd:].view(n, seq, kv_heads, hd)
    keys, values = write_kv(qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2))
    # GQA without expanding the cache: query head h = kv * group + g uses KV head h // group, so the
    # `group` query heads of each KV head are folded into the query-length axis.
    q = qk[:, :, :heads].transpose(1, 2).reshape(n, kv_heads, group * seq, hd)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.reshape(n, heads, seq, hd).transpose(1, 2).reshape(n * seq, heads * hd)


# ------------------------------------------------------------------------------------------- fused weights

def fuse_block_(block: TransformerBlock) -> BlockWeights:
    """The block's `BlockWeights`; its q/k/v and w1/w3 parameters become views of the fused tensors.

    Idempotent: the fused tensors are made again only when a parameter is no longer their view (after
    `model.to(...)`, or a parameter replaced). Inference only: the block reads the fused tensors, so
    the views are not trainable.
    """
    attn, mlp = block.attn, block.mlp
    attn.fused_qkv = _fused(attn.fused_qkv, (attn.q_proj, attn.k_proj, attn.v_proj))
    mlp.fused_w13 = _fused(mlp.fused_w13, (mlp.w1, mlp.w3))
    return BlockWeights(attn.fused_qkv, attn.output_proj.weight, mlp.fused_w13, mlp.w2.weight,
                        block.sa_norm.scale, block.mlp_norm.scale)


def fuse_projections_(stack: Transformer) -> list[BlockWeights]:
    """`fuse_block_` for every layer of `stack`, in order."""
    return [fuse_block_(cast("TransformerBlock", layer)) for layer in stack.layers]


def _fused(current: torch.Tensor | None, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """`current` while the weights of `linears` are its row blocks, in order; else their concatenation,
    with every module's weight rebound to its block of it."""
    weights = [m.weight for m in linears]
    sizes = [wt.shape[0] for wt in weights]
    if current is not None and _holds(current, weights):
        return current
    # made outside inference mode (generation runs in it): parameters that were inference tensors would
    # refuse a later load_state_dict
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat(weights)
        for module, view in zip(linears, fused.split(sizes)):
            module.weight = nn.Parameter(view, requires_grad=False)
    return fused


def _holds(fused: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    if sum(wt.shape[0] for wt in weights) != fused.shape[0]:
        return False
    parts = fused.split([wt.shape[0] for wt in weights])
    # the dtype and device as well: meta tensors all report data pointer 0
    return all(wt.data_ptr() == part.data_ptr() and wt.shape == part.shape and wt.dtype == part.dtype
               and wt.device == part.device for wt, part in zip(weights, parts))
