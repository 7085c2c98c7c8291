"""Content-addressed artifact storage: bytes in, sha256 out, and back (docs/storage.md).

`open_store(settings)` picks the implementation: an S3-protocol bucket when
`SONGPIPE_ARTIFACT_URL` is set, else a local directory (`SONGPIPE_ARTIFACT_DIR`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.settings import Settings
from tasks.storage.base import (
    MEDIA_TYPES,
    ArtifactIntegrityError,
    ArtifactStore,
    ArtifactStream,
    ArtifactUnavailable,
    artifact_key,
)
from tasks.storage.local import LocalDirectoryStore
from tasks.storage.s3 import ArtifactWriteError, S3Store

__all__ = ["MEDIA_TYPES", "ArtifactIntegrityError", "ArtifactStore", "ArtifactStream", "ArtifactUnavailable",
           "ArtifactWriteError", "LocalDirectoryStore", "S3Store", "artifact_key", "artifact_shas", "open_store"]


def open_store(settings: Settings | Path | str) -> ArtifactStore:
    """The store the settings name; a bare path is a local directory (tools and tests)."""
    if not isinstance(settings, Settings):
        return LocalDirectoryStore(settings)
    if settings.artifact_url:
        return S3Store(settings.artifact_url)
    return LocalDirectoryStore(settings.resolved_artifact_dir, file_mode=settings.artifact_file_mode)


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
