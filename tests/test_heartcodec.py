"""HeartCodec.decode on a tiny checkpoint: validation first, exact output shapes, seeded determinism."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu_worker.checkpoints.heartcodec_checkpoint import load_heartcodec, write_tiny_heartcodec
from gpu_worker.model.heartcodec import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    CodecConfigError,
    HeartCodec,
    HeartCodecConfig,
)
from gpu_worker.model.token_validation import InvalidCodesError


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> HeartCodec:
    root = tmp_path_factory.mktemp("codec")
    write_tiny_heartcodec(root, seed=0)
    return load_heartcodec(root).model


def random_codes(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8192, (8, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoded(codec):
    """decode(frames, seed) with memoisation: each window costs about a second on the CPU."""
    cache: dict[tuple[int, int], tuple[torch.Tensor, list[tuple[int, int]]]] = {}

    def run(frames: int, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        if (frames, seed) not in cache:
            calls: list[tuple[int, int]] = []
            audio = codec.decode(random_codes(frames), generator=torch.Generator().manual_seed(seed),
                                 progress=lambda done, total: calls.append((done, total)))
            cache[frames, seed] = (audio, calls)
        return cache[frames, seed]
    return run


def test_constants_describe_48khz_audio_at_12_5_frames_per_second():
    assert SAMPLE_RATE == 48000 and SAMPLES_PER_FRAME == 3840 == SAMPLE_RATE / 12.5


@pytest.mark.parametrize("frames", [1, 50, 372, 400])
def test_audio_is_float32_stereo_of_exactly_T_times_3840_samples(decoded, frames):
    audio, _ = decoded(frames)
    assert audio.shape == (2, frames * SAMPLES_PER_FRAME)
    assert audio.dtype == torch.float32 and audio.device.type == "cpu"
    assert torch.isfinite(audio).all()


def test_progress_reports_each_window_in_order(decoded):
    assert decoded(400)[1] == [(1, 2), (2, 2)]
    assert decoded(50)[1] == [(1, 1)]


def test_same_seed_gives_identical_audio(codec, decoded):
    again = codec.decode(random_codes(50), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, decoded(50)[0])


def test_different_seed_gives_different_audio(decoded):
    assert not torch.equal(decoded(50, seed=1)[0], decoded(50, seed=0)[0])


def test_stereo_channels_differ(decoded):
    audio, _ = decoded(50)
    assert not torch.equal(audio[0], audio[1])


def test_later_windows_only_touch_audio_from_the_overlap_on(codec, decoded):
    """T=400 is two windows; before the 52-frame overlap the audio is window 0 alone."""
    first_window = codec.decode(random_codes(400)[:, :372], generator=torch.Generator().manual_seed(0))
    two_windows, _ = decoded(400)
    hop = 320 * SAMPLES_PER_FRAME
    assert torch.equal(two_windows[:, :hop], first_window[:, :hop])
    assert not torch.equal(two_windows[:, hop:372 * SAMPLES_PER_FRAME], first_window[:, hop:])


def test_short_song_is_decoded_as_its_codes_tiled_to_one_window(codec, decoded):
    tiled = codec.decode(random_codes(1).repeat(1, 372), generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoded(1)[0], tiled[:, :SAMPLES_PER_FRAME])


def test_int32_codes_as_the_lm_emits_them_decode_like_int64(codec, decoded):
    out = codec.decode(random_codes(1).to(torch.int32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, decoded(1)[0])


@pytest.mark.parametrize("value", [8192, 8193, 8194, 8195, 8196, -1])
@pytest.mark.parametrize("frame, codebook", [(0, 0), (17, 3), (49, 7)])
def test_out_of_range_code_is_rejected_before_any_lookup(codec, monkeypatch, value, frame, codebook):
    def lookup_must_not_run(*args, **kwargs):
        raise AssertionError("the RVQ lookup ran on invalid codes")

    monkeypatch.setattr(codec.flow_matching.vq_embed, "lookup", lookup_must_not_run)
    codes = random_codes(50)
    codes[codebook, frame] = value
    with pytest.raises(InvalidCodesError) as info:
        codec.decode(codes, generator=torch.Generator().manual_seed(0))
    assert (info.value.frame, info.value.codebook, info.value.value) == (frame, codebook, value)
    assert f"frame {frame}, codebook {codebook}: value {value}" in str(info.value)


@pytest.mark.parametrize("codes", [torch.zeros(8, 0, dtype=torch.long), torch.zeros(7, 5, dtype=torch.long),
                                   torch.zeros(8, 5)])
def test_empty_misshaped_or_float_codes_are_rejected(codec, codes):
    with pytest.raises(InvalidCodesError):
        codec.decode(codes, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key, overrides", [
    ("use_cosine_sim", {"use_cosine_sim": True}),
    ("norm_type", {"norm_type": "layer_norm"}),
    ("causal", {"causal": False}),
    ("num_bands", {"num_bands": 2}),
    ("num_samples", {"num_samples": 1}),
    ("in_channels", {"in_channels": 65}),
    ("out_channels", {"out_channels": 18, "in_channels": 68}),
    ("upsample_kernel_sizes", {"upsample_kernel_sizes": (10, 8, 8, 8)}),
    ("downsample_kernel_sizes", {"downsample_kernel_sizes": (6, 8)}),
    ("upsample_kernel_sizes", {"upsample_kernel_sizes": (10, 8, 8, 8, 7)}),
    ("upsample_factors", {"upsample_factors": (5, 4, 4, 4, 4), "upsample_kernel_sizes": (10, 8, 8, 8, 8)}),
    ("sample_rate", {"sample_rate": 44100}),
])
def test_unsupported_config_value_is_rejected_naming_the_key(key, overrides):
    with pytest.raises(CodecConfigError) as info:
        dataclasses.replace(HeartCodecConfig.tiny(), **overrides)
    assert info.value.key == key and repr(key) in str(info.value)


def test_config_from_dict_round_trips_and_ignores_bookkeeping_keys():
    config = HeartCodecConfig.tiny()
    data = {**config.to_dict(), "torch_dtype": "float32", "transformers_version": "4.51.3"}
    assert HeartCodecConfig.from_dict(data) == config


def test_config_from_dict_rejects_wrong_types_naming_the_key():
    with pytest.raises(CodecConfigError, match="'num_layers'"):
        HeartCodecConfig.from_dict({"num_layers": "24"})
