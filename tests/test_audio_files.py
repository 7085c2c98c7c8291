"""Loudness, ID3 tags and file names of the encoded song (pure functions, real ffmpeg and mutagen)."""
from __future__ import annotations

import numpy as np
import pytest

from tasks import audio_files
from tasks.stage_inputs import song_title


def _noise(rms: float, seconds: float = 3.0) -> bytes:
    rng = np.random.default_rng(0)
    audio = rng.normal(0.0, rms, size=(2, int(seconds * audio_files.SAMPLE_RATE))).astype(np.float32)
    return audio_files.wav_bytes(audio)[0]


def test_loudness_is_measured_and_left_alone_without_a_target():
    wav = _noise(0.05)
    result = audio_files.normalise_loudness(wav, None)
    assert result.wav == wav and result.gain_db == 0.0
    assert result.measured_lufs is not None and -40 < result.measured_lufs < -10


def test_normalisation_reaches_the_target_lufs():
    result = audio_files.normalise_loudness(_noise(0.01), -14.0)
    assert result.measured_lufs < -30
    assert result.output_lufs == pytest.approx(-14.0, abs=0.5)


def test_normalisation_stops_before_clipping():
    result = audio_files.normalise_loudness(_noise(0.2), 0.0)
    samples, _ = audio_files.wav_to_float(result.wav)
    assert np.abs(samples).max() <= 1.0 and result.output_lufs < 0.0


def test_a_clip_shorter_than_one_gating_block_has_no_loudness():
    assert audio_files.normalise_loudness(_noise(0.05, seconds=0.2), -14.0).measured_lufs is None


def test_silence_measures_minus_infinity_dbfs_and_noise_does_not():
    assert audio_files.rms_dbfs(_noise(0.0)) == float("-inf")
    assert audio_files.rms_dbfs(_noise(0.1)) == pytest.approx(-20.0, abs=0.5)


def test_mp3_carries_title_job_seed_model_and_ai_label():
    mp3 = audio_files.encode(_noise(0.05, 1.0), "mp3")
    tagged = audio_files.tag_mp3(mp3, title="de doo doo doo", job_id="a" * 32, seed=7, model_checksum="0123abcd")
    tags = audio_files.read_mp3_tags(tagged)
    assert tags["TIT2"] == "de doo doo doo"
    assert tags["TXXX:songpipe_job_id"] == "a" * 32 and tags["TXXX:songpipe_seed"] == "7"
    assert tags["TXXX:songpipe_model_checksum"] == "0123abcd"
    assert tags["TXXX:AI_GENERATED"] == "AI-generated" and "AI-generated" in tags["TPE1"]
    assert audio_files.decoded_samples(tagged) == audio_files.decoded_samples(mp3)


def test_title_is_the_first_sung_line_and_the_filename_is_readable():
    assert song_title("[verse]\n\n  De doo doo doo \nla") == "De doo doo doo"
    assert song_title("[intro]\n") == "untitled"
    assert audio_files.song_filename("De doo, doo doo!", "0123456789abcdef" * 2, "mp3") == "de-doo-doo-doo-01234567.mp3"
    assert audio_files.song_filename("", "f" * 32, "wav") == "song-ffffffff.wav"
