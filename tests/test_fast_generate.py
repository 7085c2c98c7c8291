"""The fast generation path computes what the plain path computes (tiny checkpoint, CPU, fp32).

On the CPU the fast path runs its static-shape frame eagerly: the same function that CUDA graphs capture.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu_worker.checkpoints.heartmula_checkpoint import (
    TINY_CONFIG,
    heartmula_args_from_config,
    random_state_dict,
)
from gpu_worker.generation.fast_generate import generate_fast
from gpu_worker.generation.generate import (
    ContextLimitError,
    EmptySongError,
    GenerationCancelled,
    generate,
)
from gpu_worker.model.heartmula import HeartMuLa
from tests import model_fixtures
from tests.model_fixtures import EOS, VOCAB, no_eos, tiny_params, tiny_prompts

lm = model_fixtures.lm  # the tiny checkpoint (a module-scoped fixture)

PARAMS = tiny_params(50)
SONGS = 3


@pytest.fixture(scope="module")
def prompts(lm):
    return tiny_prompts(lm, SONGS)


def gens(*seeds):
    return list(seeds)


def fast_force(token, at_frame=None, at_codebook=None, song=None):
    """Graph-safe hook (tensor ops only): make `token` win where frame/codebook/song match."""
    def hook(frame_index, codebook, logits):
        logits = no_eos(frame_index, codebook, logits)
        if at_codebook is not None and codebook != at_codebook:
            return logits
        rows = torch.ones_like(frame_index, dtype=torch.bool)
        if at_frame is not None:
            rows = rows & (frame_index == at_frame)
        if song is not None:
            rows = rows & (torch.arange(len(frame_index)) == song)
        hit = torch.zeros_like(logits, dtype=torch.bool)
        hit[:, token] = True
        return torch.where(hit & rows[:, None], torch.full_like(logits, 1e4), logits)
    return hook


def plain_force(token, at_frame=None, at_codebook=None):
    def hook(frame, codebook, logits):
        logits = no_eos(frame, codebook, logits)
        if (at_frame is None or frame == at_frame) and (at_codebook is None or codebook == at_codebook):
            logits = logits.clone()
            logits[..., token] = 1e4
        return logits
    return hook


class LogitsRecorder:
    """Collects the guided logits each path samples from, keyed by (song, frame, codebook)."""

    def __init__(self):
        self.seen: dict[tuple[int, int, int], torch.Tensor] = {}

    def plain(self, frame, codebook, logits):
        self.seen[(0, frame, codebook)] = logits[0].clone()
        return no_eos(frame, codebook, logits)

    def fast(self, frame_index, codebook, logits):
        for song, frame in enumerate(frame_index.tolist()):
            self.seen.setdefault((song, frame, codebook), logits[song].clone())
        return no_eos(frame_index, codebook, logits)


# ---- same tokens, same logits ----

@pytest.mark.parametrize("cfg_scale, complex_rope", [(1.5, True), (1.0, True), (1.5, False)])
def test_a_50_frame_song_gives_identical_tokens_on_both_paths(lm, prompts, cfg_scale, complex_rope):
    params = dataclasses.replace(PARAMS, cfg_scale=cfg_scale)
    plain = generate(lm.model, prompts[0], params, seed=7, logits_hook=no_eos)
    fast = generate_fast(lm.model, prompts[0], params, seeds=gens(7), logits_hook=no_eos,
                         complex_rope=complex_rope)[0]
    assert fast.frames.shape == (8, 50)
    assert torch.equal(fast.frames, plain.frames)
    assert (fast.stop_reason, fast.prompt_length) == (plain.stop_reason, plain.prompt_length)


def test_teacher_forced_logits_match_the_plain_path(lm, prompts):
    params = dataclasses.replace(PARAMS, max_audio_length_ms=12 * 80)
    plain, fast = LogitsRecorder(), LogitsRecorder()
    a = generate(lm.model, prompts[1], params, seed=3, logits_hook=plain.plain)
    b = generate_fast(lm.model, prompts[1], params, seeds=gens(3), logits_hook=fast.fast)[0]
    assert torch.equal(a.frames, b.frames)  # same tokens fed back: the logits are teacher-forced alike
    assert plain.seen.keys() == fast.seen.keys() and len(plain.seen) == 12 * 8
    for key, logits in plain.seen.items():
        torch.testing.assert_close(fast.seen[key], logits, rtol=1e-5, atol=1e-5)


def test_a_song_alone_and_inside_a_batch_of_3_gets_the_same_logits_and_tokens(lm, prompts):
    alone, batched = LogitsRecorder(), LogitsRecorder()
    solo = generate_fast(lm.model, prompts[1], PARAMS, seeds=gens(11), logits_hook=alone.fast)[0]
    trio = generate_fast(lm.model, [prompts[0], prompts[1], prompts[2]], PARAMS, seeds=gens(5, 11, 9),
                         logits_hook=batched.fast)
    assert torch.equal(trio[1].frames, solo.frames)
    for (_song, frame, codebook), logits in alone.seen.items():
        torch.testing.assert_close(batched.seen[(1, frame, codebook)], logits, rtol=1e-5, atol=1e-5)
    for index, seed in ((0, 5), (2, 9)):  # the batch mates get their own plain-path results
        plain = generate(lm.model, prompts[index], PARAMS, seed=seed, logits_hook=no_eos)
        assert torch.equal(trio[index].frames, plain.frames)


def test_songs_of_different_lengths_share_a_batch(lm, prompts):
    short = dataclasses.replace(PARAMS, max_audio_length_ms=7 * 80)
    results = generate_fast(lm.model, prompts[:2], [short, PARAMS], seeds=gens(1, 2), logits_hook=no_eos)
    assert [r.frames.shape[1] for r in results] == [7, 50]
    assert torch.equal(results[0].frames,
                       generate(lm.model, prompts[0], short, seed=1, logits_hook=no_eos).frames)


def test_songs_with_different_temperature_top_k_and_cfg_share_a_batch_and_match_the_plain_path(lm, prompts):
    settings = [dataclasses.replace(PARAMS, temperature=0.7, top_k=3, cfg_scale=1.0),
                dataclasses.replace(PARAMS, temperature=1.3, top_k=VOCAB, cfg_scale=2.5),
                dataclasses.replace(PARAMS, temperature=1.0, top_k=1, cfg_scale=1.5)]
    batch = generate_fast(lm.model, prompts, settings, seeds=gens(4, 5, 6), logits_hook=no_eos)
    for index, (params, seed) in enumerate(zip(settings, (4, 5, 6))):
        plain = generate(lm.model, prompts[index], params, seed=seed, logits_hook=no_eos)
        assert torch.equal(batch[index].frames, plain.frames), f"song {index}"


def test_free_running_agreement_alone_vs_batched_over_500_frames(lm):
    """Report how often a song's frames agree when it runs alone and inside a batch of 3, over 500 frames."""
    config = dict(TINY_CONFIG, flavors={**TINY_CONFIG["flavors"],
                                        "tiny-backbone": {**TINY_CONFIG["flavors"]["tiny-backbone"],
                                                          "max_seq_len": 1024}})
    args = heartmula_args_from_config(config, "custom tiny config.json")
    model = HeartMuLa(args)
    model.load_state_dict(random_state_dict(args, seed=4), strict=True)
    model.requires_grad_(False).eval()
    prompts = tiny_prompts(lm, SONGS)
    params = dataclasses.replace(PARAMS, max_audio_length_ms=500 * 80)
    solo = generate_fast(model, prompts[1], params, seeds=gens(21), logits_hook=no_eos)[0].frames
    trio = generate_fast(model, prompts, params, seeds=gens(1, 21, 2), logits_hook=no_eos)[1].frames
    agreement = (solo == trio).all(dim=0).float().mean().item()
    print(f"free-running frame agreement, alone vs batch of 3, 500 frames, CPU fp32: {agreement:.4f}")
    assert solo.shape == trio.shape == (8, 500)
    assert agreement == 1.0


