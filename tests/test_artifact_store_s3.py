"""The S3-protocol store against a local S3 server (moto's, with authentication on).

Direct calls (put/get/exists/streaming reads, missing and denied objects), then a real pipeline
job through the stack fixtures with SONGPIPE_ARTIFACT_URL on the bucket: the web tier serves its
audio from the object store, and an object deleted or denied under a stage is a recorded stage
failure naming the artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tasks.storage import (
    ArtifactIntegrityError,
    ArtifactUnavailable,
    S3Store,
    artifact_key,
)
from tests import stack_fixtures
from tests.s3_stand_in import S3StandIn, s3_stand_in

DATA = bytes(range(256)) * 2000  # 512 kB: several streamed chunks
SONG = {"lyrics": "objects in a bucket\nfar from the gpu", "tags": "ska", "seed": 5, "max_audio_length_ms": 2000}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3StandIn]:
    with s3_stand_in(tmp_path_factory.mktemp("moto")) as server:
        yield server


def _store(s3: S3StandIn, prefix: str = "direct") -> S3Store:
    return S3Store(s3.url(prefix), client=s3.client())


def test_put_get_exists_through_the_s3_protocol(s3):
    store = _store(s3)
    ref = store.put(DATA, "wav")
    assert ref.sha256 == hashlib.sha256(DATA).hexdigest() and ref.bytes == len(DATA)
    assert store.exists(ref.sha256)
    assert store.get(ref.sha256, "wav") == DATA
    assert f"direct/{artifact_key(ref.sha256)}" in s3.keys()
    assert store.put(DATA, "wav") == ref  # idempotent


def test_streaming_reads_whole_and_ranged(s3):
    store = _store(s3)
    ref = store.put(DATA, "wav")
    with store.open(ref.sha256) as stream:
        chunks = list(stream)
    assert len(chunks) > 1 and b"".join(chunks) == DATA
    with store.open(ref.sha256, 1000, 5000) as stream:
        assert (stream.size, stream.start, stream.length) == (len(DATA), 1000, 5000)
        assert stream.read() == DATA[1000:6000]
    with store.open(ref.sha256, len(DATA) + 10) as stream:
        assert stream.length == 0 and stream.read() == b""


def test_a_missing_object_is_unavailable_naming_it(s3):
    store = _store(s3)
    sha = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(sha)
    with pytest.raises(ArtifactUnavailable, match=f"tokens artifact {sha} is missing from s3://"):
        store.get(sha, "tokens")


def test_a_corrupted_object_is_an_integrity_error(s3):
    store = _store(s3)
    sha = hashlib.sha256(b"the real bytes").hexdigest()
    s3.client().put_object(Bucket=s3.bucket, Key=f"direct/{artifact_key(sha)}", Body=b"other bytes")
    with pytest.raises(ArtifactIntegrityError, match="corrupted"):
        store.get(sha, "wav")


def test_a_denied_read_is_unavailable_with_permission_denied(s3):
    store = _store(s3)
    ref = store.put(b"guarded", "wav")
    s3.revoke()
    try:
        with pytest.raises(ArtifactUnavailable, match=f"wav artifact {ref.sha256} .*permission denied"):
            store.get(ref.sha256, "wav")
    finally:
        s3.grant()
    assert store.get(ref.sha256, "wav") == b"guarded"  # the denial was the server's, now lifted


# -- a real pipeline on the object store ---------------------------------------------------------

@pytest.fixture(scope="module")
def s3_stack(s3, tmp_path_factory, redis_service, tiny_checkpoint_dir) -> Iterator[stack_fixtures.Stack]:
    workdir = tmp_path_factory.mktemp("s3-stack")
    with stack_fixtures.database("sqlite", workdir / "db") as url, \
            stack_fixtures.running_stack("s3", workdir, url, redis_service.claim_db(), tiny_checkpoint_dir,
                                         extra_env=s3.env("pipeline")) as stack:
        yield stack


@pytest.fixture(scope="module")
def s3_job(s3_stack) -> dict:
    submitted = s3_stack.submit(SONG)
    job = s3_stack.wait_for_job(submitted["id"])
    assert job["status"] == "succeeded", f"{job.get('error_message')}\n{s3_stack.logs()}"
    return job


def _outputs(job: dict, stage: str) -> dict:
    return next(row for row in job["stages"] if row["stage"] == stage and row["status"] == "succeeded")["outputs"]


def _artifact_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and len(p.name) == 64]


def test_a_job_on_the_object_store_leaves_its_artifacts_only_in_the_bucket(s3, s3_stack, s3_job):
    shas = {_outputs(s3_job, "generate_tokens")["tokens"]["sha256"], _outputs(s3_job, "decode_audio")["wav"]["sha256"],
            _outputs(s3_job, "encode_audio")["audio"]["sha256"]}
    assert {f"pipeline/{artifact_key(sha)}" for sha in shas} <= set(s3.keys())
    assert _artifact_files(s3_stack.workdir) == []


def test_the_web_tier_serves_audio_from_the_object_store(s3, s3_stack, s3_job):
    audio = _outputs(s3_job, "encode_audio")["audio"]
    stored = _store(s3, "pipeline").get(audio["sha256"])
    status, headers, body = s3_stack.http("GET", f"/api/jobs/{s3_job['id']}/audio")
    assert status == 200 and body == stored
    assert headers["Content-Type"].startswith(audio["media_type"]) and headers["Accept-Ranges"] == "bytes"


def test_the_web_tier_answers_a_range_of_the_audio_with_206(s3, s3_stack, s3_job):
    import urllib.request

    audio = _outputs(s3_job, "encode_audio")["audio"]
    stored = _store(s3, "pipeline").get(audio["sha256"])
    request = urllib.request.Request(f"{s3_stack.base_url}/api/jobs/{s3_job['id']}/audio",
                                     headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{len(stored)}"
        assert response.read() == stored[100:200]


@contextlib.contextmanager
def _encode_queued_again(stack: stack_fixtures.Stack, s3: S3StandIn, job_id: str, monkeypatch):
    """Queue a retry from encode_audio (replay's own code, not sent to any broker), let the test
    take the object away, then run the attempt with the stage runner the CPU worker runs, in this
    process; yields a dict that holds the recorded row once the block ends."""
    from db.engine import session_scope
    from db.models import Job, StageRun
    from orchestrator import replay
    from tasks.cpu_stages import encode_audio
    from tasks.recording import StageRunner
    from tasks.settings import Settings
    from tasks.stage_inputs import RESOLVERS

    for name, value in s3.env("pipeline").items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=stack.data_dir, database_url=stack.database_url, redis_url=stack.redis_url,
                        checkpoint_dir=stack.checkpoint, artifact_url=s3.url("pipeline"))
    attempt = replay.retry(job_id, "encode_audio", settings=settings, send=False).attempts["encode_audio"]
    recorded: dict = {}
    yield recorded
    runner = StageRunner("encode_audio", RESOLVERS["encode_audio"], encode_audio)
    with pytest.raises(ArtifactUnavailable):
        runner.run(job_id, attempt, settings=settings)
    with session_scope(stack.database_url) as session:
        row = session.scalars(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "encode_audio",
                                                     StageRun.attempt == attempt)).one()
        job = session.get(Job, job_id)
        recorded.update(attempt=row.attempt, status=row.status, error_type=row.error_type,
                        error_message=row.error_message, job_status=job.status, failed_stage=job.failed_stage)


def test_a_missing_object_under_a_stage_is_a_recorded_failure_naming_it(s3, s3_stack, s3_job, monkeypatch):
    wav = _outputs(s3_job, "decode_audio")["wav"]
    key = f"pipeline/{artifact_key(wav['sha256'])}"
    kept = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    try:
        with _encode_queued_again(s3_stack, s3, s3_job["id"], monkeypatch) as row:
            s3.client().delete_object(Bucket=s3.bucket, Key=key)
    finally:
        s3.client().put_object(Bucket=s3.bucket, Key=key, Body=kept)
    assert (row["status"], row["error_type"], row["attempt"]) == ("failed", "tasks.storage.base.ArtifactUnavailable", 2)
    assert f"wav artifact {wav['sha256']} is missing from s3://{s3.bucket}/pipeline" in row["error_message"]
    assert (row["job_status"], row["failed_stage"]) == ("failed", "encode_audio")


def test_a_denied_object_under_a_stage_is_a_recorded_failure_naming_it(s3, s3_stack, s3_job, monkeypatch):
    wav = _outputs(s3_job, "decode_audio")["wav"]
    try:
        with _encode_queued_again(s3_stack, s3, s3_job["id"], monkeypatch) as row:
            s3.revoke()
    finally:
        s3.grant()
    assert (row["status"], row["error_type"]) == ("failed", "tasks.storage.base.ArtifactUnavailable")
    assert f"wav artifact {wav['sha256']} cannot be read from s3://{s3.bucket}/pipeline: permission denied " \
           "(AccessDenied)" in row["error_message"]


def test_the_web_tier_answers_a_suffix_range_an_unsatisfiable_range_and_a_revalidation(s3, s3_stack, s3_job):
    import urllib.error
    import urllib.request

    audio = _outputs(s3_job, "encode_audio")["audio"]
    stored = _store(s3, "pipeline").get(audio["sha256"])
    url = f"{s3_stack.base_url}/api/jobs/{s3_job['id']}/audio"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=-50"}), timeout=30) as response:
        assert response.status == 206 and response.read() == stored[-50:]
    with pytest.raises(urllib.error.HTTPError) as beyond:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(stored) + 10}-"}), timeout=30)
    assert beyond.value.code == 416 and beyond.value.headers["Content-Range"] == f"bytes */{len(stored)}"
    with pytest.raises(urllib.error.HTTPError) as cached:
        urllib.request.urlopen(urllib.request.Request(url, headers={"If-None-Match": f'"{audio["sha256"]}"'}),
                               timeout=30)
    assert cached.value.code == 304


def test_the_admin_serves_artifacts_and_pictures_from_the_object_store(s3, s3_stack, s3_job, monkeypatch, tmp_path):
    from werkzeug.security import generate_password_hash

    from orchestrator.app import create_app
    from tasks.settings import Settings
    from tests.test_admin_auth import ADMIN_PASSWORD, FAST_HASH, log_in

    for name, value in s3.env("pipeline").items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path, database_url=s3_stack.database_url, redis_url=s3_stack.redis_url,
                        checkpoint_dir=s3_stack.checkpoint, artifact_url=s3.url("pipeline"),
                        admin_password_hash=generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH))
    client = create_app(settings).test_client()
    assert log_in(client, "admin", ADMIN_PASSWORD).status_code in (302, 303)
    wav, tokens = _outputs(s3_job, "decode_audio")["wav"], _outputs(s3_job, "generate_tokens")["tokens"]
    answer = client.get(f"/admin/artifacts/{wav['sha256']}")
    assert answer.status_code == 200 and answer.get_data() == _store(s3, "pipeline").get(wav["sha256"])
    picture = client.get(f"/admin/artifacts/{tokens['sha256']}/tokens.png")
    assert picture.status_code == 200 and picture.get_data().startswith(b"\x89PNG")
    assert _artifact_files(tmp_path) == []
