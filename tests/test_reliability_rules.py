"""The reliability rules on their own (SQLite, no broker, no workers): reconciler, fencing, heartbeat,
admission control, time limits and the fault switch. The real-stack proofs are in
test_reliability_stack.py and test_reliability_visibility.py."""
from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from celery.exceptions import Ignore
from sqlalchemy import select, update

from db.engine import session_scope
from db.models import Job, StageRun
from db.schema import upgrade
from orchestrator.submission import new_job_rows
from tasks import reconciler
from tasks.contracts import STAGES, JobRequest
from tasks.recording import StageRunner, lease_s
from tasks.settings import Settings
from tasks.stage_inputs import RESOLVERS
from tasks.time_limits import MAX_HARD_TIME_LIMIT_S, VISIBILITY_TIMEOUT_S, stage_limits, visibility_timeout_s
from tests.model_fixtures import echo_lyrics, raising, run_stage

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture()
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path, heartbeat_s=0.25, redis_url="redis://127.0.0.1:1/0")
    upgrade(s.resolved_database_url)
    return s


def _job(settings: Settings, **request) -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, JobRequest(lyrics="la la la", tags="ska", seed=7, max_audio_length_ms=2000,
                                               **request), settings, source="test")
        for row in job.stage_runs:
            row.queued_at = NOW - dt.timedelta(minutes=10)
        return job.id


def _set(settings: Settings, job_id: str, stage: str, attempt: int = 1, **values) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                               StageRun.attempt == attempt).values(**values))


def _done(settings: Settings, job_id: str, *stages: str) -> None:
    for stage in stages:
        _set(settings, job_id, stage, status="succeeded", outputs={"ok": True},
             finished_at=NOW - dt.timedelta(minutes=5))
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, job_id).status = "running"


def _rows(settings: Settings, job_id: str, stage: str) -> list[StageRun]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage)
                                    .order_by(StageRun.attempt)))


def _job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Job, job_id)


class Sent(list):
    def __call__(self, job_id, attempts, length):
        self.append((job_id, attempts, length))


def _pass(settings, present=frozenset(), now=NOW):
    sent = Sent()
    decisions = reconciler.reconcile_once(settings, broker_view=lambda: set(present), sender=sent, now=now,
                                          confirm_delay_s=0)
    return decisions, sent


def _running(settings, job_id, stage, heartbeat_age_s, started_age_s=30.0, **extra):
    _set(settings, job_id, stage, status="running", worker_hostname="gone", worker_pid=4242,
         started_at=NOW - dt.timedelta(seconds=started_age_s),
         heartbeat_at=NOW - dt.timedelta(seconds=heartbeat_age_s), **extra)


# -- the reconciler ----------------------------------------------------------------------------

