"""Artifacts as files under one directory (local disk, or a mount shared by several hosts)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from tasks.contracts import ArtifactRef
from tasks.storage.base import (
    CHUNK_BYTES,
    ArtifactStream,
    ArtifactUnavailable,
    artifact_key,
    describe,
    make_ref,
    verified,
)

DEFAULT_FILE_MODE = 0o644  # readable by the other services' users on a shared mount; mkstemp alone gives 0600


class LocalDirectoryStore:
    def __init__(self, root: Path | str, file_mode: int = DEFAULT_FILE_MODE):
        self.root = Path(root).expanduser().resolve()
        self.file_mode = file_mode

    def _path(self, sha256: str) -> Path:
        return self.root / artifact_key(sha256)

    def describe_root(self) -> str:
        return str(self.root)

    def location(self, sha256: str) -> str:
        return artifact_key(sha256)

    def local_path(self, sha256: str) -> Path | None:
        return self._path(sha256)

    def put(self, data: bytes, kind: str) -> ArtifactRef:
        ref = make_ref(data, kind)
        path = self._path(ref.sha256)
        if path.exists():
            return ref
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # write, fsync, rename, fsync the directory: a reader never sees half a file, a crash after
        # put() returned never loses it, and two writers of one digest agree
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), self.file_mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_directory(path.parent)
        return ref

    def _unavailable(self, sha256: str, kind: str | None, exc: OSError) -> ArtifactUnavailable:
        if isinstance(exc, FileNotFoundError):
            reason = f"is missing from {self.root}"
        elif isinstance(exc, PermissionError):
            reason = f"cannot be read from {self.root}: permission denied ({self._path(sha256)})"
        else:
            reason = f"cannot be read from {self.root}: {exc.strerror or exc}"
        return ArtifactUnavailable(f"{describe(sha256, kind)} {reason}", sha256, kind)

    def get(self, sha256: str, kind: str | None = None) -> bytes:
        try:
            data = self._path(sha256).read_bytes()
        except OSError as exc:
            raise self._unavailable(sha256, kind, exc) from exc
        return verified(data, sha256, kind)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def open(self, sha256: str, start: int = 0, length: int | None = None,
             kind: str | None = None) -> ArtifactStream:
        try:
            handle = self._path(sha256).open("rb")
        except OSError as exc:
            raise self._unavailable(sha256, kind, exc) from exc
        size = os.fstat(handle.fileno()).st_size
        length = max(0, size - start) if length is None else min(length, max(0, size - start))
        handle.seek(start)

        def chunks():
            left = length
            while left > 0:
                block = handle.read(min(CHUNK_BYTES, left))
                if not block:
                    break
                left -= len(block)
                yield block
        return ArtifactStream(chunks(), size, start, length, handle.close)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
