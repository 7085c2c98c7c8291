"""One transformer block (gpu_worker/model/transformer_block.py) for the plain, eager fast and fused paths.

The plain `heartmula.TransformerBlock`, the fast path's eager block and its fused block all run
`transformer_block`, with their own ops and attention; on the same weights and positions the plain
block is the eager fast block bit for bit in fp32 (cos / sin RoPE tables: the complex ones may round
the last bit differently, see fast_generate). The fused kernels run through Triton's interpreter on a
machine without a GPU (tests/conftest.py), as in tests/test_fused_ops.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from gpu_worker.checkpoints.heartmula_checkpoint import TINY_FLAVORS
from gpu_worker.generation import fast_generate, fused_block
from gpu_worker.model import heartmula
from gpu_worker.model import transformer_block as tb
from gpu_worker.model.heartmula import HeartMuLaArgs, Transformer, TransformerBlock

ARGS = HeartMuLaArgs.from_flavors("tiny-backbone", "tiny-decoder", TINY_FLAVORS, text_vocab_size=384, muq_dim=16)
SLOTS = 16


def random_stack(seed: int = 0) -> Transformer:
    """The tiny backbone with random weights, norm scales included (ones would hide a swapped scale)."""
    stack = Transformer(ARGS.backbone)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in stack.named_parameters():
            fresh = torch.rand(param.shape, generator=gen) + 0.5 if name.endswith("scale") else \
                torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(fresh)
    stack.setup_caches(2, SLOTS, dtype=torch.float32, device=torch.device("cpu"))
    return stack


def layer_of(stack: Transformer, index: int = 0) -> TransformerBlock:
    layer = stack.layers[index]
    assert isinstance(layer, TransformerBlock)
    return layer


def fast_cache_writer(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, kv_len: int | None):
    """The fast path's kind of `write_kv`: a copy into its own buffers at `pos`, then the slots to attend."""
    def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache[:, :, pos] = k
        v_cache[:, :, pos] = v
        end = SLOTS if kv_len is None else kv_len
        return k_cache[:, :, :end], v_cache[:, :, :end]
    return write


