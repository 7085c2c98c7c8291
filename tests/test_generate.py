"""Sampling and the generation loop (spec §4.4, §5, §6) on the tiny checkpoint, CPU, fp32."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu_worker.generation.generate import (
    ContextLimitError,
    EmptySongError,
    GenerationCancelled,
    cfg_mix,
    forbidden_ids_mask,
    generate,
    top_k_race,
)
from gpu_worker.generation.sampling_noise import song_noise
from tests import model_fixtures
from tests.model_fixtures import EOS, VOCAB, no_eos, tiny_params, tiny_prompts

lm = model_fixtures.lm  # the tiny checkpoint (a module-scoped fixture)

PARAMS = tiny_params(8)


@pytest.fixture(scope="module")
def prompt(lm):
    return tiny_prompts(lm, 1)[0]


def run(lm, prompt, params=PARAMS, seed=0, **kwargs):
    return generate(lm.model, prompt, params, seed=seed, **kwargs)


def sample_top_k(logits, *, temperature, top_k, forbidden, seed):
    """One draw with the race noise of (seed, frame 0, codebook 0)."""
    return top_k_race(logits, song_noise(seed, 0, 1, logits.shape[-1], "cpu"), temperature=temperature,
                      top_k=top_k, forbidden=forbidden)


def force(token, at_frame=None, at_codebook=None):
    def hook(frame, codebook, logits):
        if (at_frame is None or frame == at_frame) and (at_codebook is None or codebook == at_codebook):
            logits = logits.clone()
            logits[..., token] = 1e4
        return logits
    return hook


# ---- determinism ----

def test_same_seed_gives_identical_tokens(lm, prompt):
    assert torch.equal(run(lm, prompt, seed=7).frames, run(lm, prompt, seed=7).frames)


def test_different_seeds_give_different_tokens(lm, prompt):
    assert not torch.equal(run(lm, prompt, seed=7).frames, run(lm, prompt, seed=8).frames)


def test_each_frames_draws_are_a_function_of_seed_frame_and_codebook_only(lm, prompt):
    """Every code is the race of its guided logits against song_noise(seed, frame)[codebook]: no hidden
    generator state, so a frame can be drawn without drawing the frames before it (resume, batching)."""
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def remember(frame, codebook, logits):
        logits = no_eos(frame, codebook, logits)
        seen[(frame, codebook)] = logits.clone()
        return logits

    result = generate(lm.model, prompt, PARAMS, seed=5, logits_hook=remember)
    forbidden = forbidden_ids_mask(VOCAB, EOS, device="cpu")
    for frame in range(result.frames.shape[1]):
        race = song_noise(5, frame, 8, VOCAB, "cpu")
        for codebook in range(8):
            code = top_k_race(seen[(frame, codebook)], race[codebook:codebook + 1], temperature=PARAMS.temperature,
                              top_k=PARAMS.top_k, forbidden=forbidden)
            assert int(code) == int(result.frames[codebook, frame])


def test_guidance_changes_the_tokens(lm, prompt):
    plain = dataclasses.replace(PARAMS, cfg_scale=1.0)
    assert not torch.equal(run(lm, prompt, plain).frames, run(lm, prompt).frames)


# ---- output contract ----

def test_output_is_int32_codebook_major_on_cpu_within_0_to_8191(lm, prompt):
    result = run(lm, prompt, logits_hook=no_eos)
    frames = result.frames
    assert frames.dtype == torch.int32 and frames.device.type == "cpu"
    assert frames.shape == (8, 8)
    assert int(frames.min()) >= 0 and int(frames.max()) <= 8191
    assert result.prompt_length == prompt.length


def test_max_length_gives_exactly_max_ms_over_80_frames(lm, prompt):
    params = dataclasses.replace(PARAMS, max_audio_length_ms=5 * 80 + 79)
    result = run(lm, prompt, params, logits_hook=no_eos)
    assert result.frames.shape[1] == 5 and result.stop_reason == "max_length"


def test_one_frame_is_the_smallest_song(lm, prompt):
    params = dataclasses.replace(PARAMS, max_audio_length_ms=80)
    assert run(lm, prompt, params, logits_hook=no_eos).frames.shape == (8, 1)


# ---- EOS and special ids ----

def test_eos_in_frame_0_raises_empty_song_error(lm, prompt):
    with pytest.raises(EmptySongError, match="EOS at frame 0"):
        run(lm, prompt, logits_hook=force(EOS, at_frame=0, at_codebook=0))


def test_eos_in_a_later_codebook_of_frame_0_also_raises_empty_song_error(lm, prompt):
    with pytest.raises(EmptySongError):
        run(lm, prompt, logits_hook=force(EOS, at_frame=0, at_codebook=7))


def test_eos_in_a_nonzero_codebook_of_frame_5_stops_and_drops_that_frame(lm, prompt):
    full = run(lm, prompt, seed=3, logits_hook=no_eos)
    stopped = run(lm, prompt, seed=3, logits_hook=lambda f, c, x: force(EOS, 5, 3)(f, c, no_eos(f, c, x)))
    assert stopped.stop_reason == "eos"
    assert stopped.frames.shape == (8, 5)
    assert torch.equal(stopped.frames, full.frames[:, :5])


@pytest.mark.parametrize("special", [8192, 8194, 8195, 8196])
def test_non_eos_specials_are_never_sampled_even_as_the_max_logit(lm, prompt, special):
    result = run(lm, prompt, logits_hook=lambda f, c, x: force(special)(f, c, no_eos(f, c, x)))
    assert result.frames.shape == (8, 8)
    assert int(result.frames.max()) <= 8191


def test_forbidden_mask_is_8192_and_8194_to_8196():
    forbidden = forbidden_ids_mask(VOCAB, EOS, device="cpu")
    assert torch.nonzero(forbidden).flatten().tolist() == [8192, 8194, 8195, 8196]


def test_nan_logits_fail_loudly_naming_frame_and_codebook(lm, prompt):
    def nan_at_frame_1_codebook_2(frame, codebook, logits):
        return torch.full_like(logits, float("nan")) if (frame, codebook) == (1, 2) else logits
    with pytest.raises(RuntimeError, match="frame 1, codebook 2"):
        run(lm, prompt, logits_hook=nan_at_frame_1_codebook_2)


# ---- the sampler ----

def test_sampler_keeps_ties_with_the_kth_value():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, [11, 22]] = 5.0  # a tie for the single top-k slot
    forbidden = forbidden_ids_mask(VOCAB, EOS, device="cpu")
    drawn = {int(sample_top_k(logits, temperature=1.0, top_k=1, forbidden=forbidden,
                              seed=seed)) for seed in range(40)}
    assert drawn == {11, 22}


def test_sampler_draws_only_from_the_top_k():
    logits = torch.arange(VOCAB, dtype=torch.float32)[None] / 1000  # ids 8191, 8190, ... lead (8192+ forbidden)
    forbidden = forbidden_ids_mask(VOCAB, VOCAB - 1, device="cpu")  # EOS 8196: 8192..8195 forbidden
    drawn = {int(sample_top_k(logits, temperature=50.0, top_k=3, forbidden=forbidden,
                              seed=seed)) for seed in range(60)}
    assert drawn <= {8196, 8191, 8190}


def test_sampler_returns_eos_when_it_is_the_only_candidate():
    logits = torch.full((1, VOCAB), -1e4)
    logits[0, EOS] = 0.0
    forbidden = forbidden_ids_mask(VOCAB, EOS, device="cpu")
    ids = sample_top_k(logits, temperature=1.0, top_k=1, forbidden=forbidden, seed=0)
    assert ids.dtype == torch.int32 and ids.tolist() == [EOS]


def test_cfg_mix_is_uncond_plus_scale_times_difference_in_fp32():
    logits = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    assert torch.equal(cfg_mix(logits, 1.5), torch.tensor([[4.0, 0.5]]))
    assert cfg_mix(logits.bfloat16(), 1.5).dtype == torch.float32


# ---- limits and parameters ----

def test_context_limit_error_names_prompt_length_frames_and_limit(lm, prompt):
    frames = 256 - prompt.length + 1
    params = dataclasses.replace(PARAMS, max_audio_length_ms=frames * 80)
    with pytest.raises(ContextLimitError, match=rf"L={prompt.length}.*N={frames}.*256"):
        run(lm, prompt, params)


def test_prompt_plus_frames_exactly_at_the_limit_is_accepted(lm, prompt):
    params = dataclasses.replace(PARAMS, max_audio_length_ms=(256 - prompt.length) * 80)
    result = run(lm, prompt, params, logits_hook=force(EOS, at_frame=2))
    assert result.frames.shape == (8, 2)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.0), ("temperature", -1.0), ("top_k", 0), ("top_k", VOCAB + 1),
    ("cfg_scale", 0.5), ("max_audio_length_ms", 79),
])
def test_invalid_sampling_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PARAMS, **{field: value})


# ---- progress and cancellation ----

def test_progress_is_reported_every_n_frames_and_at_the_end(lm, prompt):
    calls = []
    params = dataclasses.replace(PARAMS, max_audio_length_ms=7 * 80)
    run(lm, prompt, params, progress=lambda done, total: calls.append((done, total)), progress_every=3,
        logits_hook=no_eos)
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_should_cancel_stops_generation(lm, prompt):
    with pytest.raises(GenerationCancelled):
        run(lm, prompt, should_cancel=lambda: True, progress_every=2, logits_hook=no_eos)


def test_the_apis_seed_range_is_the_sampling_schemes_seed_domain():
    """Two homes for one number (the web tier cannot import the generation code, which cannot import the task
    code): any seed the API accepts is one the noise scheme takes, and the other way round."""
    from gpu_worker.generation.sampling_noise import SEED_LIMIT
    from tasks.contracts import MAX_SEED

    assert MAX_SEED == SEED_LIMIT == 2**63 - 1
