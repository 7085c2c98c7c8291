"""The fast path's Triton kernels (gpu_worker/kernels/fused_ops.py) against their eager twins.

On a machine without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, numpy
on the CPU): the same kernel code, so indexing, masking, the split-K merge and the sampling race are
checked here; on a CUDA machine the same tests also run compiled on the GPU (bf16 where the model
runs in bf16). The engine-level test checks that a song through the fused frame step gets the very
tokens of the eager fast path (fp32, so no rounding may differ).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")  # a test dependency (setup.cfg [test]); CUDA builds of torch bundle it

import torch.nn.functional as F  # noqa: E402

from gpu_worker.generation.generate import forbidden_ids_mask, top_k_race  # noqa: E402
from tests import model_fixtures  # noqa: E402
from tests.model_fixtures import EOS, VOCAB, tiny_params, tiny_prompts  # noqa: E402,F401

lm = model_fixtures.lm  # the tiny checkpoint (a module-scoped fixture)

# Without a GPU the kernels are interpreted on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
# there); with one they are compiled for CUDA tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else ["cuda"]


@pytest.fixture(scope="module")
def fo():
    from gpu_worker.kernels import fused_ops
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.fail("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on the CPU")
    return fused_ops


def _tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def _cases():
    return [("cpu", torch.float32)] if INTERPRETED else [("cuda", torch.float32), ("cuda", torch.bfloat16)]


@pytest.mark.parametrize("device, dtype", _cases())
def test_rms_norm_matches_the_model_norm_on_strided_rows(fo, device, dtype):
    from gpu_worker.generation.fast_generate import _rms_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 48, generator=gen).to(device, dtype) * 3
    scale = (torch.rand(48, generator=gen) + 0.5).to(device, dtype)
    rows = x[:, -1]  # stride 96: the last position of every row
    torch.testing.assert_close(fo.rms_norm(rows, scale, 1e-5), _rms_norm(rows, scale, 1e-5), **_tolerance(dtype))


@pytest.mark.parametrize("device, dtype", _cases())
@pytest.mark.parametrize("seq", [1, 2])
def test_rope_to_cache_rotates_q_and_k_and_writes_k_v_at_each_rows_position(fo, device, dtype, seq):
    from gpu_worker.generation.fast_generate import _rope
    from gpu_worker.model.heartmula import precompute_freqs_cis

    heads, kv_heads, hd, rows, slots = 6, 2, 8, 4, 32
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, seq, (heads + 2 * kv_heads) * hd, generator=gen).to(device, dtype)
    table = precompute_freqs_cis(hd, 64, device=device)
    cos, sin = table[..., 0].contiguous(), table[..., 1].contiguous()
    base = torch.tensor([3, 3, 17, 17], device=device)
    k_cache = torch.zeros(rows, kv_heads, slots, hd, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    q = fo.rope_to_cache(qkv, cos, sin, base, k_cache, v_cache, heads=heads, kv_heads=kv_heads, head_dim=hd)

    positions = base[:, None] + torch.arange(seq, device=device)  # [rows, seq]
    rope = (cos[positions][:, :, None], sin[positions][:, :, None])
    parts = qkv.view(rows, seq, heads + 2 * kv_heads, hd)
    want_q = _rope(parts[:, :, :heads], *rope).transpose(1, 2)
    want_k = _rope(parts[:, :, heads:heads + kv_heads], *rope)
    torch.testing.assert_close(q, want_q, **_tolerance(dtype))
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    for row in range(rows):
        for s in range(seq):
            p = int(positions[row, s])
            written[row, :, p] = True
            torch.testing.assert_close(k_cache[row, :, p], want_k[row, s], **_tolerance(dtype))
            assert torch.equal(v_cache[row, :, p], parts[row, s, heads + kv_heads:])
    assert not k_cache[~written].any() and not v_cache[~written].any()  # nothing else was touched


def _reference_attention(q, k_cache, v_cache, base, seq):
    """SDPA per row over its filled prefix, in the folded-GQA layout (query g * S + s sees 0..base + s)."""
    rows, kv_heads, queries, hd = q.shape
    out = torch.empty_like(q)
    for row in range(rows):
        limit = int(base[row]) + seq
        keys, values = k_cache[row:row + 1, :, :limit], v_cache[row:row + 1, :, :limit]
        s_of = torch.arange(queries, device=q.device) % seq
        mask = torch.arange(limit, device=q.device)[None, :] <= (int(base[row]) + s_of)[:, None]
        out[row] = F.scaled_dot_product_attention(q[row:row + 1].float(), keys.float(), values.float(),
                                                  attn_mask=mask)[0].to(q.dtype)
    return out


@pytest.mark.parametrize("device, dtype", _cases())
@pytest.mark.parametrize("seq, capacity, splits", [(1, 256, None), (1, 256, 3), (2, 8, None), (1, 64, 1)])
def test_split_k_decode_attention_matches_sdpa_over_each_rows_filled_prefix(fo, device, dtype, seq, capacity,
                                                                            splits):
    rows, kv_heads, group, hd = 4, 2, 3, 8
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.randn(rows, kv_heads, capacity + 16, hd, generator=gen).to(device, dtype)
    v_cache = torch.randn(rows, kv_heads, capacity + 16, hd, generator=gen).to(device, dtype)
    q = torch.randn(rows, kv_heads, group * seq, hd, generator=gen).to(device, dtype)
    high = capacity - seq
    base = torch.tensor([0, 5, high // 2, high], device=device)  # different fills, one at the very end
    got = fo.decode_attention(q, k_cache, v_cache, base, seq=seq, capacity=capacity, splits=splits)
    torch.testing.assert_close(got, _reference_attention(q, k_cache, v_cache, base, seq), **_tolerance(dtype))


@pytest.mark.parametrize("device, dtype", _cases())
def test_silu_mul_rounds_like_pytorch(fo, device, dtype):
    gate_up = (torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(3)) * 4).to(device, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fo.silu_mul(gate_up), F.silu(gate) * up, **_tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, cfg_scale, temperature, top_k", [(2, 1.5, 1.0, 50), (1, 1.0, 0.7, 3), (2, 3.0, 1.3, 1),
                                                                 (1, 1.0, 1.0, VOCAB)])
def test_guided_logits_and_topk_race_pick_exactly_the_eager_samplers_ids(fo, device, rows, cfg_scale, temperature,
                                                                         top_k):
    songs = 3
    gen = torch.Generator().manual_seed(4)
    padded = torch.randn(songs * rows, VOCAB + 123, generator=gen) * 2  # a view of wider rows, as the engine's
    logits = padded.to(device)[:, :VOCAB]
    noise = torch.empty(songs, VOCAB).exponential_(1.0, generator=gen).to(device)
    forbidden = forbidden_ids_mask(VOCAB, EOS, device=device)
    z = fo.guided_logits(logits, forbidden.to(torch.int8), rows=rows, cfg_scale=per_song(cfg_scale, songs, device),
                         temperature=per_song(temperature, songs, device))
    codes, embed_rows = fo.topk_race_sample(z, noise, top_k=per_song(top_k, songs, device), rows=rows,
                                            row_offset=2 * VOCAB)

    if rows == 2:
        pairs = logits.reshape(songs, 2, VOCAB)
        guided = pairs[:, 1] + cfg_scale * (pairs[:, 0] - pairs[:, 1])
    else:
        guided = logits
    exact = {"rtol": 0, "atol": 0} if INTERPRETED else {"rtol": 1e-6, "atol": 1e-6}  # the GPU may fuse a*b+c
    torch.testing.assert_close(z, (guided / temperature).masked_fill(forbidden, float("-inf")), **exact)
    want = top_k_race(guided, noise, temperature=temperature, top_k=top_k, forbidden=forbidden)
    assert torch.equal(codes, want)
    assert torch.equal(embed_rows, (want.long() + 2 * VOCAB).repeat_interleave(rows))


def per_song(value, songs, device):
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    return torch.full((songs,), value, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_each_song_gets_its_own_cfg_scale_temperature_and_top_k(fo, device):
    """The batching engine's frame step: per-song settings in one launch, as the per-row eager sampler."""
    songs = 4
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(songs * 2, VOCAB, generator=gen) * 2).to(device)
    noise = torch.empty(songs, VOCAB).exponential_(1.0, generator=gen).to(device)
    forbidden = forbidden_ids_mask(VOCAB, EOS, device=device)
    cfg = torch.tensor([1.0, 1.5, 3.0, 1.0], device=device)
    temperature = torch.tensor([0.7, 1.0, 1.3, 2.0], device=device)
    top_k = torch.tensor([1, 50, VOCAB, 3], device=device)
    z = fo.guided_logits(logits, forbidden.to(torch.int8), rows=2, cfg_scale=cfg, temperature=temperature)
    codes, _ = fo.topk_race_sample(z, noise, top_k=top_k, rows=2, row_offset=0)
    pairs = logits.reshape(songs, 2, VOCAB)
    guided = torch.where(cfg[:, None] > 1, pairs[:, 1] + cfg[:, None] * (pairs[:, 0] - pairs[:, 1]), pairs[:, 0])
    exact = {"rtol": 0, "atol": 0} if INTERPRETED else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(z, (guided / temperature[:, None]).masked_fill(forbidden, float("-inf")), **exact)
    assert torch.equal(z[0], logits[0].float().masked_fill(forbidden, float("-inf")) / 0.7)  # scale 1: cond row
    for song in range(songs):  # each row as the one-song sampler with that song's settings
        want = top_k_race(guided[song:song + 1], noise[song:song + 1], temperature=float(temperature[song]),
                          top_k=int(top_k[song]), forbidden=forbidden)
        assert int(codes[song]) == int(want)


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernels_hashed_draws_pick_what_the_noise_buffer_of_sampling_noise_picks(fo, device):
    """The fused frame step hashes its draws in the sampling kernel; they must be race_noise's numbers."""
    from gpu_worker.generation.sampling_noise import race_noise

    songs = 3
    z = (torch.randn(songs, VOCAB, generator=torch.Generator().manual_seed(8)) * 3).to(device)
    seeds = torch.tensor([0, 12345, 2**63 - 1], device=device)
    frames = torch.tensor([0, 7, 2999], device=device)
    top_k = torch.tensor([VOCAB, 50, 200], device=device)
    noise = race_noise(seeds, frames, 8, VOCAB)
    for codebook in (0, 3, 7):
        hashed, _ = fo.topk_race_sample(z, None, top_k=top_k, rows=1, row_offset=0, hashed=(seeds, frames, codebook))
        buffered, _ = fo.topk_race_sample(z, noise[:, codebook], top_k=top_k, rows=1, row_offset=0)
        assert torch.equal(hashed, buffered), f"codebook {codebook}"


