"""Pictures for the job page: a token grid (codebooks x frames) and a waveform, as PNG bytes.

A small PNG writer (numpy + zlib) keeps the dashboard free of an imaging dependency. Out-of-range
codes (>= the codec's 8192 rows, the failure of shared/seed-story.md) are drawn in bright red so a
bad frame stands out in the grid.
"""
from __future__ import annotations

import io
import struct
import wave
import zlib

import numpy as np

CODEBOOK_SIZE = 8192
BAD_CODE_RGB = (255, 0, 40)
BACKGROUND_RGB = (250, 250, 250)
WAVE_RGB = (40, 90, 160)
QUIET_PEAK = 0.25  # quieter audio is drawn scaled to full height
# a viridis-like ramp: dark blue -> teal -> yellow, interpolated over the code value
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an [height, width, 3] uint8 array as an 8-bit RGB PNG."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [height, width, 3], got {list(rgb.shape)}")
    height, width, _ = rgb.shape
    raw = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # filter byte 0 (None) on every row
    raw[:, 1:] = rgb.astype(np.uint8).reshape(height, width * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def _ramp(values: np.ndarray) -> np.ndarray:
    position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def load_tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def token_grid_png(codes: np.ndarray, *, row_height: int = 12, max_width: int = 3000,
                   codebook_size: int = CODEBOOK_SIZE) -> bytes:
    """One row per codebook, one column (or a few pixels) per frame; invalid codes in red."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"token grid must be [codebooks, frames], got {list(codes.shape)}")
    codebooks, frames = codes.shape
    scale = max(1, min(12, max_width // frames))
    values = codes.astype(np.int64)
    rgb = _ramp(values / (codebook_size - 1))
    bad = (values < 0) | (values >= codebook_size)
    rgb[bad] = BAD_CODE_RGB
    image = np.repeat(np.repeat(rgb, row_height, axis=0), scale, axis=1)
    gap = np.full((1, image.shape[1], 3), 255, dtype=np.uint8)
    rows = [image[i * row_height:(i + 1) * row_height] for i in range(codebooks)]
    return png_bytes(np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0))


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """[channels, samples] float in -1..1 and the sample rate, from 16-bit PCM WAV bytes."""
    with wave.open(io.BytesIO(data), "rb") as handle:
        channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
        frames = handle.readframes(handle.getnframes())
    if width != 2:
        raise ValueError(f"only 16-bit PCM WAV is drawn, this one has {8 * width}-bit samples")
    pcm = np.frombuffer(frames, dtype="<i2").reshape(-1, channels).T
    return pcm.astype(np.float32) / 32768.0, rate


def waveform_png(data: bytes, *, width: int = 1000, channel_height: int = 80) -> bytes:
    """Min/max envelope of each channel, one band per channel. Quiet audio (peak below 0.25, e.g.
    the tiny random checkpoint's) is scaled up to full height so its shape stays visible."""
    audio, _rate = read_wav(data)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if 0 < peak < QUIET_PEAK:
        audio = audio / peak
    channels, samples = audio.shape
    columns = max(1, min(width, samples))
    edges = np.linspace(0, samples, columns + 1).astype(int)
    image = np.empty((channels * channel_height + (channels - 1), columns, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    rows = np.arange(channel_height)[:, None]
    for c in range(channels):
        lo = np.minimum.reduceat(audio[c], edges[:-1]) if samples else np.zeros(columns)
        hi = np.maximum.reduceat(audio[c], edges[:-1]) if samples else np.zeros(columns)
        mid = (channel_height - 1) / 2
        top = np.floor(mid - hi * mid).astype(int)
        bottom = np.ceil(mid - lo * mid).astype(int)
        mask = (rows >= top[None, :]) & (rows <= bottom[None, :])
        band = image[c * (channel_height + 1):c * (channel_height + 1) + channel_height]
        band[mask] = WAVE_RGB
        band[int(mid), :] = np.where(mask[int(mid)][:, None], band[int(mid), :], (200, 200, 200))
        if c < channels - 1:
            image[c * (channel_height + 1) + channel_height] = (255, 255, 255)
    return png_bytes(image)
