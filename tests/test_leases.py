"""Leases: the heartbeat stops before the terminal write (M1), lease times come from the database's
clock (M9), and the PostgreSQL pool follows the worker's concurrency (M10). SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from db import engine as db_engine
from db.clock import as_utc, database_now, db_now
from db.engine import session_scope
from db.models import Job, StageRun
from orchestrator.submission import new_job_rows
from tasks import reconciler
from tasks.contracts import JobRequest
from tasks.recording import TransientStageError, lease_s
from tasks.settings import Settings
from tests.model_fixtures import echo_lyrics, raising, run_stage

SKEW = dt.timedelta(hours=3)  # a host clock this far off must not matter


def settings_for(database_url: str, tmp_path, heartbeat_s: float) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, heartbeat_s=heartbeat_s,
                    redis_url="redis://127.0.0.1:1/0", default_tags_backend="given", default_lyrics_backend="rules")


def submit(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest(lyrics="la la la", tags="ska", seed=7, max_audio_length_ms=800),
                            settings, source="test").id


def refine_row(settings: Settings, job_id: str, attempt: int = 1) -> StageRun:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "refine_lyrics",
                                                     StageRun.attempt == attempt))


class Sent(list):
    def __call__(self, job_id, attempts, length=None):
        self.append((job_id, dict(attempts)))


def test_a_very_fast_heartbeat_never_drops_the_transient_retry(database_url, tmp_path, monkeypatch):
    """The race of M1: a beat right after the failure's own terminal write marked the attempt superseded
    and skipped sending its retry (5 of 200 runs with a 0.5 ms heartbeat before the fix)."""
    settings = settings_for(database_url, tmp_path, heartbeat_s=0.0005)
    sent = Sent()
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", sent)
    jobs = [submit(settings) for _ in range(60)]
    for job_id in jobs:
        with pytest.raises(TransientStageError):
            run_stage(settings, job_id, raising(TransientStageError("CUDA out of memory")))
    assert [job_id for job_id, _ in sent] == jobs
    assert all(attempts["refine_lyrics"] == 2 for _, attempts in sent)
    assert {refine_row(settings, job_id).status for job_id in jobs} == {"failed"}


def test_stage_times_are_written_with_the_databases_clock_not_the_hosts(database_url, tmp_path, monkeypatch):
    settings = settings_for(database_url, tmp_path, heartbeat_s=0.05)
    job_id = submit(settings)
    skewed = lambda: dt.datetime.now(dt.UTC) + SKEW  # noqa: E731
    monkeypatch.setattr("tasks.recording.utcnow", skewed)
    monkeypatch.setattr("db.models.utcnow", skewed)
    run_stage(settings, job_id, echo_lyrics)
    row = refine_row(settings, job_id)
    with session_scope(settings.resolved_database_url) as session:
        now = database_now(session)
    for stamp in (row.queued_at, row.started_at, row.heartbeat_at, row.finished_at):
        assert abs(as_utc(stamp) - now) < SKEW / 2, (stamp, now)
    assert as_utc(row.started_at) <= as_utc(row.finished_at)


def test_the_reconciler_judges_leases_by_the_databases_clock(database_url, tmp_path, monkeypatch):
    settings = settings_for(database_url, tmp_path, heartbeat_s=0.25)
    fresh, stale = submit(settings), submit(settings)
    lease = dt.timedelta(seconds=lease_s(settings))
    with session_scope(settings.resolved_database_url) as session:
        now = database_now(session)
        for job_id, beat in ((fresh, db_now()), (stale, now - 3 * lease)):
            session.execute(sa.update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "refine_lyrics")
                            .values(status="running", started_at=now - 4 * lease, heartbeat_at=beat,
                                    worker_hostname="elsewhere", worker_pid=1))
            session.get(Job, job_id).status = "running"
    # the reconciler's host runs hours ahead: with its own clock every heartbeat would look stale
    monkeypatch.setattr("db.models.utcnow", lambda: dt.datetime.now(dt.UTC) + SKEW)
    decisions = reconciler.reconcile_once(settings, broker_view=set, sender=Sent(), confirm_delay_s=0)
    assert {(d.job_id, d.action) for d in decisions if d.job_id in (fresh, stale)} == {(stale, "resent")}
    assert refine_row(settings, fresh).status == "running"


def test_sqlite_database_clock_has_sub_second_resolution(tmp_path):
    from db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'clock.db'}"
    upgrade(url)
    with session_scope(url) as session:
        stamps = {session.scalar(select(db_now())) for _ in range(200)}
    assert any(s.microsecond for s in stamps)  # CURRENT_TIMESTAMP would give whole seconds only
    db_engine.dispose_engines()


def test_pool_size_follows_concurrency_and_the_environment(monkeypatch):
    monkeypatch.delenv(db_engine.POOL_SIZE_ENV, raising=False)
    monkeypatch.setattr(db_engine, "_configured_threads", None)
    assert db_engine.pool_size() == db_engine.pool_size_for(db_engine.DEFAULT_THREADS) == 18
    db_engine.configure_pool(2)
    assert db_engine.pool_size() == 6
    monkeypatch.setenv(db_engine.POOL_SIZE_ENV, "40")
    assert db_engine.pool_size() == 40
    monkeypatch.setenv(db_engine.POOL_SIZE_ENV, "lots")
    with pytest.raises(ValueError, match="SONGPIPE_DB_POOL_SIZE must be a positive whole number"):
        db_engine.pool_size()
    with pytest.raises(ValueError):
        db_engine.pool_size_for(0)


def test_postgresql_engine_is_built_with_that_pool(monkeypatch):
    monkeypatch.setenv(db_engine.POOL_SIZE_ENV, "23")
    engine = db_engine.create_postgresql_engine("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        assert engine.pool.size() == 23
    finally:
        engine.dispose()
