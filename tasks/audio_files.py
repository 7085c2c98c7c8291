"""WAV and MP3 bytes: writing the codec's float output, encoding with pydub, measuring with ffmpeg.

pydub needs an ffmpeg binary; the imageio-ffmpeg wheel ships one. pydub's readers also want
ffprobe, which that wheel lacks, so audio is read back through the ffmpeg binary directly.
"""
from __future__ import annotations

import functools
import io
import shutil
import subprocess
import warnings
import wave

import numpy as np

SAMPLE_RATE = 48_000
CHANNELS = 2


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[bytes, int]:
    """16-bit PCM WAV of a float [channels, samples] array; returns (bytes, samples clipped at +-1)."""
    if audio.ndim != 2 or audio.shape[0] != CHANNELS:
        raise ValueError(f"audio must have shape [{CHANNELS}, samples], got {list(audio.shape)}")
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    clipped = int((np.abs(audio) > 1.0).sum())
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(CHANNELS)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.T.tobytes())  # interleaved L, R
    return buffer.getvalue(), clipped


def encode(wav: bytes, output_format: str, bitrate: str = "192k") -> bytes:
    """Encode WAV bytes to the requested format (WAV is passed through unchanged)."""
    if output_format == "wav":
        return wav
    with warnings.catch_warnings():
        # pydub warns at import when no ffmpeg is on PATH; we hand it imageio-ffmpeg's binary below
        warnings.filterwarnings("ignore", message="Couldn't find ffmpeg", category=RuntimeWarning)
        from pydub import AudioSegment

    AudioSegment.converter = ffmpeg_binary()
    segment = AudioSegment.from_wav(io.BytesIO(wav))
    out = io.BytesIO()
    segment.export(out, format=output_format, bitrate=bitrate)
    return out.getvalue()


def decoded_samples(data: bytes) -> int:
    """Samples per channel after decoding any ffmpeg-readable audio at 48 kHz stereo."""
    if data[:4] == b"RIFF":  # our own WAV: the header says it, no decoder needed
        with wave.open(io.BytesIO(data), "rb") as handle:
            if handle.getframerate() == SAMPLE_RATE and handle.getnchannels() == CHANNELS:
                return handle.getnframes()
    result = subprocess.run(
        [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-f", "s16le",
         "-ac", str(CHANNELS), "-ar", str(SAMPLE_RATE), "pipe:1"],
        input=data, capture_output=True, check=True, timeout=300)
    return len(result.stdout) // (2 * CHANNELS)