@pytest.mark.parametrize("device", DEVICES)
def test_topk_race_keeps_ties_and_negative_values_like_torch_topk(fo, device):
    """The k-th largest by integer keys must agree with torch.topk on negatives, -0.0 / 0.0 and ties."""
    z = torch.full((3, VOCAB), float("-inf"))
    z[0, :6] = torch.tensor([-3.0, -1.0, -2.0, -1.0, -0.5, -7.0])  # k = 3: -1.0 is 3rd, tied -> both kept
    z[1, :4] = torch.tensor([0.0, -0.0, 2.0, 0.0])  # k = 2: 0.0 is 2nd; -0.0 equals it
    z[2, 100:110] = torch.linspace(-4, 4, 10)  # k = 3 over 10 finite values
    noise = torch.empty(3, VOCAB).exponential_(1.0, generator=torch.Generator().manual_seed(9))
    for k in (1, 2, 3):
        codes, _ = fo.topk_race_sample(z.to(device), noise.to(device), top_k=per_song(k, 3, device), rows=1,
                                       row_offset=0)
        want = top_k_race(z, noise, temperature=1.0, top_k=k, forbidden=torch.zeros(VOCAB, dtype=torch.bool))
        assert codes.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_race_returns_minus_one_when_nothing_is_eligible_like_the_eager_sampler(fo, device):
    z = torch.full((2, VOCAB), float("-inf"))
    z[1, 7], z[1, 9] = float("nan"), 5.0  # torch.topk ranks NaN first, so k = 1 keeps nothing
    noise = torch.ones(2, VOCAB)
    codes, embed_rows = fo.topk_race_sample(z.to(device), noise.to(device), top_k=per_song(1, 2, device), rows=1,
                                            row_offset=0)
    want = top_k_race(z, noise, temperature=1.0, top_k=1, forbidden=torch.zeros(VOCAB, dtype=torch.bool))
    assert codes.cpu().tolist() == want.tolist() == [-1, -1]
    assert embed_rows.tolist() == [0, 0]  # a -1 frame is discarded; its embedding row is clamped to 0


