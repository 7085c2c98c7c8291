"""sha256 of model files for the stage record, without re-hashing 15 GB on every worker start.

Digests are cached per (absolute path, size, mtime_ns) in memory and, once a worker names a cache
file (`use_cache_file`), on disk in the data directory. A digest served from the disk cache is
re-hashed later in a background thread (after VERIFY_DELAY_S, one file at a time, so it stays off
the load's and the first frame's critical path): a file rewritten in place with the same size and
mtime is then logged as an error and its entry corrected, so a bad cache never outlives one process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

VERIFY_DELAY_S = 120.0  # a worker's start (weights load, kernels compile, first song) goes first

_Key = tuple[str, int, int]
_lock = threading.Lock()
_digests: dict[_Key, str] = {}
_cache_file: Path | None = None
_unverified: set[_Key] = set()  # digests taken from the disk cache and not yet hashed again
_queued: list[_Key] = []
_verifier: threading.Thread | None = None


def _key(path: Path) -> _Key:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def hash_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def use_cache_file(path: Path | str | None) -> None:
    """Persist digests in `path` (JSON) from now on, and take the ones already stored there."""
    global _cache_file
    with _lock:
        wanted = Path(path) if path is not None else None
        if wanted == _cache_file:
            return
        _cache_file = wanted
        if _cache_file is None or not _cache_file.is_file():
            return
        try:
            stored = json.loads(_cache_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("checksum cache %s is unreadable (%s); hashing from scratch", _cache_file, exc)
            return
        for entry in stored.get("files", []):
            key = (entry["path"], int(entry["size"]), int(entry["mtime_ns"]))
            if key not in _digests:
                _digests[key] = entry["sha256"]
                _unverified.add(key)


def sha256_file(path: Path | str) -> str:
    """The file's sha256: from the caches when its size and mtime are unchanged, else hashed now."""
    global _verifier
    key = _key(Path(path))
    with _lock:
        cached = _digests.get(key)
        if cached is not None and key in _unverified:
            _unverified.discard(key)  # a digest from disk that is used: hash it again, later
            _queued.append(key)
            if _verifier is None or not _verifier.is_alive():
                _verifier = threading.Thread(target=_verify_queued, name="songpipe-checksum-verify", daemon=True)
                _verifier.start()
    if cached is not None:
        return cached
    digest = hash_file(path)
    with _lock:
        _digests[key] = digest
        _save_locked()
    return digest


def wait_for_verification(timeout_s: float | None = None) -> None:
    """For tests and clean shutdowns: join the background re-hashing started so far."""
    with _lock:
        verifier = _verifier
    if verifier is not None:
        verifier.join(timeout_s)


def _verify_queued() -> None:
    time.sleep(VERIFY_DELAY_S)
    while True:
        with _lock:
            if not _queued:
                return
            key = _queued.pop(0)
        _verify(key)


def _verify(key: _Key) -> None:
    path = Path(key[0])
    try:
        if _key(path) != key:
            return  # changed since: the next sha256_file call hashes it afresh
        digest = hash_file(path)
    except OSError as exc:
        log.warning("could not re-verify the checksum of %s: %s", path, exc)
        return
    with _lock:
        if _digests.get(key) != digest:
            log.error("checksum cache was wrong for %s (same size and mtime, different content): "
                      "cached %s, now %s; the cache is corrected", path, _digests.get(key), digest)
            _digests[key] = digest
            _save_locked()


def _save_locked() -> None:
    if _cache_file is None:
        return
    files = [{"path": p, "size": s, "mtime_ns": m, "sha256": d} for (p, s, m), d in sorted(_digests.items())]
    try:
        _cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_cache_file.parent, prefix=".checksums-")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"files": files}, handle)
            os.replace(tmp, _cache_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:  # a read-only data dir costs a re-hash next start, nothing else
        log.warning("could not write checksum cache %s: %s", _cache_file, exc)


def reset() -> None:
    """Forget every digest and the cache file (tests)."""
    global _cache_file
    with _lock:
        _digests.clear()
        _unverified.clear()
        _queued.clear()
        _cache_file = None
