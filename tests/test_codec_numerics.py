"""Codec numerics against independent float64 arithmetic, and the window/cross-fade bookkeeping (§7.3-7.6)."""
from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.model.heartcodec import (
    HOP_SAMPLES,
    OVERLAP_SAMPLES,
    PREFIX_LATENTS,
    SAMPLES_PER_FRAME,
    WINDOW_LATENTS,
    WINDOW_SAMPLES,
    HeartCodec,
    HeartCodecConfig,
    TransformerBlock,
    build_random_heartcodec,
    overlap_add,
    plan_windows,
    rope_cos_sin,
    timestep_features,
)

# ------------------------------------------------------------------ an estimator block, written out in float64

def reference_block(x: torch.Tensor, mod: torch.Tensor, w: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """One DiT block from the spec text (§7.4), using complex numbers for the interleaved RoPE."""
    batch, seq, dim = x.shape
    hd = dim // heads
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
        (w["scale_shift_table"] + mod)[:, i:i + 1] for i in range(6))

    def rms_norm(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6)

    def rope(t: torch.Tensor) -> torch.Tensor:
        inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
        rotation = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
        pairs = torch.view_as_complex(t.reshape(batch, seq, heads, hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation).reshape(batch, seq, heads, hd)

    h = rms_norm(x, w["attn_norm.weight"]) * (1 + scale_a) + shift_a
    q = rope((h @ w["attn.q_proj.weight"].T).reshape(batch, seq, heads, hd))
    k = rope((h @ w["attn.k_proj.weight"].T).reshape(batch, seq, heads, hd))
    v = (h @ w["attn.v_proj.weight"].T).reshape(batch, seq, heads, hd)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), dim=-1)
    attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, dim) @ w["attn.o_proj.weight"].T
    x = x + gate_a * attn
    h = rms_norm(x, w["mlp_norm.weight"]) * (1 + scale_m) + shift_m
    gate = h @ w["mlp.gate.weight"].T
    mlp = (gate * torch.sigmoid(gate) * (h @ w["mlp.up.weight"].T)) @ w["mlp.down.weight"].T
    return x + gate_m * mlp