def no_eos_on(model):
    eos = torch.tensor([EOS], device=model.device)
    return lambda frame, codebook, logits: logits.index_fill(-1, eos, float("-inf"))


def test_a_song_through_the_fused_frame_step_gets_the_eager_fast_paths_tokens(fo, lm):
    from gpu_worker.generation.fast_generate import generate_fast, release_engines

    model = lm.model if INTERPRETED else copy.deepcopy(lm.model).to("cuda")
    prompt = tiny_prompts(lm, 1)[0]
    params = dataclasses.replace(tiny_params(3), cfg_scale=1.5)
    results = []
    for fused in (False, True):
        results.append(generate_fast(model, prompt, params, seeds=[21], logits_hook=no_eos_on(model),
                                     fused_kernels=fused)[0])
        release_engines()
    eager, fused = results
    assert fused.frames.shape == (8, 3)
    assert torch.equal(fused.frames, eager.frames)


@pytest.mark.parametrize("device, dtype", _cases())
def test_with_a_fixed_chunk_each_rows_attention_is_the_same_bits_at_any_capacity_and_through_any_cache_row(
        fo, device, dtype):
    """What batch invariance needs from attention: the bucket (set by the longest song in the batch)
    only adds empty chunks, and a row pointed at another row's cache gets that row's numbers."""
    rows, kv_heads, group, hd, slots = 4, 2, 3, 16, 512
    gen = torch.Generator().manual_seed(4)
    k_cache = torch.randn(rows, kv_heads, slots, hd, generator=gen).to(device, dtype)
    v_cache = torch.randn(rows, kv_heads, slots, hd, generator=gen).to(device, dtype)
    q = torch.randn(rows, kv_heads, group, hd, generator=gen).to(device, dtype)
    base = torch.tensor([3, 70, 130, 200], device=device)
    chunk = fo.attention_chunk(slots, rows * kv_heads, target_programs=64)
    assert 64 <= chunk < 256 and chunk % 64 == 0  # several chunks below the smallest capacity tried
    at = {capacity: fo.decode_attention(q, k_cache, v_cache, base, seq=1, capacity=capacity, chunk=chunk)
          for capacity in (256, 384, 512)}
    assert torch.equal(at[256], at[384]) and torch.equal(at[256], at[512])
    torch.testing.assert_close(at[256], _reference_attention(q, k_cache, v_cache, base, 1), **_tolerance(dtype))
    pointed = torch.tensor([2, 2, 2, 2], device=device)  # every row reads row 2's cache at its own position
    same_q = q[2:3].expand(rows, -1, -1, -1).contiguous()
    got = fo.decode_attention(same_q, k_cache, v_cache, torch.full_like(base, 130), seq=1, capacity=512,
                              chunk=chunk, cache_rows=pointed)
    assert all(torch.equal(got[i], at[512][2]) for i in range(rows))


