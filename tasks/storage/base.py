"""The artifact store's interface, shared by every implementation and every caller.

Artifacts are content-addressed: the key is derived from the sha256 and never from anything a
client sends (no path traversal), and two writers of one digest write the same bytes.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

from tasks.contracts import ArtifactRef

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# pcm: one streamed window's final samples, 16-bit little-endian interleaved stereo at 48 kHz (docs/streaming.md)
MEDIA_TYPES = {"tokens": "application/x-npy", "wav": "audio/wav", "mp3": "audio/mpeg",
               "pcm": "audio/L16;rate=48000;channels=2"}
CHUNK_BYTES = 256 * 1024


class ArtifactIntegrityError(RuntimeError):
    """An artifact cannot be read back intact: its stored bytes no longer match the sha256, or
    (subclass ArtifactUnavailable) it cannot be read at all."""

    def __init__(self, message: str, sha256: str = "", kind: str | None = None):
        super().__init__(message)
        self.sha256, self.kind = sha256, kind


class ArtifactUnavailable(ArtifactIntegrityError):
    """The store cannot hand out a recorded artifact: missing, permission denied, store unreachable."""


def describe(sha256: str, kind: str | None) -> str:
    return f"{kind} artifact {sha256}" if kind else f"artifact {sha256}"


def artifact_key(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


def make_ref(data: bytes, kind: str) -> ArtifactRef:
    if kind not in MEDIA_TYPES:
        raise ValueError(f"unknown artifact kind {kind!r}; kinds are {', '.join(MEDIA_TYPES)}")
    return ArtifactRef.model_validate({"sha256": hashlib.sha256(data).hexdigest(), "kind": kind,
                                       "bytes": len(data), "media_type": MEDIA_TYPES[kind]})


def verified(data: bytes, sha256: str, kind: str | None) -> bytes:
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ArtifactIntegrityError(f"{describe(sha256, kind)} is corrupted: stored bytes hash to {actual}",
                                     sha256, kind)
    return data


class ArtifactStream:
    """An open artifact (or a byte range of it): `size` is the whole object's length, `length` the
    range's; iterate for the bytes, close when done (a context manager closes too)."""

    def __init__(self, chunks: Iterator[bytes], size: int, start: int, length: int, close=lambda: None):
        self._chunks, self.size, self.start, self.length, self._close = chunks, size, start, length, close

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def read(self) -> bytes:
        return b"".join(self._chunks)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@runtime_checkable
class ArtifactStore(Protocol):
    """What the whole code uses; `open_store(settings)` picks the implementation."""

    def put(self, data: bytes, kind: str) -> ArtifactRef:
        """Store bytes (idempotent for one digest); returns the reference recorded in SQL."""
        ...

    def get(self, sha256: str, kind: str | None = None) -> bytes:
        """The verified bytes; ArtifactUnavailable / ArtifactIntegrityError name the artifact."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def open(self, sha256: str, start: int = 0, length: int | None = None,
             kind: str | None = None) -> ArtifactStream:
        """A streaming read of the object or of bytes [start, start+length) (not verified: ranges)."""
        ...

    def location(self, sha256: str) -> str:
        """Where the object lives, for the record (a key under the store's root)."""
        ...

    def local_path(self, sha256: str) -> Path | None:
        """A file the web tier may send directly, or None when the store is remote."""
        ...

    def describe_root(self) -> str:
        """The store's root for messages (a directory or s3://bucket/prefix)."""
        ...
