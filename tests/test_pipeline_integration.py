"""A job submitted over HTTP runs through real Celery workers and leaves a complete SQL record.

Runs on SQLite and on PostgreSQL: real Redis, real worker processes (cpu and gpu queues), the tiny
random checkpoint on CPU. One successful and one failing job per backend are shared by the tests
below, each of which checks one property of the record.
"""
from __future__ import annotations

import hashlib

import pytest

from tasks.artifact_store import open_store
from tasks.contracts import STAGES
from tests.stack_fixtures import Stack

pytestmark = pytest.mark.integration

SONG = {"lyrics": "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you", "tags": "ska", "seed": 11,
        "max_audio_length_ms": 2000}
_finished: dict[tuple[str, str], dict] = {}


def _run_once(stack: Stack, name: str, body: dict) -> dict:
    """Submit `body` once per stack and return the finished job record (shared across tests)."""
    key = (stack.name, name)
    if key not in _finished:
        submitted = stack.submit(body)
        stack.wait_for_job(submitted["id"])
        _finished[key] = {"submitted": submitted, "job": stack.job(submitted["id"])}
    return _finished[key]


@pytest.fixture
def song(stack: Stack) -> dict:
    return _run_once(stack, "song", SONG)["job"]


@pytest.fixture
def failed(stack: Stack) -> dict:
    # Lyrics that are only stage directions pass the API (not blank) but leave nothing singable:
    # a real, deterministic failure at the first stage, which must stop the chain.
    return _run_once(stack, "failed", {**SONG, "lyrics": "[guitar solo]\n(whispered)"})["job"]


def _stage(job: dict, name: str) -> dict:
    rows = [row for row in job["stages"] if row["stage"] == name]
    assert len(rows) == 1, f"expected one {name} row, got {len(rows)}"
    return rows[0]


def test_submitted_job_succeeds(song):
    assert song["status"] == "succeeded", song.get("error_message")


def test_every_stage_has_one_succeeded_row_in_pipeline_order(song):
    assert [row["stage"] for row in song["stages"]] == list(STAGES)
    assert all(row["status"] == "succeeded" and row["attempt"] == 1 for row in song["stages"])


def test_every_stage_records_full_inputs_and_outputs(song):
    for row in song["stages"]:
        assert row["inputs"] and row["outputs"], row["stage"]
    assert _stage(song, "refine_lyrics")["inputs"]["lyrics"] == SONG["lyrics"]


def test_the_submitted_seed_reaches_the_token_stage(song):
    assert song["seed"] == SONG["seed"] and song["seed_source"] == "user"
    assert _stage(song, "generate_tokens")["inputs"]["seed"] == SONG["seed"]
    assert _stage(song, "decode_audio")["inputs"]["seed"] == SONG["seed"]


def test_tags_reach_the_model_exactly_as_sent(song):
    assert _stage(song, "generate_tags")["outputs"]["tags_string"] == "ska"
    assert _stage(song, "generate_tokens")["inputs"]["tags"] == "ska"
    assert song["tags_used"] == "ska"


def test_only_token_generation_and_decoding_run_on_the_gpu_queue(song):
    queues = {row["stage"]: row["queue"] for row in song["stages"]}
    assert {stage for stage, queue in queues.items() if queue == "gpu"} == {"generate_tokens", "decode_audio"}
    assert {queue for queue in queues.values()} == {"cpu", "gpu"}


def test_every_stage_records_its_environment_and_worker(song):
    for row in song["stages"]:
        env = row["environment"]
        assert env["python"] and env["code_version"] and env["hostname"], row["stage"]
        assert row["worker_hostname"] and row["worker_pid"] and row["duration_s"] is not None
        assert row["started_at"] <= row["finished_at"]


def test_gpu_stages_record_model_file_checksums(song):
    for stage in ("generate_tokens", "decode_audio"):
        checksums = _stage(song, stage)["environment"]["model_checksums"]
        assert checksums and all(len(str(v)) >= 64 or isinstance(v, dict) for v in checksums.values())


def test_a_tiny_random_checkpoint_is_flagged_on_the_job(song):
    assert song["tiny_checkpoint"] is True and "noise, not music" in song["notice"]


def test_artifacts_are_stored_under_their_checksums(song, stack):
    store = open_store(stack.settings.resolved_artifact_dir)
    refs = [_stage(song, "generate_tokens")["outputs"]["tokens"], _stage(song, "decode_audio")["outputs"]["wav"],
            _stage(song, "encode_audio")["outputs"]["audio"]]
    for ref in refs:
        data = store.get(ref["sha256"])
        assert hashlib.sha256(data).hexdigest() == ref["sha256"] and len(data) == ref["bytes"]


def test_token_progress_reaches_the_frame_count(song):
    row = _stage(song, "generate_tokens")
    assert row["progress"]["done"] == row["progress"]["total"] == row["outputs"]["frames"]


def test_audio_endpoint_serves_the_mp3(song, stack):
    status, headers, body = stack.http("GET", song["links"]["audio"])
    assert status == 200 and headers["Content-Type"] == "audio/mpeg"
    assert hashlib.sha256(body).hexdigest() == _stage(song, "encode_audio")["outputs"]["audio"]["sha256"]


def test_failing_stage_records_error_type_message_and_traceback(failed):
    row = _stage(failed, "refine_lyrics")
    assert row["status"] == "failed"
    assert row["error_type"].endswith("LyricsError") and "nothing singable" in row["error_message"]
    assert "Traceback" in row["traceback"]
    assert row["inputs"]["lyrics"] == "[guitar solo]\n(whispered)"  # the input that failed is on record


def test_failure_fails_the_job_naming_the_stage(failed):
    assert failed["status"] == "failed"
    assert failed["failed_stage"] == "refine_lyrics" and failed["error_message"]


def test_failure_stops_the_chain(failed):
    for stage in ("generate_tags", "generate_tokens", "decode_audio", "encode_audio"):
        row = _stage(failed, stage)
        # never started, and marked so in the transaction that failed the job (no row of it stays queued)
        assert row["status"] == "skipped" and row["started_at"] is None and row["inputs"] is None, stage
        assert "refine_lyrics failed" in row["error_message"], stage


def test_failed_job_has_no_audio(failed, stack):
    status, headers, _ = stack.http("GET", failed["links"]["audio"])
    assert status == 404 and headers["Content-Type"] == "application/json"