@pytest.mark.parametrize("device, dtype", _cases())
def test_one_chunk_written_without_the_merge_is_the_merge_of_that_chunk_and_an_empty_one(fo, device, dtype):
    """The decoder's attention fits one key chunk, so its kernel writes the output itself: the same bits
    as when a longer capacity adds an empty chunk and the merge kernel runs."""
    rows, kv_heads, group, hd, chunk = 3, 2, 3, 16, 64
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(rows, kv_heads, 2 * chunk, hd, generator=gen).to(device, dtype)
    v_cache = torch.randn(rows, kv_heads, 2 * chunk, hd, generator=gen).to(device, dtype)
    q = torch.randn(rows, kv_heads, group * 2, hd, generator=gen).to(device, dtype)
    base = torch.tensor([0, 17, chunk - 2], device=device)  # two queries each, the last ending the chunk
    direct = fo.decode_attention(q, k_cache, v_cache, base, seq=2, capacity=chunk, chunk=chunk)
    merged = fo.decode_attention(q, k_cache, v_cache, base, seq=2, capacity=2 * chunk, chunk=chunk)
    assert torch.equal(direct, merged)
    torch.testing.assert_close(direct, _reference_attention(q, k_cache, v_cache, base, 2), **_tolerance(dtype))


def test_a_song_resumed_through_the_fused_frame_step_continues_with_the_uninterrupted_tokens(fo, lm):
    """FrameEngine.resume on the Triton kernels: the replayed chunk writes the keys the frame steps wrote."""
    from gpu_worker.generation.fast_generate import FrameEngine

    model = lm.model if INTERPRETED else copy.deepcopy(lm.model).to("cuda")
    prompts = tiny_prompts(lm, 2)
    params = dataclasses.replace(tiny_params(6), cfg_scale=1.5)
    device = model.device

    def engine() -> FrameEngine:
        return FrameEngine(model, num_songs=2, rows=2, cache_len=128, max_frames=6, audio_eos_id=EOS, bucket=64,
                           use_graphs=False, logits_hook=no_eos_on(model), fused_kernels=True)

    whole = engine()
    for slot, prompt in enumerate(prompts):
        whole.prefill(slot, prompt, params, 30 + slot)
    whole.first_frame(whole.all_songs)
    for step in range(1, 6):
        whole.step(max(p.length for p in prompts) - 1 + step)
    assert whole.read_state()["count"] == [6, 6]
    again = engine()
    again.prefill(1, prompts[1], params, 30)  # a companion in the other slot, another seed
    again.first_frame(torch.tensor([False, True], device=device))
    again.prefill(0, prompts[0], params, 30)
    again.resume(0, whole.frames[0, :3].long())
    for step in range(3, 6):
        again.step(max(p.length for p in prompts) - 1 + step)
    assert again.read_state()["count"][0] == 6
    assert torch.equal(again.frames[0, :6], whole.frames[0, :6])



