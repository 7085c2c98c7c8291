"""The state machine's invariants (docs/state-machine.md), against SQLite and PostgreSQL.

Stages run in this process through the same StageRunner the Celery tasks use; the broker is replaced
by a recorder (no worker consumes anything), so a queued row stays queued until something ends it.
"""
from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select

from db.engine import dispose_engines, get_engine, session_scope
from db.models import JOB_TERMINAL, STAGE_STATUSES, Job, StageRun, utcnow
from db.schema import alembic_config, upgrade
from orchestrator import replay
from orchestrator.submission import new_job_rows
from tasks import reconciler
from tasks.contracts import STAGES, JobRequest
from tasks.recording import TransientStageError, lease_s
from tasks.settings import Settings
from tests import stack_fixtures
from tests.model_fixtures import echo_lyrics, raising, run_stage


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, heartbeat_s=0.25,
                    redis_url="redis://127.0.0.1:1/0", default_tags_backend="given", default_lyrics_backend="rules")


class Sent(list):
    def __call__(self, job_id, attempts, length=None):
        self.append((job_id, dict(attempts)))


def submit(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest(lyrics="la la la", tags="ska", seed=7, max_audio_length_ms=800),
                            settings, source="test").id


def statuses(settings: Settings, job_id: str) -> list[tuple[str, int, str]]:
    with session_scope(settings.resolved_database_url) as session:
        return [(r.stage, r.attempt, r.status) for r in session.scalars(
            select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.id))]


def job_status(settings: Settings, job_id: str) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Job, job_id).status


def queued_rows_of_finished_jobs(settings: Settings) -> list[tuple]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.execute(select(Job.id, Job.status, StageRun.stage, StageRun.attempt).join(
            StageRun, StageRun.job_id == Job.id).where(Job.status.in_(JOB_TERMINAL), StageRun.status == "queued")))


def pass_after_lease(settings: Settings, sent: Sent | None = None) -> list[reconciler.Decision]:
    return reconciler.reconcile_once(settings, broker_view=set, sender=sent if sent is not None else Sent(),
                                     confirm_delay_s=0, now=utcnow() + dt.timedelta(seconds=lease_s(settings) + 1))


def test_no_row_of_a_finished_job_is_queued_after_failures_cancels_and_retries(settings, monkeypatch):
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", Sent())
    failed = submit(settings)
    with pytest.raises(ValueError):
        run_stage(settings, failed, raising(ValueError("bad lyrics")))
    assert job_status(settings, failed) == "failed"
    assert statuses(settings, failed) == [("refine_lyrics", 1, "failed")] + [(s, 1, "skipped") for s in STAGES[1:]]

    transient = submit(settings)  # a transient failure: attempt 2 of every stage, the old queued ones superseded
    with pytest.raises(TransientStageError):
        run_stage(settings, transient, raising(TransientStageError("out of memory")))
    assert job_status(settings, transient) == "running"
    assert statuses(settings, transient)[:len(STAGES)] == \
        [("refine_lyrics", 1, "failed")] + [(s, 1, "superseded") for s in STAGES[1:]]
    with pytest.raises(TransientStageError):  # the second one fails the job
        run_stage(settings, transient, raising(TransientStageError("out of memory")), attempt=2)
    assert job_status(settings, transient) == "failed"

    retried = replay.retry(failed, settings=settings, sender=Sent())  # the retry's own rows are queued
    assert retried.attempts == {s: 2 for s in STAGES}
    run_stage(settings, failed, echo_lyrics, attempt=2)
    replay.cancel(failed, settings=settings)  # now the generate_tags attempt 2 waits: cancel ends the job
    assert job_status(settings, failed) == "cancelled"
    assert statuses(settings, failed)[len(STAGES):] == [("refine_lyrics", 2, "succeeded"), ("generate_tags", 2, "cancelled")] \
        + [(s, 2, "skipped") for s in STAGES[2:]]

    lost = submit(settings)  # the reconciler re-sends a lost message: the lost attempt, a new one queued
    run_stage(settings, lost, echo_lyrics)
    decisions = [d for d in pass_after_lease(settings) if d.job_id == lost]
    assert [(d.stage, d.action) for d in decisions] == [("generate_tags", "resent")]
    later = dict(((s, a), st) for s, a, st in statuses(settings, lost))
    assert later[("generate_tags", 1)] == "lost" and later[("generate_tokens", 1)] == "superseded"
    assert queued_rows_of_finished_jobs(settings) == []


def test_cancel_ends_a_job_whose_stage_waits_in_a_queue_nobody_consumes(settings):
    job_id = submit(settings)
    run_stage(settings, job_id, echo_lyrics)
    with session_scope(settings.resolved_database_url) as session:  # refine and tags done; tokens waits for the GPU
        session.execute(sa.update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "generate_tags")
                        .values(status="succeeded", outputs={"tags_string": "ska"}))
        session.get(Job, job_id).status = "running"
    assert replay.cancel(job_id, reason="GPU is down", settings=settings) is True
    assert job_status(settings, job_id) == "cancelled"
    assert [st for _, _, st in statuses(settings, job_id)] == ["succeeded", "succeeded", "cancelled", "skipped",
                                                               "skipped"]
    assert [d for d in pass_after_lease(settings) if d.job_id == job_id] == []  # nothing left to re-send
    # the stale generate_tokens message backs off at the claim, computing nothing
    from celery.exceptions import Ignore
    with pytest.raises(Ignore):
        run_stage(settings, job_id, raising(AssertionError("must not run")), stage="generate_tokens")
    # retry is allowed: a cancelled job is finished, and retry starts at its first unfinished stage
    result = replay.retry(job_id, settings=settings, sender=Sent())
    assert result.from_stage == "generate_tokens" and job_status(settings, job_id) == "queued"


