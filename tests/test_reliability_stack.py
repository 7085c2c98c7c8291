"""Nothing lost under crashes, broker loss, poisoned CUDA contexts, cancels and bursts - on the real stack.

One stack for the module: a private redis-server (so it can be killed and restarted empty), SQLite,
the web server, one CPU and one GPU Celery worker (prefork, tiny checkpoint on CPU), fault injection
on, heartbeat 0.25 s (lease 3 s) and the reconciler as its own process. Tests run in file order and
each looks at its own jobs only.
"""
from __future__ import annotations

import time

import pytest

from orchestrator.replay import cancel
from tests import reliability_fixtures as rf
from tests.stack_fixtures import count_rows

pytestmark = pytest.mark.integration

QUEUE_CAP = 12


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with rf.private_redis(tmp_path_factory.mktemp("private-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint_dir, redis):
    with rf.reliability_stack("reliability", tmp_path_factory.mktemp("reliability"), tiny_checkpoint_dir,
                              redis.url(), {"SONGPIPE_MAX_QUEUED_JOBS": str(QUEUE_CAP)}) as running:
        yield running


def _succeeded(rows):
    return [row for row in rows if row["status"] == "succeeded"]


def test_sigkill_of_the_gpu_worker_mid_generation_loses_nothing(stack):
    job = stack.submit(rf.song("slow-60", max_audio_length_ms=8000))  # 100 frames, ~6 s of generation
    running = rf.wait_for_stage(stack, job["id"], "generate_tokens",
                                lambda r: r["status"] == "running" and (r["progress"] or {}).get("done", 0) >= 25)
    assert running["progress"]["done"] < running["progress"]["total"]  # mid-generation, by SQL progress
    for name in rf.gpu_worker_names(stack):
        rf.sigkill(stack, name)
    time.sleep(1.0)
    rf.start_worker(stack, "gpu")  # the worker returns; the reconciler re-sends the lost attempt

    view = stack.wait_for_job(job["id"], timeout_s=90)
    assert view["status"] == "succeeded", view.get("error_message")
    tokens = rf.stage_rows(stack, job["id"], "generate_tokens")
    assert len(_succeeded(tokens)) == 1
    lost = tokens[0]
    assert (lost["attempt"], lost["status"], lost["error_type"]) == (1, "lost", "WorkerLost")
    assert "no heartbeat" in lost["error_message"] and "last progress" in lost["error_message"]
    assert tokens[-1]["attempt"] == 2 and tokens[-1]["status"] == "succeeded"
    for stage in ("refine_lyrics", "generate_tags"):  # succeeded stages are never re-run
        assert [r["attempt"] for r in rf.stage_rows(stack, job["id"], stage)] == [1]


def test_redis_restarted_empty_with_jobs_queued_and_running_loses_nothing(stack, redis):
    jobs = [stack.submit(rf.song("slow-40", max_audio_length_ms=4000)) for _ in range(4)]
    rf.wait_for_stage(stack, jobs[0]["id"], "generate_tokens", lambda r: r["status"] == "running")
    redis.restart_empty()

    statuses = rf.terminal_jobs(stack, [j["id"] for j in jobs], timeout_s=150)
    assert set(statuses.values()) == {"succeeded"}, f"{statuses}\n{stack.logs()}"
    for job in jobs:
        for stage in ("generate_tokens", "decode_audio", "encode_audio"):
            assert len(_succeeded(rf.stage_rows(stack, job["id"], stage))) == 1
    resent = [r for j in jobs for r in rf.stage_rows(stack, j["id"]) if r["status"] == "lost"]
    assert resent and all(r["error_type"] == "MessageLost" for r in resent)  # the empty broker was noticed


def test_cuda_poison_fails_that_job_and_the_next_job_runs_on_a_fresh_process(stack):
    poisoned = stack.submit(rf.song("cuda-assert"))
    following = stack.submit(rf.song())  # right behind it on the same GPU queue, no manual step
    a = stack.wait_for_job(poisoned["id"], timeout_s=60)
    b = stack.wait_for_job(following["id"], timeout_s=60)

    assert a["status"] == "failed" and a["failed_stage"] == "generate_tokens"
    tokens_a = rf.stage_rows(stack, poisoned["id"], "generate_tokens")
    assert len(tokens_a) == 1  # deterministic: recorded once, not retried, the re-delivery backed off
    row_a = tokens_a[0]
    assert row_a["error_type"].endswith("SimulatedCudaPoison") and "device-side assert" in row_a["error_message"]
    assert row_a["inputs"]["tags"] and row_a["inputs"]["seed"] == a["seed"]  # the stage inputs are on record
    assert row_a["environment"]["worker_process"]["replaced_after_this_failure"] is True
    assert row_a["deliveries"] == 1

    assert b["status"] == "succeeded", b.get("error_message")
    row_b = rf.stage_rows(stack, following["id"], "generate_tokens")[-1]
    assert row_b["worker_pid"] != row_a["worker_pid"]


def test_transient_out_of_memory_is_retried_once_on_a_fresh_process(stack):
    job = stack.submit(rf.song("oom-once"))
    view = stack.wait_for_job(job["id"], timeout_s=60)
    assert view["status"] == "succeeded", view.get("error_message")
    first, second = rf.stage_rows(stack, job["id"], "generate_tokens")
    assert first["status"] == "failed" and first["error_type"] == "torch.OutOfMemoryError"
    assert "retried once as attempt 2" in first["error_message"]
    assert second["status"] == "succeeded" and second["worker_pid"] != first["worker_pid"]


def test_a_transient_failure_that_repeats_fails_the_job_after_one_retry(stack):
    job = stack.submit(rf.song("oom-always"))
    view = stack.wait_for_job(job["id"], timeout_s=60)
    assert view["status"] == "failed" and view["error_type"] == "torch.OutOfMemoryError"
    assert [r["status"] for r in rf.stage_rows(stack, job["id"], "generate_tokens")] == ["failed", "failed"]


def test_a_cancelled_job_frees_the_gpu_within_seconds(stack):
    job = stack.submit(rf.song("slow-200", max_audio_length_ms=8000))  # ~20 s of generation
    rf.wait_for_stage(stack, job["id"], "generate_tokens",
                      lambda r: r["status"] == "running" and (r["progress"] or {}).get("done", 0) >= 25)
    asked = time.monotonic()
    assert cancel(job["id"], reason="test: user cancelled", settings=stack.settings)
    row = rf.wait_for_stage(stack, job["id"], "generate_tokens", lambda r: r["status"] == "cancelled", timeout_s=10)
    assert time.monotonic() - asked < 5
    assert rf.job_status(stack, job["id"]) == "cancelled" and row["progress"]["done"] < row["progress"]["total"]
    after = stack.submit(rf.song())
    assert stack.wait_for_job(after["id"], timeout_s=30)["status"] == "succeeded"


def test_a_failed_jobs_later_stages_are_skipped_not_left_queued(stack):
    job = stack.submit(rf.song("cuda-assert"))
    view = stack.wait_for_job(job["id"], timeout_s=60)
    assert view["status"] == "failed" and view["failed_stage"] == "generate_tokens"
    assert [(r["stage"], r["status"]) for r in rf.stage_rows(stack, job["id"])] == [
        ("refine_lyrics", "succeeded"), ("generate_tags", "succeeded"), ("generate_tokens", "failed"),
        ("decode_audio", "skipped"), ("encode_audio", "skipped")]


def test_cancel_ends_a_job_queued_behind_a_stopped_gpu_worker_and_its_stale_message_backs_off(stack):
    for name in rf.gpu_worker_names(stack):
        rf.sigkill(stack, name)  # nothing consumes the GPU queue now
    job = stack.submit(rf.song())
    rf.wait_for_stage(stack, job["id"], "generate_tokens", lambda r: r["status"] == "queued"
                      and rf.stage_rows(stack, job["id"], "generate_tags")[-1]["status"] == "succeeded")
    assert cancel(job["id"], reason="test: GPU down", settings=stack.settings)
    assert rf.job_status(stack, job["id"]) == "cancelled"  # at once, no worker and no reconcile pass needed
    assert [r["status"] for r in rf.stage_rows(stack, job["id"])] == ["succeeded", "succeeded", "cancelled",
                                                                      "skipped", "skipped"]
    # the message is still in the queue: the new worker must not run it. (Not waiting for its ping: the
    # harness's pooled broker connection may predate the Redis restart above; its backing off is the proof.)
    rf.start_worker(stack, "gpu", wait=False)
    tokens = rf.wait_for_stage(stack, job["id"], "generate_tokens",
                               lambda r: (r["environment"] or {}).get("duplicate_deliveries"), timeout_s=120)
    assert tokens["status"] == "cancelled" and tokens["deliveries"] == 0
    assert tokens["environment"]["duplicate_deliveries"][-1]["row_status"] == "cancelled"
    after = stack.submit(rf.song())
    assert stack.wait_for_job(after["id"], timeout_s=60)["status"] == "succeeded"


def test_a_burst_beyond_the_queue_cap_gets_503_with_retry_after_and_every_accepted_job_finishes(stack):
    jobs_before = count_rows(stack.database_url)["jobs"]
    answers = rf.burst(stack.base_url, [rf.song() for _ in range(40)], threads=8)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {201, 503}, statuses
    accepted = [body["id"] for status, _, body in answers if status == 201]
    refused = [(headers, body) for status, headers, body in answers if status == 503]
    assert len(accepted) >= QUEUE_CAP and refused
    assert all(int(h["Retry-After"]) > 0 and b["errors"][0]["message"] for h, b in refused)
    assert count_rows(stack.database_url)["jobs"] - jobs_before == len(accepted)  # refused: nothing stored

    finished = rf.terminal_jobs(stack, accepted, timeout_s=180)
    assert set(finished.values()) == {"succeeded"}, finished


def test_no_row_of_a_finished_job_is_queued_after_everything_above(stack):
    """The invariant over the whole module's record: kills, an empty broker, retries, cancels, a burst."""
    import sqlalchemy as sa

    from db.engine import get_engine

    with get_engine(stack.database_url).connect() as connection:
        stuck = connection.execute(sa.text(
            "SELECT jobs.id, jobs.status, stage_runs.stage, stage_runs.attempt FROM jobs JOIN stage_runs "
            "ON stage_runs.job_id = jobs.id WHERE jobs.status IN ('succeeded', 'failed', 'cancelled') "
            "AND stage_runs.status = 'queued'")).all()
        finished = connection.execute(sa.text(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')")).scalar()
    assert finished > 20 and stuck == []