# ---- EOS, specials, errors: as the plain path ----

def test_eos_in_a_nonzero_codebook_of_frame_5_stops_and_drops_that_frame_like_the_plain_path(lm, prompts):
    plain = generate(lm.model, prompts[0], PARAMS, seed=3, logits_hook=plain_force(EOS, 5, 3))
    fast = generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(3), logits_hook=fast_force(EOS, 5, 3))[0]
    assert fast.stop_reason == plain.stop_reason == "eos"
    assert fast.frames.shape == (8, 5)
    assert torch.equal(fast.frames, plain.frames)


def test_eos_of_one_song_does_not_stop_its_batch_mates(lm, prompts):
    results = generate_fast(lm.model, prompts, PARAMS, seeds=gens(1, 2, 3),
                            logits_hook=fast_force(EOS, at_frame=4, at_codebook=0, song=1))
    assert [r.frames.shape[1] for r in results] == [50, 4, 50]
    assert [r.stop_reason for r in results] == ["max_length", "eos", "max_length"]


def test_eos_in_frame_0_raises_empty_song_error(lm, prompts):
    with pytest.raises(EmptySongError, match="EOS at frame 0"):
        generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(0), logits_hook=fast_force(EOS, 0, 7))


def test_errors_can_be_returned_in_place_for_the_failing_song_only(lm, prompts):
    results = generate_fast(lm.model, prompts[:2], PARAMS, seeds=gens(0, 1), return_exceptions=True,
                            logits_hook=fast_force(EOS, at_frame=0, song=0))
    assert isinstance(results[0], EmptySongError)
    assert results[1].frames.shape == (8, 50)