def _small_tile(fo):
    return fo.GemmConfig(block_n=32, block_k=32)


@pytest.mark.parametrize("device, dtype", _cases())
@pytest.mark.parametrize("rows, width, depth", [(2, 64, 96), (16, 200, 72), (20, 96, 64)])
def test_skinny_gemm_is_f_linear_and_its_add_is_addmm(fo, device, dtype, rows, width, depth):
    """Even and uneven shapes, one and two row tiles; the residual add rounds once, as addmm with beta = 1."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(rows, depth, generator=gen).to(device, dtype)
    w = (torch.randn(width, depth, generator=gen) / depth ** 0.5).to(device, dtype)
    acc = torch.randn(rows, width, generator=gen).to(device, dtype)
    torch.testing.assert_close(fo.skinny_gemm(x, w, config=_small_tile(fo)), F.linear(x, w), **_tolerance(dtype))
    want = acc.clone().addmm_(x, w.t())
    got = fo.skinny_gemm(x, w, add_to=acc, config=_small_tile(fo))
    assert got is acc
    torch.testing.assert_close(acc, want, **_tolerance(dtype))


@pytest.mark.parametrize("device, dtype", _cases())
def test_a_row_through_the_skinny_gemm_does_not_depend_on_the_rows_beside_it(fo, device, dtype):
    """The fixed row tile and in-order K reduction: what batch invariance asks of every GEMM. A song keeps
    its rows in an engine, so each row must come out the same whatever its companions hold, or whether
    there are any (a lone first row)."""
    gen = torch.Generator().manual_seed(12)
    batch = torch.randn(16, 128, generator=gen).to(device, dtype)
    w = torch.randn(96, 128, generator=gen).to(device, dtype)
    together = fo.skinny_gemm(batch, w, config=_small_tile(fo))
    others = torch.randn(16, 128, generator=gen).to(device, dtype)
    for row in (0, 5, 15):
        mixed = others.clone()
        mixed[row] = batch[row]
        assert torch.equal(fo.skinny_gemm(mixed, w, config=_small_tile(fo))[row], together[row]), f"row {row}"
    assert torch.equal(fo.skinny_gemm(batch[:1], w, config=_small_tile(fo))[0], together[0])
    strided = torch.zeros(16, 2, 128, dtype=dtype, device=device)
    strided[:, 1] = batch
    assert torch.equal(fo.skinny_gemm(strided[:, 1], w, config=_small_tile(fo)), together)


def test_the_gemm_kernel_is_chosen_by_shape_and_dtype_only(fo):
    meta = torch.empty(5120, 3072, dtype=torch.bfloat16, device="meta")
    assert fo.uses_skinny_gemm(2, meta) and fo.uses_skinny_gemm(fo.SKINNY_MAX_ROWS, meta)
    assert not fo.uses_skinny_gemm(fo.SKINNY_MAX_ROWS + 1, meta)  # prefill and big batches: cuBLAS
    assert not fo.uses_skinny_gemm(2, meta.float())  # fp32 models keep cuBLAS
    assert not fo.uses_skinny_gemm(2, meta.t())  # a weight whose rows are not contiguous
    assert not fo.uses_skinny_gemm(2, torch.empty(64, 32, dtype=torch.bfloat16))  # CPU tensors: PyTorch
    x = torch.randn(3, 32)
    w = torch.randn(64, 32)
    assert torch.equal(fo.linear(x, w), F.linear(x, w))
    acc = torch.randn(3, 64)
    assert torch.equal(fo.linear_add_(acc.clone(), x, w), acc.clone().addmm_(x, w.t()))


def test_configs_tile_every_published_projection_evenly(fo):
    """The frame step's GEMMs (3B backbone, 300M decoder, heads) need no column masks with their tiles."""
    shapes = [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192),  # 3B: qkv, wo, gate|up, w2
              (6144, 3072), (8320, 3072)]  # 300M decoder qkv; the heads, padded to a multiple of 128 rows
    for width, depth in shapes:
        cfg = fo.skinny_config(width, depth)
        assert width % cfg.block_n == 0 and depth % cfg.block_k == 0, (width, depth, cfg)


def test_kernels_launch_with_pdl_only_for_cards_that_have_it(fo):
    from gpu_worker.generation import card_compile

    assert fo._launch(torch.device("cpu")) == {"GDC": False}
    with card_compile.compile_only(90):
        assert fo._launch(torch.device("meta")) == {"GDC": True, "launch_pdl": True}
    with card_compile.compile_only(80):
        assert fo._launch(torch.device("meta")) == {"GDC": False}
