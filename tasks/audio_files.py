"""WAV and MP3 bytes: writing the codec's float output, encoding with pydub, measuring with ffmpeg.

pydub needs an ffmpeg binary; the imageio-ffmpeg wheel ships one. pydub's readers also want
ffprobe, which that wheel lacks, so audio is read back through the ffmpeg binary directly.
"""
from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import warnings
import wave
from dataclasses import dataclass
from typing import Final

import numpy as np

SAMPLE_RATE: Final = 48_000  # Final: the contracts' Literal[48000]
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
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(CHANNELS)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm16_bytes(audio))
    return buffer.getvalue(), clipped


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """float [channels, samples] -> 16-bit little-endian interleaved PCM (L, R, L, R ...), clipped at +-1.

    Elementwise, so the PCM of a slice of samples is the same slice of the whole song's PCM: a streamed
    window's bytes are the final WAV's bytes (docs/streaming.md)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").T.tobytes()


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


# -- loudness (ITU-R BS.1770 through pyloudnorm) ------------------------------------------------

MIN_LOUDNESS_S = 0.4  # BS.1770 gates over 400 ms blocks: a shorter clip has no integrated loudness


def wav_to_float(wav: bytes) -> tuple[np.ndarray, int]:
    """Our 16-bit PCM WAV -> float [samples, channels] in [-1, 1] and the sample rate."""
    with wave.open(io.BytesIO(wav), "rb") as handle:
        if handle.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM WAV, got {8 * handle.getsampwidth()}-bit")
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
        return pcm.reshape(-1, handle.getnchannels()).astype(np.float64) / 32767.0, handle.getframerate()


def integrated_loudness(samples: np.ndarray, sample_rate: int) -> float | None:
    """LUFS of float [samples, channels], or None when the clip is too short or silent to measure."""
    if samples.shape[0] < MIN_LOUDNESS_S * sample_rate:
        return None
    import pyloudnorm

    value = float(pyloudnorm.Meter(sample_rate).integrated_loudness(samples))
    return round(value, 2) if np.isfinite(value) else None


@dataclass(frozen=True)
class Loudness:
    wav: bytes  # the (possibly normalised) WAV to encode
    measured_lufs: float | None
    output_lufs: float | None
    gain_db: float


def normalise_loudness(wav: bytes, target_lufs: float | None) -> Loudness:
    """Measure the WAV; with a target, apply one gain towards it, capped so that no sample clips."""
    samples, rate = wav_to_float(wav)
    measured = integrated_loudness(samples, rate)
    if target_lufs is None or measured is None:
        return Loudness(wav, measured, measured, 0.0)
    gain_db = target_lufs - measured
    peak = float(np.abs(samples).max())
    if peak > 0:
        gain_db = min(gain_db, -20 * np.log10(peak))  # a louder target than the peaks allow: stop at 0 dBFS
    scaled = samples * 10 ** (gain_db / 20)
    out, _ = wav_bytes(scaled.T.astype(np.float32), rate)
    return Loudness(out, measured, integrated_loudness(scaled, rate), round(float(gain_db), 2))


def rms_dbfs(data: bytes) -> float:
    """RMS level of any ffmpeg-readable audio in dBFS (-inf for digital silence)."""
    result = subprocess.run(
        [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-f", "s16le",
         "-ac", str(CHANNELS), "-ar", str(SAMPLE_RATE), "pipe:1"],
        input=data, capture_output=True, check=True, timeout=300)
    samples = np.frombuffer(result.stdout, dtype="<i2").astype(np.float64) / 32768.0
    rms = float(np.sqrt(np.mean(samples ** 2))) if samples.size else 0.0
    return 20 * float(np.log10(rms)) if rms > 0 else float("-inf")


# -- file tags and names ------------------------------------------------------------------------

def tag_mp3(mp3: bytes, *, title: str, job_id: str, seed: int, model_checksum: str | None,
            label: str = "AI-generated") -> bytes:
    """The MP3 with an ID3v2.4 tag: title, artist/comment that say it is AI-generated, job id, seed, model."""
    from mutagen.id3 import COMM, ID3, TIT2, TPE1, TXXX

    tags = ID3()
    tags.add(TIT2(encoding=3, text=title))
    tags.add(TPE1(encoding=3, text=f"songpipe ({label})"))
    tags.add(COMM(encoding=3, lang="eng", desc="", text=f"{label} by songpipe, job {job_id}, seed {seed}"))
    tags.add(TXXX(encoding=3, desc="songpipe_job_id", text=job_id))
    tags.add(TXXX(encoding=3, desc="songpipe_seed", text=str(seed)))
    tags.add(TXXX(encoding=3, desc="AI_GENERATED", text=label))
    if model_checksum:
        tags.add(TXXX(encoding=3, desc="songpipe_model_checksum", text=model_checksum))
    buffer = io.BytesIO(mp3)
    tags.save(buffer)
    return buffer.getvalue()


def read_mp3_tags(mp3: bytes) -> dict[str, str]:
    """ID3 frames as {frame id or TXXX:desc: text} (for tests and `songpipe download`)."""
    from mutagen.id3 import ID3

    tags = ID3(io.BytesIO(mp3))
    return {key: str(frame.text[0]) for key, frame in tags.items() if getattr(frame, "text", None)}


def song_filename(title: str | None, job_id: str, extension: str) -> str:
    """A name a person can read and a shell need not quote: 'de-doo-doo-doo-1a2b3c4d.mp3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", (title or "").lower()).strip("-")[:48].strip("-") or "song"
    return f"{slug}-{job_id[:8]}.{extension}"