@pytest.mark.parametrize("special", [8192, 8194, 8195, 8196])
def test_non_eos_specials_are_never_sampled_even_as_the_max_logit(lm, prompts, special):
    result = generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(0), logits_hook=fast_force(special))[0]
    assert result.frames.shape == (8, 50)
    assert int(result.frames.max()) <= 8191


def test_nan_logits_fail_loudly_naming_frame_and_codebook(lm, prompts):
    def nan_at_frame_1_codebook_2(frame_index, codebook, logits):
        if codebook != 2:
            return logits
        return torch.where((frame_index == 1)[:, None], torch.full_like(logits, float("nan")), logits)
    with pytest.raises(RuntimeError, match="frame 1, codebook 2"):
        generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(0), logits_hook=nan_at_frame_1_codebook_2)


def test_should_cancel_stops_generation(lm, prompts):
    with pytest.raises(GenerationCancelled):
        generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(0), should_cancel=lambda: True,
                      sync_every=2, logits_hook=no_eos)


def test_progress_is_reported_per_song_and_at_the_end(lm, prompts):
    calls: list[tuple[int, int]] = []
    params = dataclasses.replace(PARAMS, max_audio_length_ms=7 * 80)
    generate_fast(lm.model, prompts[0], params, seeds=gens(0), sync_every=3, logits_hook=no_eos,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 7), (7, 7)]  # read back after frames 0..3 (3 steps), then at the end


def test_context_limit_error_names_prompt_length_frames_and_limit(lm, prompts):
    frames = 256 - prompts[0].length + 1
    params = dataclasses.replace(PARAMS, max_audio_length_ms=frames * 80)
    with pytest.raises(ContextLimitError, match=rf"L={prompts[0].length}.*N={frames}.*256"):
        generate_fast(lm.model, prompts[0], params, seeds=gens(0))


def test_a_seed_outside_int64_is_refused(lm, prompts):
    with pytest.raises(ValueError, match="seed must be an int"):
        generate_fast(lm.model, prompts[0], PARAMS, seeds=[2**63])


def test_the_fast_path_allocates_no_model_kv_cache(tmp_path):
    from gpu_worker.checkpoints.heartmula_checkpoint import load_heartmula, write_tiny_heartmula

    write_tiny_heartmula(tmp_path, seed=2)
    fresh = load_heartmula(tmp_path)
    prompt = tiny_prompts(fresh, 1)[0]
    result = generate_fast(fresh.model, prompt, tiny_params(5), seeds=gens(3), logits_hook=no_eos)[0]
    assert result.frames.shape == (8, 5)
    layers = [*fresh.model.backbone.layers, *fresh.model.decoder.layers]
    assert all(layer.attn.kv_cache is None for layer in layers)
    assert fresh.model.backbone.freqs_cis is not None and fresh.model.decoder.freqs_cis is not None


def test_while_another_thread_compiles_a_frame_step_without_a_graph_runs_eagerly_with_the_same_tokens(
        lm, prompts, monkeypatch):
    """graph_captures: the engine never captures during a compile (a capture would break it) and never waits
    for one. Graphs are asked for here, on the CPU; every capture is refused, so no CUDA call is made and each
    step runs its eager twin."""
    import threading

    from gpu_worker.generation import graph_captures
    from gpu_worker.generation.fast_generate import FrameEngine

    monkeypatch.setattr(FrameEngine, "_warm_up", lambda self: None)  # the CUDA warm-up before graphs
    compiling, done = threading.Event(), threading.Event()

    def compile_elsewhere() -> None:
        with graph_captures.exclusive():
            compiling.set()
            done.wait(60)

    compiler = threading.Thread(target=compile_elsewhere)
    compiler.start()
    try:
        compiling.wait(10)
        refused = generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(7), logits_hook=no_eos, use_graphs=True,
                                fused_kernels=False)[0]
    finally:
        done.set()
        compiler.join(10)
    eager = generate_fast(lm.model, prompts[0], PARAMS, seeds=gens(7), logits_hook=no_eos, use_graphs=False)[0]
    assert refused.frames.shape == (8, 50) and torch.equal(refused.frames, eager.frames)