def test_a_running_stage_without_heartbeat_is_resent_as_a_new_attempt_from_that_stage(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics", "generate_tags")
    _running(settings, job_id, "generate_tokens", heartbeat_age_s=lease_s(settings) + 1,
             progress={"done": 25, "total": 100, "unit": "frames"})
    decisions, sent = _pass(settings)
    assert [d.action for d in decisions] == ["resent"]
    assert sent == [(job_id, {"generate_tokens": 2, "decode_audio": 2, "encode_audio": 2}, 2000)]
    lost, new = _rows(settings, job_id, "generate_tokens")
    assert (lost.status, lost.error_type) == ("lost", "WorkerLost") and "25/100 frames" in lost.error_message
    assert (new.attempt, new.status, new.requested_by) == (2, "queued", "reconciler:WorkerLost")
    assert [r.attempt for r in _rows(settings, job_id, "generate_tags")] == [1]  # succeeded: never re-run


def test_a_running_stage_with_a_fresh_heartbeat_is_left_alone(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics", "generate_tags")
    _running(settings, job_id, "generate_tokens", heartbeat_age_s=0.5, started_age_s=3600)
    assert _pass(settings) == ([], [])


def test_a_queued_stage_whose_message_is_in_the_broker_is_left_alone(settings):
    job_id = _job(settings)
    assert _pass(settings, present={("songpipe.refine_lyrics", job_id, 1)}) == ([], [])


def test_a_queued_stage_whose_message_is_nowhere_is_resent(settings):
    job_id = _job(settings)
    decisions, sent = _pass(settings)
    assert [(d.stage, d.action) for d in decisions] == [("refine_lyrics", "resent")]
    assert sent[0][1] == {stage: 2 for stage in STAGES}
    assert _rows(settings, job_id, "refine_lyrics")[0].error_type == "MessageLost"


def test_a_freshly_queued_stage_gets_a_grace_period_before_it_counts_as_lost(settings):
    job_id = _job(settings)
    _set(settings, job_id, "refine_lyrics", queued_at=NOW - dt.timedelta(seconds=1))
    assert _pass(settings) == ([], [])


def test_a_stage_that_succeeded_but_whose_next_message_was_never_sent_continues(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics", "generate_tags", "generate_tokens")
    decisions, sent = _pass(settings)
    assert [(d.stage, d.action) for d in decisions] == [("decode_audio", "resent")]
    assert sent[0][1] == {"decode_audio": 2, "encode_audio": 2}


def test_the_grace_period_of_a_next_stage_counts_from_when_its_predecessor_finished(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics")
    _set(settings, job_id, "refine_lyrics", finished_at=NOW - dt.timedelta(seconds=1))
    assert _pass(settings) == ([], [])


def test_a_stage_lost_three_times_fails_the_job_instead_of_looping(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics", "generate_tags")
    for _ in range(reconciler.MAX_WORKER_LOSSES - 1):
        stuck = _rows(settings, job_id, "generate_tokens")[-1]
        _running(settings, job_id, "generate_tokens", lease_s(settings) + 1, attempt=stuck.attempt)
        assert _pass(settings)[0][0].action == "resent"
    _running(settings, job_id, "generate_tokens", lease_s(settings) + 1, attempt=reconciler.MAX_WORKER_LOSSES)
    decisions, sent = _pass(settings)
    assert [d.action for d in decisions] == ["failed"] and not sent
    job = _job_row(settings, job_id)
    assert (job.status, job.failed_stage, job.error_type) == ("failed", "generate_tokens", "WorkerLost")


def test_a_stage_that_ran_for_its_whole_hard_time_limit_fails_without_retry(settings):
    job_id = _job(settings)
    _done(settings, job_id, "refine_lyrics", "generate_tags")
    hard = stage_limits("generate_tokens", 2000, settings).hard_s
    _running(settings, job_id, "generate_tokens", heartbeat_age_s=lease_s(settings) + 1,
             started_age_s=hard + lease_s(settings) + 1)
    decisions, sent = _pass(settings)
    assert [d.action for d in decisions] == ["failed"] and not sent
    assert _job_row(settings, job_id).error_type == "TimeLimitExceeded"


def test_a_lost_stage_of_a_job_being_cancelled_ends_the_job_cancelled(settings):
    job_id = _job(settings)
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, job_id).cancel_requested = True
    decisions, sent = _pass(settings)
    assert [d.action for d in decisions] == ["cancelled"] and not sent
    assert _job_row(settings, job_id).status == "cancelled"


def test_an_unreachable_broker_resends_nothing(settings):
    _job(settings)

    def down():
        raise ConnectionError("redis is down")

    assert reconciler.reconcile_once(settings, broker_view=down, sender=Sent(), now=NOW, confirm_delay_s=0) == []


def test_finished_jobs_are_not_touched(settings):
    job_id = _job(settings)
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, job_id).status = "failed"  # its downstream rows stay queued, as after any failure
    assert _pass(settings) == ([], [])


def test_a_late_message_for_a_superseded_attempt_backs_off(settings):
    job_id = _job(settings)
    _pass(settings)  # attempt 1 of refine_lyrics is lost, attempt 2 queued
    with pytest.raises(Ignore):
        run_stage(settings, job_id, echo_lyrics)
    assert run_stage(settings, job_id, echo_lyrics, attempt=2)


def test_the_broker_view_reads_kombu_messages():
    import base64
    import json

    body = base64.b64encode(json.dumps([["abc", 3], {}, {}]).encode()).decode()
    payload = {"body": body, "headers": {"task": "songpipe.decode_audio"}, "properties": {"body_encoding": "base64"}}
    assert reconciler._message_key(payload) == ("songpipe.decode_audio", "abc", 3)
    assert reconciler._message_key({"body": "garbage"}) is None


# -- the stage wrapper -------------------------------------------------------------------------

def test_a_long_stage_heartbeats_even_without_progress_reports(settings):
    job_id = _job(settings)
    beats = []

    def silent(inp, ctx):
        first = _rows(settings, job_id, "refine_lyrics")[0].heartbeat_at
        time.sleep(4 * settings.heartbeat_s)
        beats.append((first, _rows(settings, job_id, "refine_lyrics")[0].heartbeat_at))
        return echo_lyrics(inp, ctx)

    run_stage(settings, job_id, silent)
    first, later = beats[0]
    assert later > first


def test_a_holder_that_lost_its_lease_discards_its_result(settings):
    job_id = _job(settings)
    superseded = threading.Event()

    def slow(inp, ctx):
        _set(settings, job_id, "refine_lyrics", status="lost")  # the reconciler took it over meanwhile
        superseded.set()
        time.sleep(2 * settings.heartbeat_s)
        return echo_lyrics(inp, ctx)

    with pytest.raises(Ignore):
        run_stage(settings, job_id, slow)
    row = _rows(settings, job_id, "refine_lyrics")[0]
    assert superseded.is_set() and row.status == "lost" and row.outputs is None
    assert _job_row(settings, job_id).status != "succeeded"


def test_a_skipped_duplicate_delivery_is_noted_on_the_row(settings):
    job_id = _job(settings)
    _set(settings, job_id, "refine_lyrics", status="running", heartbeat_at=dt.datetime.now(dt.UTC))
    with pytest.raises(Ignore):
        run_stage(settings, job_id, echo_lyrics, celery_task_id="dup")
    noted = _rows(settings, job_id, "refine_lyrics")[0].environment["duplicate_deliveries"]
    assert [(n["celery_task_id"], n["row_status"]) for n in noted] == [("dup", "running")]


def test_a_deterministic_failure_is_not_retried(settings):
    job_id = _job(settings)
    with pytest.raises(ValueError):
        run_stage(settings, job_id, raising(ValueError("bad input")))
    assert [r.status for r in _rows(settings, job_id, "refine_lyrics")] == ["failed"]
    assert _job_row(settings, job_id).status == "failed"


def test_a_transient_failure_gets_exactly_one_new_attempt(settings, monkeypatch):
    sent = []
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda *args: sent.append(args))
    job_id = _job(settings)

    class OutOfMemoryError(RuntimeError):
        pass

    def oom(inp, ctx):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner = StageRunner("refine_lyrics", RESOLVERS["refine_lyrics"], oom)
    with pytest.raises(OutOfMemoryError):
        runner.run(job_id, 1, settings=settings)
    assert _job_row(settings, job_id).status == "running" and sent[0][1] == {stage: 2 for stage in STAGES}
    with pytest.raises(OutOfMemoryError):
        runner.run(job_id, 2, settings=settings)
    assert [r.status for r in _rows(settings, job_id, "refine_lyrics")] == ["failed", "failed"]
    assert _job_row(settings, job_id).status == "failed" and len(sent) == 1


def test_cancel_is_honoured_at_a_progress_report(settings):
    job_id = _job(settings)

    def reporting(inp, ctx):
        with session_scope(settings.resolved_database_url) as session:
            session.get(Job, job_id).cancel_requested = True
        ctx._last_cancel_check = 0.0
        ctx.progress(1, 10, "windows")
        raise AssertionError("progress should have raised JobCancelled")

    with pytest.raises(Ignore):
        run_stage(settings, job_id, reporting)
    assert _rows(settings, job_id, "refine_lyrics")[0].status == "cancelled"


# -- admission, limits, fault switch -----------------------------------------------------------

def test_submissions_beyond_the_per_client_rate_get_429_with_retry_after(app_settings, monkeypatch):
    from orchestrator.app import create_app

    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda *args: None)
    app = create_app(app_settings.model_copy(update={"submissions_per_minute": 3}))
    client = app.test_client()
    body = {"lyrics": "la la la", "tags": "ska", "max_audio_length_ms": 1000}
    from tests.stack_fixtures import count_rows

    before = count_rows(app_settings.resolved_database_url)["jobs"]
    answers = [client.post("/api/jobs", json=body) for _ in range(5)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429, 429]
    assert 0 < int(answers[-1].headers["Retry-After"]) <= 60
    assert answers[-1].get_json()["errors"][0]["field"] == "client"
    assert count_rows(app_settings.resolved_database_url)["jobs"] == before + 3


def test_the_queue_cap_refuses_with_503_and_stores_nothing(app_settings, monkeypatch):
    from orchestrator.app import create_app
    from tests.stack_fixtures import count_rows

    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda *args: None)
    queued = count_rows(app_settings.resolved_database_url)["jobs"]  # the module's database is shared
    app = create_app(app_settings.model_copy(update={"max_queued_jobs": queued + 2}))
    client = app.test_client()
    body = {"lyrics": "la la la", "tags": "ska", "max_audio_length_ms": 1000}
    answers = [client.post("/api/jobs", json=body) for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 503] and int(answers[-1].headers["Retry-After"]) > 0
    assert count_rows(app_settings.resolved_database_url)["jobs"] == queued + 2