def spy_on_the_block(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """Every module that runs a block calls `transformer_block` through its own name: record the ops each passes."""
    calls: list[type] = []
    real = tb.transformer_block

    def spy(x, w, args, ops, attend):
        calls.append(type(ops))
        return real(x, w, args, ops, attend)

    for module in (heartmula, fast_generate, fused_block):
        assert module.transformer_block is real  # the very function, not a copy
        monkeypatch.setattr(module, "transformer_block", spy)
    return calls


# ---- one block, three callers ----

def test_the_plain_block_and_the_eager_fast_block_both_run_transformer_block(monkeypatch):
    calls = spy_on_the_block(monkeypatch)
    stack = random_stack()
    layer = layer_of(stack)
    x = torch.randn(2, 3, ARGS.backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(3)
    with torch.inference_mode():
        layer(x, stack.freqs_cis[pos], pos, 3, stack.attention_mask(pos, 3))
        k_cache = torch.zeros_like(layer.attn.kv_cache.k_cache)
        rope = fast_generate._rope_at(fast_generate._cos_sin_tables(stack), (None, pos, None))
        fast_generate._block(x, tb.fuse_block_(layer), ARGS.backbone, rope,
                             fast_cache_writer(k_cache, k_cache.clone(), pos, 3), stack.attention_mask(pos, 3))
    assert calls == [tb.EagerOps, tb.EagerOps]
    assert isinstance(fused_block.FUSED_OPS, tb.BlockOps) and isinstance(tb.EAGER_OPS, tb.BlockOps)


def test_the_block_is_norm_project_attend_add_then_norm_project_swiglu_add_on_flat_rows():
    class Recording(tb.EagerOps):
        def __init__(self) -> None:
            self.seen: list[tuple[str, tuple[int, ...]]] = []

        def norm(self, x, scale, eps):
            self.seen.append(("norm", tuple(x.shape)))
            return super().norm(x, scale, eps)

        def project(self, x, w):
            self.seen.append(("project", tuple(x.shape)))
            return super().project(x, w)

        def add_project(self, residual, x, w):
            self.seen.append(("add_project", tuple(x.shape)))
            return super().add_project(residual, x, w)

        def swiglu(self, gate_up):
            self.seen.append(("swiglu", tuple(gate_up.shape)))
            return super().swiglu(gate_up)

    args = ARGS.backbone
    heads_width = args.num_heads * args.head_dim
    qkv_width = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
    w = tb.fuse_block_(layer_of(random_stack()))
    ops = Recording()
    attended: list[tuple[tuple[int, ...], int, int]] = []

    def attend(qkv: torch.Tensor, n: int, seq: int) -> torch.Tensor:
        attended.append((tuple(qkv.shape), n, seq))
        return qkv[:, :heads_width]

    x = torch.randn(2, 3, args.embed_dim)
    out = tb.transformer_block(x, w, args, ops, attend)
    rows, dim, inter = 6, args.embed_dim, args.intermediate_dim
    assert ops.seen == [("norm", (rows, dim)), ("project", (rows, dim)), ("add_project", (rows, heads_width)),
                        ("norm", (rows, dim)), ("project", (rows, dim)), ("swiglu", (rows, 2 * inter)),
                        ("add_project", (rows, inter))]
    assert attended == [((rows, qkv_width), 2, 3)]
    # by hand, the same ops on the unflattened rows
    flat = x.reshape(rows, dim)
    h = flat + torch.nn.functional.linear(torch.nn.functional.linear(tb.rms_norm(flat, w.sa_scale, args.norm_eps),
                                                                     w.wqkv)[:, :heads_width], w.wo)
    gate, up = torch.nn.functional.linear(tb.rms_norm(h, w.mlp_scale, args.norm_eps), w.w13).chunk(2, dim=-1)
    want = h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w.w2)
    assert out.shape == x.shape and torch.equal(out, want.view(2, 3, dim))


@pytest.mark.parametrize("case", ["prefill", "decode", "static"])
def test_the_plain_block_is_the_eager_fast_block_bit_for_bit_in_fp32(case):
    """Same weights, positions and mask: the plain path and the fast path compute one function."""
    stack = random_stack(seed=2)
    layer = layer_of(stack)
    gen = torch.Generator().manual_seed(3)
    dim = ARGS.backbone.embed_dim
    prefix = torch.randn(2, 5, dim, generator=gen)
    if case == "prefill":
        x, pos, kv_len = prefix, torch.arange(5), 5
    else:  # one new token after a 5-token prefix, over the filled slots or over all of them behind the mask
        x, pos, kv_len = torch.randn(2, 1, dim, generator=gen), torch.tensor([5]), (6 if case == "decode" else None)
    tables = fast_generate._cos_sin_tables(stack)
    with torch.inference_mode():
        if case != "prefill":  # both caches hold the same prefix
            layer(prefix, stack.freqs_cis[:5], torch.arange(5), 5, stack.attention_mask(torch.arange(5), 5))
        k_cache, v_cache = layer.attn.kv_cache.k_cache.clone(), layer.attn.kv_cache.v_cache.clone()
        mask = stack.attention_mask(pos, kv_len)
        plain = layer(x, stack.freqs_cis[pos], pos, kv_len, mask)
        fast = fast_generate._block(x, tb.fuse_block_(layer), ARGS.backbone,
                                    fast_generate._rope_at(tables, (None, pos, None)),
                                    fast_cache_writer(k_cache, v_cache, pos, kv_len), mask)
    assert torch.equal(plain, fast)
    assert torch.equal(layer.attn.kv_cache.k_cache, k_cache) and torch.equal(layer.attn.kv_cache.v_cache, v_cache)
    assert not torch.equal(plain, x)  # the block did something


# ---- the fused path ----

@pytest.fixture(scope="module")
def interpreted_or_cuda() -> str:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on the CPU")
    return "cuda"


@pytest.mark.parametrize("seq", [1, 2])
def test_the_fused_block_runs_transformer_block_with_the_kernels_and_matches_the_eager_block(
        interpreted_or_cuda, monkeypatch, seq):
    device = interpreted_or_cuda
    calls = spy_on_the_block(monkeypatch)
    stack = random_stack(seed=4).to(device)
    stack.setup_rope(dtype=torch.float32, device=torch.device(device))
    args = ARGS.backbone
    gen = torch.Generator().manual_seed(5)
    rows, capacity = 4, 64
    base = torch.tensor([0, 3, 9, 40], device=device)  # each row at its own position
    k_cache = torch.randn(rows, args.num_kv_heads, capacity, args.head_dim, generator=gen).to(device)
    v_cache = torch.randn(rows, args.num_kv_heads, capacity, args.head_dim, generator=gen).to(device)
    x = torch.randn(rows, seq, args.embed_dim, generator=gen).to(device)
    w = tb.fuse_block_(layer_of(stack))
    cos_sin = fast_generate._cos_sin_tables(stack)
    pos = base[:, None] + torch.arange(seq, device=device)  # [rows, seq]
    # the eager twin: the same rows, each attending to its own filled prefix through a mask
    slots = torch.arange(capacity, device=device)
    visible = slots[None, None, :] <= pos[:, :, None]  # [rows, seq, slots]
    mask = visible.repeat(1, args.num_heads // args.num_kv_heads, 1)[:, None]  # folded GQA: [rows, 1, G*S, slots]
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()

    def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for s in range(seq):
            eager_k[torch.arange(rows), :, pos[:, s]] = k[:, :, s]
            eager_v[torch.arange(rows), :, pos[:, s]] = v[:, :, s]
        return eager_k, eager_v

    with torch.inference_mode():
        eager = fast_generate._block(x, w, args, fast_generate._rope_at(cos_sin, (pos, None)), write, mask)
        fused = fused_block.fused_block(x.clone(), w, args, cos_sin, base, k_cache, v_cache, capacity,
                                        cache_rows=torch.arange(rows, device=device))
    assert calls == [tb.EagerOps, fused_block.FusedOps]
    # the kernels sum in their own order (the norm too): last-bit differences; the engine test in
    # tests/test_fused_ops.py checks that whole songs get the same tokens
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, eager_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache, eager_v, rtol=1e-5, atol=1e-5)
    written = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    written[torch.arange(rows, device=device)[:, None], pos] = True
    k_slots, v_slots = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [rows, slots, KV, hd]
    k_old, v_old = k_before.transpose(1, 2), v_before.transpose(1, 2)
    assert not torch.equal(k_slots[written], k_old[written])  # the new keys went in at each row's positions
    assert torch.equal(k_slots[~written], k_old[~written]) and torch.equal(v_slots[~written], v_old[~written])


# ---- fused weights of the plain path ----

def test_the_plain_block_fuses_its_weights_lazily_and_keeps_the_published_state_dict():
    stack = random_stack(seed=6)
    layer = layer_of(stack)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    assert layer.attn.fused_qkv is None and layer.mlp.fused_w13 is None  # nothing fused before the first forward
    pos = torch.arange(2)
    x = torch.randn(2, 2, ARGS.backbone.embed_dim)
    with torch.inference_mode():
        layer(x, stack.freqs_cis[pos], pos, 2, stack.attention_mask(pos, 2))
    after = layer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    w = tb.fuse_block_(layer)
    assert w.wqkv is layer.attn.fused_qkv and w.w13 is layer.mlp.fused_w13
    assert tb.fuse_block_(layer).wqkv is w.wqkv  # idempotent: no second copy
    q, k, v = (m.weight for m in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj))
    assert [t.data_ptr() for t in (q, k, v)] == [p.data_ptr() for p in w.wqkv.split([q.shape[0], k.shape[0],
                                                                                    v.shape[0]])]
    # loading a checkpoint copies into the views (fused under inference mode above), so the fused weights see it
    with torch.no_grad():
        layer.load_state_dict({**before, "attn.k_proj.weight": before["attn.k_proj.weight"] * 2})
    assert torch.equal(w.wqkv[q.shape[0]:q.shape[0] + k.shape[0]], before["attn.k_proj.weight"] * 2)


