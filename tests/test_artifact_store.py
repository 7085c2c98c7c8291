"""The local directory store: modes, durability, clean failure, typed errors naming the artifact."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from tasks.settings import Settings
from tasks.storage import (
    ArtifactIntegrityError,
    ArtifactStore,
    ArtifactUnavailable,
    LocalDirectoryStore,
    S3Store,
    open_store,
)

DATA = b"RIFF" + bytes(range(256)) * 40


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_world_readable_by_default_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        ref = LocalDirectoryStore(tmp_path).put(DATA, "wav")
    finally:
        os.umask(old)
    assert _mode(LocalDirectoryStore(tmp_path).local_path(ref.sha256)) == 0o644


def test_file_mode_comes_from_the_settings_in_octal(tmp_path, monkeypatch):
    monkeypatch.setenv("SONGPIPE_ARTIFACT_FILE_MODE", "0640")
    store = open_store(Settings(data_dir=tmp_path))
    ref = store.put(DATA, "wav")
    assert _mode(store.local_path(ref.sha256)) == 0o640


@pytest.mark.parametrize("value", ["rw-r--r--", "0999", "1777"])
def test_a_bad_file_mode_is_refused_naming_the_setting(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SONGPIPE_ARTIFACT_FILE_MODE", value)
    with pytest.raises(ValueError, match="artifact_file_mode"):
        Settings(data_dir=tmp_path)


def test_put_returns_the_reference_and_get_the_same_bytes(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    ref = store.put(DATA, "wav")
    assert (ref.sha256, ref.bytes, ref.media_type) == (hashlib.sha256(DATA).hexdigest(), len(DATA), "audio/wav")
    assert store.exists(ref.sha256) and store.get(ref.sha256) == DATA
    assert store.put(DATA, "wav") == ref  # idempotent


def test_put_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    LocalDirectoryStore(tmp_path).put(DATA, "wav")
    assert synced == ["file", "dir"]


def test_a_failed_write_leaves_no_temp_file_and_no_artifact(tmp_path, monkeypatch):
    store = LocalDirectoryStore(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.put(DATA, "wav")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_missing_artifact_is_unavailable_naming_sha_and_kind(tmp_path):
    sha = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(ArtifactUnavailable, match=f"wav artifact {sha} is missing") as caught:
        LocalDirectoryStore(tmp_path).get(sha, "wav")
    assert (caught.value.sha256, caught.value.kind) == (sha, "wav")
    assert isinstance(caught.value, ArtifactIntegrityError)  # existing callers catch the base


def test_an_unreadable_artifact_is_unavailable_naming_it(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    ref = store.put(DATA, "tokens")
    path = store.local_path(ref.sha256)
    # root reads through chmod 000, so the OS refusal every user gets is a directory in the file's place
    path.unlink()
    path.mkdir()
    with pytest.raises(ArtifactUnavailable, match=f"tokens artifact {ref.sha256} cannot be read"):
        store.get(ref.sha256, "tokens")
    if os.geteuid() != 0:
        path.rmdir()
        path.write_bytes(DATA)
        path.chmod(0)
        with pytest.raises(ArtifactUnavailable, match="permission denied"):
            store.get(ref.sha256, "tokens")


def test_corrupted_bytes_are_an_integrity_error(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    ref = store.put(DATA, "wav")
    store.local_path(ref.sha256).write_bytes(b"tampered")
    with pytest.raises(ArtifactIntegrityError, match="corrupted"):
        store.get(ref.sha256, "wav")


def test_open_streams_the_whole_object_or_a_range(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    ref = store.put(DATA, "wav")
    with store.open(ref.sha256) as stream:
        assert (stream.size, stream.length, stream.read()) == (len(DATA), len(DATA), DATA)
    with store.open(ref.sha256, 10, 100) as stream:
        assert (stream.start, stream.length, stream.read()) == (10, 100, DATA[10:110])
    with store.open(ref.sha256, len(DATA) - 5) as stream:
        assert stream.read() == DATA[-5:]


def test_open_store_picks_the_implementation_from_the_settings(tmp_path):
    local = open_store(Settings(data_dir=tmp_path))
    remote = open_store(Settings(data_dir=tmp_path, artifact_url="s3://songpipe-bucket/some/prefix"))
    assert isinstance(local, LocalDirectoryStore) and local.root == (tmp_path / "artifacts").resolve()
    assert isinstance(remote, S3Store) and (remote.bucket, remote.prefix) == ("songpipe-bucket", "some/prefix")
    assert remote.local_path("0" * 64) is None
    assert isinstance(local, ArtifactStore) and isinstance(remote, ArtifactStore)


@pytest.mark.parametrize("url", ["http://bucket/prefix", "s3:///prefix", "s3://bucket/p?x=1", "bucket/prefix"])
def test_a_bad_artifact_url_is_refused_naming_the_setting(tmp_path, url):
    with pytest.raises(ValueError, match="artifact_url"):
        Settings(data_dir=tmp_path, artifact_url=url)