def test_a_cancel_requested_while_a_stage_ran_ends_the_job_in_one_reconcile_pass(settings):
    job_id = submit(settings)
    with session_scope(settings.resolved_database_url) as session:  # cancel raced a claim: the worker won
        session.execute(sa.update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "refine_lyrics")
                        .values(status="running", heartbeat_at=utcnow()))
    assert replay.cancel(job_id, settings=settings) is True
    assert job_status(settings, job_id) == "queued"  # cooperative: the running stage stops at its next check
    with session_scope(settings.resolved_database_url) as session:  # it ended (succeeded) just before the check
        session.execute(sa.update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "refine_lyrics")
                        .values(status="succeeded", outputs={"lyrics": "LA", "backend_used": "rules"}))
    decisions = reconciler.reconcile_once(settings, broker_view=set, sender=Sent(), confirm_delay_s=0)
    assert [(d.stage, d.action) for d in decisions if d.job_id == job_id] == [("generate_tags", "cancelled")]
    assert job_status(settings, job_id) == "cancelled"


def test_the_database_refuses_a_status_outside_the_vocabulary(settings):
    job_id = submit(settings)
    for table, column in (("jobs", "id"), ("stage_runs", "job_id")):
        with pytest.raises(sa.exc.IntegrityError):
            with get_engine(settings.resolved_database_url).begin() as connection:
                connection.execute(sa.text(f"UPDATE {table} SET status = 'pending' WHERE {column} = :id"),
                                   {"id": job_id})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0003_moves_never_running_queued_rows_to_skipped_or_superseded(kind, tmp_path):
    if kind == "postgresql" and not stack_fixtures.postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    with stack_fixtures.database(kind, tmp_path) as url:
        command.downgrade(alembic_config(url), "0002")
        failed, retried, active = (uuid.uuid4().hex for _ in range(3))
        rows = {  # (job, status): [(stage, attempt, status)]
            (failed, "failed"): [("refine_lyrics", 1, "failed"), ("generate_tags", 1, "queued")],
            (retried, "succeeded"): [("refine_lyrics", 1, "failed"), ("generate_tags", 1, "queued"),
                                     ("refine_lyrics", 2, "succeeded"), ("generate_tags", 2, "succeeded")],
            (active, "running"): [("refine_lyrics", 1, "pending"), ("refine_lyrics", 2, "queued")],
        }
        with get_engine(url).begin() as connection:
            for (job_id, status), runs in rows.items():
                connection.execute(sa.text(
                    "INSERT INTO jobs (id, created_at, updated_at, status, request, seed, seed_source, pipeline, "
                    "code_version, source, cancel_requested, search_text) VALUES (:id, :now, :now, :status, '{}', "
                    "1, 'user', 'p', 'c', 'test', false, '')"), {"id": job_id, "now": utcnow(), "status": status})
                for stage, attempt, run_status in runs:
                    connection.execute(sa.text(
                        "INSERT INTO stage_runs (job_id, stage, attempt, status, queue, queued_at, deliveries) "
                        "VALUES (:job, :stage, :attempt, :status, 'cpu', :now, 0)"),
                        {"job": job_id, "stage": stage, "attempt": attempt, "status": run_status, "now": utcnow()})
        upgrade(url)
        with get_engine(url).connect() as connection:
            found = {(r.job_id, r.stage, r.attempt): r.status for r in connection.execute(
                sa.text("SELECT job_id, stage, attempt, status FROM stage_runs"))}
        dispose_engines()
    assert found == {
        (failed, "refine_lyrics", 1): "failed", (failed, "generate_tags", 1): "skipped",
        (retried, "refine_lyrics", 1): "failed", (retried, "generate_tags", 1): "superseded",
        (retried, "refine_lyrics", 2): "succeeded", (retried, "generate_tags", 2): "succeeded",
        (active, "refine_lyrics", 1): "superseded", (active, "refine_lyrics", 2): "queued",
    }  # every row kept (the SQLite table rebuild must not cascade-delete stage_runs)
    assert set(found.values()) <= set(STAGE_STATUSES)


def test_a_song_that_finished_before_the_cancel_took_effect_is_succeeded(settings):
    """L8: cancel stops work not yet done; the last stage finishing meanwhile makes the job succeeded,
    with cancel_requested left on the record to show the request came too late."""
    from tasks.contracts import ArtifactRef, EncodeAudioInput, EncodeAudioOutput
    from tasks.recording import StageRunner

    job_id = submit(settings)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(sa.update(StageRun).where(StageRun.job_id == job_id, StageRun.stage != "encode_audio")
                        .values(status="succeeded", outputs={"ok": True}))
        session.get(Job, job_id).status = "running"
    wav = ArtifactRef(sha256="0" * 64, kind="wav", bytes=44, media_type="audio/wav")

    def encode(inp, ctx):
        assert replay.cancel(job_id, settings=settings) is True  # the stage is running: cooperative only
        assert job_status(settings, job_id) == "running"
        return EncodeAudioOutput(audio=wav, wav=wav, output_format="wav", duration_s=1.0)

    runner = StageRunner("encode_audio", lambda s, j, st: EncodeAudioInput(wav=wav, output_format="wav"), encode)
    runner.run(job_id, 1, settings=settings)
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.cancel_requested) == ("succeeded", True)