@pytest.mark.parametrize("dim, heads", [(16, 2), (48, 3)])
def test_estimator_block_matches_float64_reference(dim, heads):
    gen = torch.Generator().manual_seed(dim)
    block = TransformerBlock(dim, heads).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.3)
        block.attn_norm.weight.add_(1.0)
        block.mlp_norm.weight.add_(1.0)
    x = torch.randn(2, 12, dim, generator=gen, dtype=torch.float64)
    mod = torch.randn(2, 6, dim, generator=gen, dtype=torch.float64) * 0.5
    weights = {name: t.detach() for name, t in block.state_dict().items()}
    hidden = 256 * math.ceil(int(8 * dim / 3) / 256)
    assert weights["mlp.gate.weight"].shape == (hidden, dim)

    expected = reference_block(x, mod, weights, heads)
    with torch.no_grad():
        got = block(x, mod, rope_cos_sin(12, dim // heads, device=x.device, dtype=torch.float64))
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-6


def test_timestep_features_put_cosines_first():
    features = timestep_features(torch.tensor([0.0, 0.5]))
    assert features.shape == (2, 512) and features.dtype == torch.float32
    assert torch.equal(features[0], torch.cat([torch.ones(256), torch.zeros(256)]))
    assert features[1, 0].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    assert features[1, 256].item() == pytest.approx(math.sin(500.0), abs=1e-4)
    freq_255 = math.exp(-math.log(10000.0) * 255 / 256)
    assert features[1, 255].item() == pytest.approx(math.cos(500.0 * freq_255), abs=1e-5)


# ------------------------------------------------------------------------------- published sizes (meta device)

def test_published_config_builds_the_published_parameter_counts():
    with torch.device("meta"):
        model = HeartCodec(HeartCodecConfig.published())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # the published counts include the weight-norm g of the 57 folded layers (its dim-0 size each)
    folded_g = sum(dict(model.named_modules())[layer].weight.shape[0] for layer in model.weight_norm_layers())
    fm = model.flow_matching
    assert count(fm.estimator) == 1_486_920_192
    assert count(model.scalar_model) + folded_g == 83_784_821
    assert count(fm.vq_embed) == 2_097_152 + 16_896
    assert count(fm.cond_feature_emb) == 262_656
    assert count(model) + folded_g == 1_573_082_229
    assert len(model.state_dict()) == 506 and len(model.weight_norm_layers()) == 57
    assert HeartCodecConfig.published().sq_channels == [2048, 1024, 512, 256, 128, 64]
    state = model.state_dict()
    assert state["flow_matching.estimator.transformer_blocks.0.mlp.gate.weight"].shape == (4096, 1536)
    assert state["flow_matching.estimator.transformer_blocks_2.5.mlp.down.weight"].shape == (3072, 8192)
    assert state["flow_matching.estimator.adaln_single_2.linear.weight"].shape == (18432, 3072)
    assert state["flow_matching.estimator.connection_proj.ffn_1.weight"].shape == (3072, 2560, 3)
    assert state["scalar_model.decoder.1.up_conv.layer.weight"].shape == (2048, 1024, 10)
    assert state["scalar_model.decoder.5.convs.4.conv1.weight"].shape == (64, 64, 7)
    assert state["scalar_model.decoder.7.weight"].shape == (1, 64, 7)


# ------------------------------------------------------------------------------------------ windows, cross-fade

@pytest.mark.parametrize("frames, padded, windows", [
    (1, 372, 1), (372, 372, 1), (373, 692, 2), (424, 692, 2), (692, 692, 2), (693, 1012, 3), (3000, 3252, 10)])
def test_window_plan_pads_to_whole_windows(frames, padded, windows):
    plan = plan_windows(frames)
    assert (plan.padded_frames, plan.num_windows) == (padded, windows)
    assert plan.output_samples == padded * SAMPLES_PER_FRAME >= plan.cropped_samples == frames * SAMPLES_PER_FRAME
    assert plan.window(windows - 1).stop == padded


def test_window_constants():
    assert (WINDOW_LATENTS, PREFIX_LATENTS) == (744, 104)
    assert (WINDOW_SAMPLES, HOP_SAMPLES, OVERLAP_SAMPLES) == (1_428_480, 1_228_800, 199_680)


def test_overlap_add_cross_fades_linearly_over_the_overlap():
    out = torch.full((2, HOP_SAMPLES + WINDOW_SAMPLES), float("nan"))
    overlap_add(out, torch.ones(2, WINDOW_SAMPLES), 0)
    overlap_add(out, torch.zeros(2, WINDOW_SAMPLES), 1)
    ramp = 1 - torch.linspace(0, 1, OVERLAP_SAMPLES, dtype=torch.float64)
    assert torch.equal(out[:, :HOP_SAMPLES], torch.ones(2, HOP_SAMPLES))
    assert torch.equal(out[:, HOP_SAMPLES:HOP_SAMPLES + OVERLAP_SAMPLES], ramp.float().expand(2, -1))
    assert torch.equal(out[:, HOP_SAMPLES + OVERLAP_SAMPLES:], torch.zeros(2, WINDOW_SAMPLES - OVERLAP_SAMPLES))


# ------------------------------------------------------------------------------------ solver and SQ decoder

@pytest.fixture(scope="module")
def tiny() -> HeartCodec:
    return build_random_heartcodec(HeartCodecConfig.tiny(), seed=0)


def test_solver_evaluates_ten_accumulated_timesteps_and_restores_the_prefix(tiny, monkeypatch):
    seen: list[torch.Tensor] = []
    estimator_forward = tiny.flow_matching.estimator.forward

    def spy(x, t):
        seen.append(t.clone())
        return estimator_forward(x, t)

    monkeypatch.setattr(tiny.flow_matching.estimator, "forward", spy)
    codes = torch.randint(0, 8192, (8, 372), generator=torch.Generator().manual_seed(0))
    prefix = torch.randn(PREFIX_LATENTS, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        latents = tiny.flow_matching.solve(tiny.flow_matching.conditioning(codes), prefix, torch.Generator())
    t, dt = torch.tensor(0.0), torch.tensor(0.1)
    expected = []
    for step in range(1, 11):  # the reference's fp32 accumulation
        expected.append(t.item())
        t = t + dt
        if step < 10:
            dt = torch.linspace(0, 1, 11)[step + 1] - t
    assert [s[0].item() for s in seen] == expected
    assert all(s.shape == (2,) and s[0] == s[1] for s in seen)
    assert latents.shape == (744, 16)
    assert torch.equal(latents[:PREFIX_LATENTS], prefix)


def test_conditioning_repeats_each_code_frame_for_two_latent_frames(tiny):
    codes = torch.randint(0, 8192, (8, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mu = tiny.flow_matching.conditioning(codes)
        fm = tiny.flow_matching
        summed = sum(fm.vq_embed.layers[q]._codebook.embed[0, codes[q, 3]] for q in range(8))
        frame_3 = fm.cond_feature_emb(fm.vq_embed.project_out(summed))
    assert mu.shape == (10, 32)
    assert torch.equal(mu[6], mu[7])
    torch.testing.assert_close(mu[6], frame_3)


def test_sq_decoder_upsamples_1920x_and_splits_stereo_by_channel_halves(tiny):
    latents = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    changed = latents.clone()
    changed[:, 8:] += 1.0  # only stream 1 (channels 8..15 at tiny size) changes
    with torch.inference_mode():
        audio, audio_changed = tiny.scalar_model.decode(latents), tiny.scalar_model.decode(changed)
    assert audio.shape == (2, 6 * 1920)
    assert torch.equal(audio[0], audio_changed[0]) and not torch.equal(audio[1], audio_changed[1])


def test_sq_decoder_quantises_latents_to_ninths(tiny):
    grid = torch.randint(-18, 18, (6, 16), generator=torch.Generator().manual_seed(0)) / 9
    nudged = grid + (torch.rand(6, 16, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.1  # |d| < 1/18
    with torch.inference_mode():
        assert torch.equal(tiny.scalar_model.decode(grid), tiny.scalar_model.decode(nudged))


def test_sq_decoder_is_causal_apart_from_two_latent_frames_of_look_ahead(tiny):
    latents = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    changed = latents.clone()
    changed[5] += 1.0
    with torch.inference_mode():
        audio, audio_changed = tiny.scalar_model.decode(latents), tiny.scalar_model.decode(changed)
    first_affected = (audio != audio_changed).any(0).nonzero()[0].item()
    # frame 5 reaches back through the k=5 centred first conv to frame 3 and no further; which sample of
    # frame 3 is the first to differ depends on rounding (an early sample may change by less than an ulp)
    assert 3 * 1920 <= first_affected < 4 * 1920
