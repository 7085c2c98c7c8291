"""The tiny checkpoint's songs can be heard: its codec makes noise at a sane level, not a DC offset.

The level is the RMS of the MP3 decoded by the imageio-ffmpeg binary, in dBFS; the old tiny codec's
output (a constant 0.005 offset, -46 dBFS) fails the same check.
"""
from __future__ import annotations

import numpy as np
import torch

from gpu_worker.checkpoints.heartcodec_checkpoint import load_heartcodec, write_tiny_heartcodec
from tasks import audio_files

AUDIBLE_DBFS = -40.0


def _mp3_level(audio: np.ndarray) -> float:
    wav, clipped = audio_files.wav_bytes(audio.astype(np.float32))
    assert clipped == 0
    return audio_files.rms_dbfs(audio_files.encode(wav, "mp3"))


def test_tiny_codec_decodes_to_audible_noise(tmp_path):
    write_tiny_heartcodec(tmp_path, seed=0)
    codec = load_heartcodec(tmp_path).model
    codes = torch.randint(0, 8192, (8, 50), generator=torch.Generator().manual_seed(0))
    audio = codec.decode(codes, generator=torch.Generator().manual_seed(1)).numpy()
    level = _mp3_level(audio)
    print(f"tiny codec MP3 RMS level: {level:.1f} dBFS")
    assert level > AUDIBLE_DBFS
    assert abs(float(audio.mean())) < 0.1 * float(audio.std())  # noise, not an offset


def test_the_check_fails_on_a_silent_or_dc_offset_file():
    samples = 2 * audio_files.SAMPLE_RATE
    assert _mp3_level(np.zeros((2, samples))) <= AUDIBLE_DBFS
    assert _mp3_level(np.full((2, samples), 0.0052)) <= AUDIBLE_DBFS  # what the demo used to make
