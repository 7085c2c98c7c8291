"""Our HeartMuLa module (run in float64) against an independent float64 reference written here.

The reference uses plain loops and einsum over the state-dict tensors and the spec's formulas
(§2.2 block, §2.3 RoPE, §4.3 decoder); it calls nothing from gpu_worker.model.heartmula.
"""
from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.checkpoints.heartmula_checkpoint import load_heartmula, write_tiny_heartmula
from gpu_worker.model.heartmula import apply_rotary_emb, precompute_freqs_cis

REL_TOL = 1e-6
VOCAB = 8197


@pytest.fixture(scope="module")
def lm64(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_heartmula(root, seed=3)
    return load_heartmula(root, dtype=torch.float64)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# ---- the reference ----

def ref_rope_frequencies(head_dim: int, base: float = 500000.0, factor: float = 32.0) -> tuple[list[float], list[str]]:
    freqs, branches = [], []
    for i in range(head_dim // 2):
        f = base ** (-2 * i / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < 8192 / 4:
            freqs.append(f), branches.append("unscaled")
        elif wavelength > 8192 / 1:
            freqs.append(f / factor), branches.append("divided")
        else:
            s = (8192 / wavelength - 1) / (4 - 1)
            freqs.append((1 - s) * f / factor + s * f), branches.append("smoothed")
    return freqs, branches


def ref_rope(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x [S, H, hd]; interleaved pairs (2i, 2i+1) rotated by position * f'_i."""
    freqs, _ = ref_rope_frequencies(x.shape[-1])
    out = torch.empty_like(x)
    for s, p in enumerate(positions):
        for i, f in enumerate(freqs):
            c, sn = math.cos(p * f), math.sin(p * f)
            a, b = x[s, :, 2 * i], x[s, :, 2 * i + 1]
            out[s, :, 2 * i] = a * c - b * sn
            out[s, :, 2 * i + 1] = b * c + a * sn
    return out


def ref_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def ref_layer(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, heads: int, kv_heads: int,
              positions: list[int]) -> torch.Tensor:
    """One pre-norm block on x [S, D] (causal over positions)."""
    seq, _ = x.shape
    head_dim = w[f"{prefix}.attn.q_proj.weight"].shape[0] // heads
    h = ref_rms_norm(x, w[f"{prefix}.sa_norm.scale"])
    q = torch.einsum("sd,od->so", h, w[f"{prefix}.attn.q_proj.weight"]).reshape(seq, heads, head_dim)
    k = torch.einsum("sd,od->so", h, w[f"{prefix}.attn.k_proj.weight"]).reshape(seq, kv_heads, head_dim)
    v = torch.einsum("sd,od->so", h, w[f"{prefix}.attn.v_proj.weight"]).reshape(seq, kv_heads, head_dim)
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    attn = torch.zeros(seq, heads, head_dim, dtype=x.dtype)
    for head in range(heads):
        kv = head // (heads // kv_heads)
        for s in range(seq):
            visible = [t for t in range(seq) if positions[t] <= positions[s]]
            scores = torch.stack([q[s, head] @ k[t, kv] for t in visible]) / math.sqrt(head_dim)
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            attn[s, head] = sum(wt * v[t, kv] for wt, t in zip(weights, visible))
    x = x + torch.einsum("so,do->sd", attn.reshape(seq, -1), w[f"{prefix}.attn.output_proj.weight"])
    h = ref_rms_norm(x, w[f"{prefix}.mlp_norm.scale"])
    gate = torch.einsum("sd,od->so", h, w[f"{prefix}.mlp.w1.weight"])
    up = torch.einsum("sd,od->so", h, w[f"{prefix}.mlp.w3.weight"])
    hidden = gate / (1 + torch.exp(-gate)) * up
    return x + torch.einsum("so,do->sd", hidden, w[f"{prefix}.mlp.w2.weight"])


def ref_stack(x: torch.Tensor, w: dict[str, torch.Tensor], stack: str, layers: int, heads: int, kv_heads: int
              ) -> torch.Tensor:
    positions = list(range(x.shape[0]))
    for i in range(layers):
        x = ref_layer(x, w, f"{stack}.layers.{i}", heads, kv_heads, positions)
    return ref_rms_norm(x, w[f"{stack}.norm.scale"])


# ---- RoPE ----

def test_tiny_head_dim_covers_all_three_scaling_branches():
    _, branches = ref_rope_frequencies(8)
    assert branches == ["unscaled", "unscaled", "smoothed", "divided"]


@pytest.mark.parametrize("head_dim, counts", [(128, (29, 6, 29)), (384, (85, 20, 87))])
def test_real_head_dims_split_into_the_spec_branch_counts(head_dim, counts):
    _, branches = ref_rope_frequencies(head_dim)
    assert (branches.count("unscaled"), branches.count("smoothed"), branches.count("divided")) == counts


@pytest.mark.parametrize("head_dim", [8, 128, 384])
def test_rope_table_matches_reference_frequencies(head_dim):
    freqs, _ = ref_rope_frequencies(head_dim)
    positions = [0, 1, 7, 100, 255]
    table = precompute_freqs_cis(head_dim, 256, dtype=torch.float64)
    expected = torch.tensor([[[math.cos(p * f), math.sin(p * f)] for f in freqs] for p in positions],
                            dtype=torch.float64)
    assert rel_error(table[positions], expected) <= REL_TOL


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(1, 5, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = [0, 3, 9, 40, 200]
    table = precompute_freqs_cis(8, 256, dtype=torch.float64)
    ours = apply_rotary_emb(x, table[positions])[0]
    assert rel_error(ours, ref_rope(x[0], positions)) <= REL_TOL


# ---- one backbone layer, full stacks, one decoder step ----

def test_one_backbone_layer_matches_reference(lm64):
    model = lm64.model
    model.setup_caches(1)
    weights = model.state_dict()
    x = torch.randn(1, 7, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(7)
    layer = model.backbone.layers[0]
    with torch.inference_mode():
        mask = model.backbone.attention_mask(positions, 7)
        ours = layer(x, model.backbone.freqs_cis[positions], positions, 7, mask)[0]
    ref = ref_layer(x[0], weights, "backbone.layers.0", heads=6, kv_heads=2, positions=list(range(7)))
    assert rel_error(ours, ref) <= REL_TOL


def test_backbone_decoding_with_cache_matches_reference_on_the_whole_sequence(lm64):
    model = lm64.model
    model.setup_caches(1)
    weights = model.state_dict()
    x = torch.randn(1, 6, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model.backbone_step(x[:, :5], torch.arange(5), kv_len=5)
        ours = model.backbone_step(x[:, 5:], torch.tensor([5]), kv_len=6)[0]
    ref = ref_stack(x[0], weights, "backbone", layers=2, heads=6, kv_heads=2)[-1]
    assert rel_error(ours, ref) <= REL_TOL


def test_codebook0_logits_match_reference(lm64):
    model = lm64.model
    weights = model.state_dict()
    last_h = torch.randn(2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours = model.codebook0_logits(last_h)
    ref = torch.einsum("bd,vd->bv", last_h, weights["codebook0_head.weight"])
    assert rel_error(ours, ref) <= REL_TOL


def _ref_decoder_logits(weights: dict[str, torch.Tensor], last_h: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """Logits of codebook len(codes) for one row: decoder over [proj(last_h), proj(e(c_0)), ..., proj(e(c_{j-1}))]."""
    inputs = [last_h] + [weights["audio_embeddings.weight"][k * VOCAB + c] for k, c in enumerate(codes)]
    x = torch.einsum("sd,od->so", torch.stack(inputs), weights["projection.weight"])
    h = ref_stack(x, weights, "decoder", layers=2, heads=4, kv_heads=2)[-1]
    return torch.einsum("d,dv->v", h, weights["audio_head"][len(codes) - 1])


def test_decoder_steps_match_reference_for_both_cfg_rows(lm64):
    model = lm64.model
    model.setup_caches(2)
    weights = model.state_dict()
    last_h = torch.randn(2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    c0, c1 = torch.tensor([17], dtype=torch.int32), torch.tensor([8000], dtype=torch.int32)
    with torch.inference_mode():
        first = model.decoder_first_logits(last_h, c0)
        second = model.decoder_next_logits(2, c1, batch_size=2)
    for row in range(2):  # the unconditional row runs on its own last_h with the shared codes
        assert rel_error(first[row], _ref_decoder_logits(weights, last_h[row], [17])) <= REL_TOL
        assert rel_error(second[row], _ref_decoder_logits(weights, last_h[row], [17, 8000])) <= REL_TOL
