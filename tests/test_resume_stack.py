"""Resume a half-made song (issue 12): `songpipe run` with batching on, the GPU worker killed mid-song.

Real processes under the supervisor (embedded Redis, SQLite, the tiny checkpoint on the CPU, lease 3 s).
The batching engine records the song's frames so far every 16 frames; after a SIGKILL of the GPU
worker the supervisor restarts it, the reconciler gives the song a new attempt, and that attempt
continues from the last checkpoint. The finished song must equal an uninterrupted run of the same
request (same seed): the token and audio artifacts have the same sha256.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
from typing import Any

import pytest

from tests.stack_fixtures import wait_until
from tests.supervised_stack import supervised_stack

pytestmark = pytest.mark.integration

EVERY = 16
RESUME_ENV = {"SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_TOKEN_CHECKPOINT_FRAMES": str(EVERY)}
BODY = {"lyrics": "de doo doo doo\nde blaa blaa blaa", "seed": 4242, "max_audio_length_ms": 10_240,
        "tags": ["ska", "songpipe-fault-slow-40"],  # the engine steps a frame every 40 ms: time to strike
        "output_format": "wav"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint_dir):
    with supervised_stack(tmp_path_factory.mktemp("resume"), tiny_checkpoint_dir, RESUME_ENV) as running:
        yield running


def token_attempts(stack, job_id: str) -> list[dict[str, Any]]:
    with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
        rows = db.execute("SELECT attempt, status, progress, environment, outputs, worker_pid FROM stage_runs "
                          "WHERE job_id = ? AND stage = 'generate_tokens' ORDER BY attempt", (job_id,)).fetchall()
    keys = ("attempt", "status", "progress", "environment", "outputs", "worker_pid")
    return [{k: (json.loads(v) if isinstance(v, str) and k in ("progress", "environment", "outputs") else v)
             for k, v in zip(keys, row)} for row in rows]


def artifacts(stack, job_id: str) -> dict[str, str]:
    with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
        rows = db.execute("SELECT stage, outputs FROM stage_runs WHERE job_id = ? AND status = 'succeeded'",
                          (job_id,)).fetchall()
    outputs = {stage: json.loads(raw) for stage, raw in rows}
    return {"tokens": outputs["generate_tokens"]["tokens"]["sha256"], "wav": outputs["decode_audio"]["wav"]["sha256"]}


def test_a_song_whose_gpu_worker_is_killed_mid_song_resumes_from_its_checkpoint_with_identical_tokens(stack):
    job_id = stack.submit(BODY)

    def checkpointed() -> bool:
        rows = token_attempts(stack, job_id)
        point = ((rows[-1]["progress"] or {}).get("checkpoint") or {}) if rows else {}
        return rows[-1]["status"] == "running" and point.get("done", 0) >= 2 * EVERY if rows else False

    wait_until(checkpointed, 180, "a token checkpoint of 32 frames or more")
    first = token_attempts(stack, job_id)[0]
    point = first["progress"]["checkpoint"]
    assert first["progress"]["done"] < first["progress"]["total"], "the song finished before the kill"
    old = stack.pid("gpu")
    os.killpg(old, signal.SIGKILL)
    assert stack.wait_for_new_pid("gpu", old) != old
    view = stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", view.get("error_message")

    rows = token_attempts(stack, job_id)
    assert [(r["attempt"], r["status"]) for r in rows] == [(1, "lost"), (2, "succeeded")], rows
    last = rows[0]["progress"]["checkpoint"]  # the furthest checkpoint recorded before the kill
    assert last["done"] >= point["done"] >= 2 * EVERY
    resumed = rows[1]["environment"]["resumed_from"]
    assert resumed["attempt"] == 1 and resumed["frames"] == last["done"]
    assert resumed["tokens_sha256"] == last["tokens"]["sha256"]
    assert rows[1]["worker_pid"] != first["worker_pid"]
    assert rows[1]["outputs"]["frames"] > resumed["frames"]

    again = stack.submit(BODY)  # the same request, never interrupted
    assert stack.wait_for_job(again)["status"] == "succeeded"
    (uninterrupted,) = token_attempts(stack, again)
    assert "resumed_from" not in uninterrupted["environment"]
    assert uninterrupted["environment"]["token_checkpoints"] >= 2
    assert artifacts(stack, job_id) == artifacts(stack, again)  # the same tokens and the same audio, bit for bit


def test_a_hung_engine_is_reclaimed_its_songs_retried_in_a_fresh_process_and_continued(stack):
    """No frame step for 3 leases while songs are live: every song of the engine fails (EngineStalled),
    the worker process is replaced although its heartbeat kept beating, and each song's retry succeeds;
    the song that had a checkpoint continues from it with the tokens of an uninterrupted run."""
    companion = stack.submit(BODY)
    wait_until(lambda: ((token_attempts(stack, companion)[-1]["progress"] or {}).get("checkpoint") or {})
               .get("done", 0) >= EVERY if token_attempts(stack, companion) else False, 180, "a checkpoint")
    old = stack.pid("gpu")
    hung = stack.submit({**BODY, "seed": 77, "tags": ["ska", "songpipe-fault-hang-once"]})
    for job_id in (companion, hung):
        assert stack.wait_for_job(job_id)["status"] == "succeeded", job_id
    assert stack.pid("gpu") != old
    assert "engine stopped stepping" in stack.output()  # the reason the worker gave for its replacement

    for job_id in (companion, hung):
        rows = token_attempts(stack, job_id)
        # the retry may reach the process on its way out first: it is handed back (lost), not failed
        statuses = [r["status"] for r in rows]
        assert statuses[0] == "failed" and statuses[-1] == "succeeded" and set(statuses[1:-1]) <= {"lost"}, statuses
        first, second = rows[0], rows[-1]
        assert first["worker_pid"] == old and second["worker_pid"] != old
        with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
            (error_type, message), = db.execute(
                "SELECT error_type, error_message FROM stage_runs WHERE job_id = ? AND stage = 'generate_tokens' "
                "AND attempt = 1", (job_id,)).fetchall()
        assert error_type.endswith("EngineStalled") and "no frame step" in message
        assert first["environment"]["worker_process"]["replaced_after_this_failure"] is True
    resumed = token_attempts(stack, companion)[-1]["environment"]["resumed_from"]
    assert resumed["attempt"] == 1 and resumed["frames"] >= EVERY
    assert "resumed_from" not in token_attempts(stack, hung)[-1]["environment"]  # it had no checkpoint yet

    reference = stack.submit(BODY)
    assert stack.wait_for_job(reference)["status"] == "succeeded"
    assert artifacts(stack, companion) == artifacts(stack, reference)


def test_a_device_error_in_one_song_gives_its_batch_mates_new_attempts_that_continue(stack):
    """Another song's (simulated) device-side assert poisons the shared engine: that song fails with the
    poison; its batch mate fails with EngineLost, is retried in the fresh process and continues from its
    checkpoint with the tokens of an uninterrupted run."""
    companion = stack.submit({**BODY, "seed": 4243})
    wait_until(lambda: ((token_attempts(stack, companion)[-1]["progress"] or {}).get("checkpoint") or {})
               .get("done", 0) >= EVERY if token_attempts(stack, companion) else False, 180, "a checkpoint")
    old = stack.pid("gpu")
    culprit = stack.submit({**BODY, "seed": 78, "tags": ["ska", "songpipe-fault-cuda-assert"]})
    assert stack.wait_for_job(culprit)["status"] == "failed"
    assert stack.wait_for_job(companion)["status"] == "succeeded"
    assert stack.pid("gpu") != old

    (poisoned,) = token_attempts(stack, culprit)
    assert poisoned["environment"]["worker_process"]["replaced_after_this_failure"] is True
    rows = token_attempts(stack, companion)
    statuses = [r["status"] for r in rows]
    assert statuses[0] == "failed" and statuses[-1] == "succeeded" and set(statuses[1:-1]) <= {"lost"}, statuses
    with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
        (error_type, message), = db.execute(
            "SELECT error_type, error_message FROM stage_runs WHERE job_id = ? AND stage = 'generate_tokens' "
            "AND attempt = 1", (companion,)).fetchall()
    assert error_type.endswith("EngineLost") and "device-side assert" in message
    assert rows[-1]["worker_pid"] != old and rows[-1]["environment"]["resumed_from"]["attempt"] == 1

    reference = stack.submit({**BODY, "seed": 4243})
    assert stack.wait_for_job(reference)["status"] == "succeeded"
    assert artifacts(stack, companion) == artifacts(stack, reference)