def test_time_limits_grow_with_the_song_and_stay_under_the_visibility_timeout(settings):
    short, long = (stage_limits("generate_tokens", ms, settings) for ms in (10_000, 240_000))
    assert short.soft_s < short.hard_s and short.hard_s < long.hard_s
    for stage in STAGES:
        limits = stage_limits(stage, None, settings)
        assert limits.soft_s < limits.hard_s <= MAX_HARD_TIME_LIMIT_S
    assert VISIBILITY_TIMEOUT_S > 2 * MAX_HARD_TIME_LIMIT_S == 2 * 4 * 3600
    assert visibility_timeout_s(settings) == VISIBILITY_TIMEOUT_S


def test_the_fault_switch_is_off_by_default_and_refused_in_production():
    from gpu_worker.worker.fault_injection import FaultInjectionRefused, check_allowed, faults_in, switch_on

    assert not switch_on(Settings())
    assert switch_on(Settings(fault_injection=True))
    assert not switch_on(Settings(fault_injection=True, mode="production"))
    with pytest.raises(FaultInjectionRefused):
        check_allowed(Settings(fault_injection=True, mode="production"))
    assert [(f.kind, f.stage) for f in faults_in(["ska", "songpipe-fault-cuda-assert-decode"])] == [
        ("cuda-assert", "decode_audio")]
