"""Content-addressed artifact storage: bytes in, sha256 out, and back.

One small interface (`ArtifactStore`) so a deployment can swap the local directory for a shared
or object store: GPU workers on other hosts write what CPU workers and the web tier read. Keys
are always derived from the sha256, never from anything a client sends, so no path traversal.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

from tasks.contracts import ArtifactRef

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

MEDIA_TYPES = {"tokens": "application/x-npy", "wav": "audio/wav", "mp3": "audio/mpeg"}


class ArtifactIntegrityError(RuntimeError):
    """Stored bytes no longer match their sha256 (or are missing)."""


class ArtifactStore(Protocol):
    def put(self, data: bytes, kind: str) -> ArtifactRef: ...
    def get(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...
    def location(self, sha256: str) -> str: ...


def artifact_key(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


class LocalDirectoryStore:
    """Files under one root directory (local disk or a shared mount such as NFS)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def _path(self, sha256: str) -> Path:
        return self.root / artifact_key(sha256)

    def location(self, sha256: str) -> str:
        return artifact_key(sha256)

    def put(self, data: bytes, kind: str) -> ArtifactRef:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: a reader never sees half a file, two writers of one digest agree
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        return ArtifactRef(sha256=digest, kind=kind, bytes=len(data), media_type=MEDIA_TYPES[kind])

    def get(self, sha256: str) -> bytes:
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactIntegrityError(f"artifact {sha256} is missing from {self.root}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ArtifactIntegrityError(f"artifact {sha256} is corrupted: stored bytes hash to {actual}")
        return data

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def local_path(self, sha256: str) -> Path:
        return self._path(sha256)


def artifact_shas(payload: Any) -> list[str]:
    """Every sha256 of an ArtifactRef found anywhere in a stage's recorded output."""
    found: list[str] = []
    if isinstance(payload, dict):
        if {"sha256", "kind", "bytes", "media_type"} <= payload.keys():
            found.append(payload["sha256"])
        for value in payload.values():
            found.extend(artifact_shas(value))
    elif isinstance(payload, list):
        for value in payload:
            found.extend(artifact_shas(value))
    return found


def open_store(root: Path | str) -> LocalDirectoryStore:
    return LocalDirectoryStore(root)