def test_the_plain_block_fuses_again_after_model_to():
    stack = random_stack(seed=7)
    layer = layer_of(stack)
    pos = torch.arange(2)
    x = torch.randn(2, 2, ARGS.backbone.embed_dim, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        fp32 = layer(x, stack.freqs_cis[pos], pos, 2, stack.attention_mask(pos, 2))
    old = layer.attn.fused_qkv
    stack.to(torch.float64)
    stack.setup_caches(2, SLOTS, dtype=torch.float64, device=torch.device("cpu"))
    with torch.inference_mode():
        fp64 = layer(x.double(), stack.freqs_cis[pos], pos, 2, stack.attention_mask(pos, 2))
    fused = layer.attn.fused_qkv
    assert fused is not old and fused.dtype == torch.float64
    assert layer.attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert fp64.dtype == torch.float64
    torch.testing.assert_close(fp64.float(), fp32, rtol=1e-4, atol=1e-5)


def test_a_loaded_checkpoint_has_its_projections_fused_with_the_published_names(tmp_path):
    from gpu_worker.checkpoints.heartmula_checkpoint import load_heartmula, write_tiny_heartmula

    write_tiny_heartmula(tmp_path, seed=3)
    model = load_heartmula(tmp_path).model
    for stack in (model.backbone, model.decoder):
        for layer in stack.layers:
            assert isinstance(layer, TransformerBlock)
            attn, mlp = layer.attn, layer.mlp
            assert attn.fused_qkv is not None and mlp.fused_w13 is not None
            assert attn.q_proj.weight.data_ptr() == attn.fused_qkv.data_ptr()
            assert mlp.w1.weight.data_ptr() == mlp.fused_w13.data_ptr()
            assert tb.fuse_block_(layer).wqkv is attn.fused_qkv  # the engine reuses them: no second copy
    assert not any(name.startswith("fused") or ".fused" in name for name in model.state_dict())
