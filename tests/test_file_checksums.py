"""Model file checksums: hashed once per file version, persisted across processes, re-verified."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gpu_worker.checkpoints import file_checksums


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    monkeypatch.setattr(file_checksums, "VERIFY_DELAY_S", 0.0)
    file_checksums.reset()
    yield
    if file_checksums.VERIFY_DELAY_S == 0.0:
        file_checksums.wait_for_verification(10)
    file_checksums.reset()


def _write(path: Path, data: bytes, mtime_ns: int = 1_700_000_000_000_000_000) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_a_digest_is_persisted_and_reused_by_a_new_process_without_rehashing(tmp_path, monkeypatch):
    weights = _write(tmp_path / "model.safetensors", b"weights" * 1000)
    cache = tmp_path / "data" / "checksums.json"
    file_checksums.use_cache_file(cache)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert file_checksums.sha256_file(weights) == expected
    assert json.loads(cache.read_text())["files"][0]["sha256"] == expected

    file_checksums.reset()  # as a restarted worker: nothing in memory
    file_checksums.use_cache_file(cache)
    hashed: list[str] = []
    real_hash = file_checksums.hash_file
    monkeypatch.setattr(file_checksums, "hash_file", lambda p: hashed.append(str(p)) or real_hash(p))
    assert file_checksums.sha256_file(weights) == expected
    file_checksums.wait_for_verification(10)
    assert hashed == [str(weights.resolve())]  # once, by the background re-verification only


def test_a_changed_file_is_hashed_again(tmp_path):
    weights = _write(tmp_path / "w.bin", b"one")
    file_checksums.use_cache_file(tmp_path / "checksums.json")
    first = file_checksums.sha256_file(weights)
    _write(weights, b"two", mtime_ns=1_800_000_000_000_000_000)
    assert file_checksums.sha256_file(weights) == hashlib.sha256(b"two").hexdigest() != first


def test_a_wrong_cached_digest_is_corrected_by_the_background_check(tmp_path, caplog):
    weights = _write(tmp_path / "w.bin", b"real content")
    cache = tmp_path / "checksums.json"
    stat = weights.stat()
    cache.write_text(json.dumps({"files": [{"path": str(weights.resolve()), "size": stat.st_size,
                                            "mtime_ns": stat.st_mtime_ns, "sha256": "0" * 64}]}))
    file_checksums.use_cache_file(cache)
    assert file_checksums.sha256_file(weights) == "0" * 64  # served from the cache at once
    file_checksums.wait_for_verification(10)
    real = hashlib.sha256(b"real content").hexdigest()
    assert file_checksums.sha256_file(weights) == real
    assert json.loads(cache.read_text())["files"][0]["sha256"] == real
    assert "checksum cache was wrong" in caplog.text


def test_an_unreadable_cache_file_means_hashing_from_scratch(tmp_path):
    weights = _write(tmp_path / "w.bin", b"abc")
    cache = tmp_path / "checksums.json"
    cache.write_text("{not json")
    file_checksums.use_cache_file(cache)
    assert file_checksums.sha256_file(weights) == hashlib.sha256(b"abc").hexdigest()


def test_the_re_verification_waits_until_the_worker_has_started(tmp_path, monkeypatch):
    weights = _write(tmp_path / "w.bin", b"weights")
    cache = tmp_path / "checksums.json"
    file_checksums.use_cache_file(cache)
    file_checksums.sha256_file(weights)
    file_checksums.reset()
    monkeypatch.setattr(file_checksums, "VERIFY_DELAY_S", 3600.0)
    file_checksums.use_cache_file(cache)
    hashed: list[str] = []
    monkeypatch.setattr(file_checksums, "hash_file", lambda p: hashed.append(str(p)) or "")
    assert file_checksums.sha256_file(weights) == hashlib.sha256(b"weights").hexdigest()
    assert hashed == []  # served from the cache; the check is queued behind the delay, not run now
