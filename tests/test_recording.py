"""The stage-recording wrapper, exercised directly (no broker): what it writes, when, and how often."""
from __future__ import annotations

import datetime as dt

import pytest
from celery.exceptions import Ignore
from pydantic import ValidationError
from sqlalchemy import select

from db.engine import session_scope
from db.models import Artifact, Job, StageRun
from db.schema import upgrade
from orchestrator.submission import new_job_rows
from tasks.contracts import JobRequest, RefineLyricsOutput
from tasks.recording import StageRunner
from tasks.settings import Settings
from tasks.stage_inputs import RESOLVERS
from tests.model_fixtures import echo_lyrics, run_stage


@pytest.fixture()
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path)
    upgrade(s.resolved_database_url)
    return s


def _job(settings: Settings, **request) -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, JobRequest(lyrics="la la la", tags="ska", seed=7, **request), settings,
                           source="test")
        return job.id


def _row(settings: Settings, job_id: str, stage: str, attempt: int = 1) -> StageRun:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                                     StageRun.attempt == attempt))


def test_success_records_inputs_outputs_environment_and_timings(settings):
    job_id = _job(settings)
    run_stage(settings, job_id, echo_lyrics, celery_task_id="t-1")
    row = _row(settings, job_id, "refine_lyrics")
    assert row.status == "succeeded"
    assert row.inputs == {"lyrics": "la la la", "backend": "rules", "allow_fallback": False, "max_frames": 3000}
    assert row.outputs["lyrics"] == "LA LA LA"
    assert row.celery_task_id == "t-1" and row.worker_pid and row.worker_hostname
    assert row.environment["python"] and row.environment["code_version"] and row.environment["queue"] == "cpu"
    assert row.duration_s >= 0 and row.recording_s >= 0 and row.started_at <= row.finished_at


def test_failure_records_type_message_traceback_and_fails_the_job(settings):
    job_id = _job(settings)

    def explode(inp, ctx):
        raise ValueError("lyrics exploded")

    with pytest.raises(ValueError):
        run_stage(settings, job_id, explode)
    row = _row(settings, job_id, "refine_lyrics")
    assert (row.status, row.error_type, row.error_message) == ("failed", "ValueError", "lyrics exploded")
    assert "Traceback" in row.traceback and "explode" in row.traceback
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.failed_stage, job.error_type) == ("failed", "refine_lyrics", "ValueError")


def test_output_that_breaks_the_contract_is_a_recorded_failure(settings):
    job_id = _job(settings)

    def empty(inp, ctx):
        return RefineLyricsOutput.model_construct(lyrics="   ", backend_used="rules")

    with pytest.raises(ValidationError):
        run_stage(settings, job_id, empty)
    row = _row(settings, job_id, "refine_lyrics")
    assert row.status == "failed" and "lyrics" in row.error_message


def test_missing_upstream_output_fails_at_the_boundary_naming_the_stage(settings):
    job_id = _job(settings)
    with pytest.raises(LookupError, match="refine_lyrics"):
        run_stage(settings, job_id, echo_lyrics, stage="generate_tags")
    assert _row(settings, job_id, "generate_tags").status == "failed"


def test_redelivery_of_a_succeeded_attempt_computes_nothing(settings):
    job_id = _job(settings)
    calls = []

    def counting(inp, ctx):
        calls.append(1)
        return echo_lyrics(inp, ctx)

    runner = StageRunner("refine_lyrics", RESOLVERS["refine_lyrics"], counting)
    runner.run(job_id, 1, settings=settings)
    assert runner.run(job_id, 1, settings=settings) is None
    assert len(calls) == 1 and _row(settings, job_id, "refine_lyrics").deliveries == 1


def test_second_delivery_while_running_with_fresh_heartbeat_backs_off(settings):
    job_id = _job(settings)
    with session_scope(settings.resolved_database_url) as session:
        row = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "refine_lyrics"))
        row.status, row.heartbeat_at = "running", dt.datetime.now(dt.UTC)
    with pytest.raises(Ignore):
        run_stage(settings, job_id, echo_lyrics)
    assert _row(settings, job_id, "refine_lyrics").status == "running"


def test_cancelled_job_records_cancelled_stage_without_computing(settings):
    job_id = _job(settings)
    with session_scope(settings.resolved_database_url) as session:
        session.get(Job, job_id).cancel_requested = True
    with pytest.raises(Ignore):
        run_stage(settings, job_id, echo_lyrics)
    assert _row(settings, job_id, "refine_lyrics").status == "cancelled"
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Job, job_id).status == "cancelled"


def test_artifacts_are_registered_with_size_and_sha256(settings):
    job_id = _job(settings)

    def with_artifact(inp, ctx):
        ref = ctx.put_artifact(b"RIFF....", "wav")
        assert ctx.store.get(ref.sha256) == b"RIFF...."
        return echo_lyrics(inp, ctx)

    run_stage(settings, job_id, with_artifact)
    with session_scope(settings.resolved_database_url) as session:
        artifact = session.scalars(select(Artifact)).one()
        assert (artifact.kind, artifact.bytes, len(artifact.sha256)) == ("wav", 8, 64)


def test_the_code_version_names_this_checkout_s_commit_and_never_an_enclosing_one(tmp_path, monkeypatch):
    import subprocess

    from tasks import environment

    real = environment.code_version()
    assert "+g" in real  # the tests run from a git checkout
    outer = tmp_path / "outer"
    (outer / "copy").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "outer"], check=True)
    monkeypatch.setattr(environment, "REPO_ROOT", (outer / "copy").resolve())
    environment.code_version.cache_clear()
    try:
        assert "+g" not in environment.code_version()  # a copy inside another repo: no commit is claimed
    finally:
        environment.code_version.cache_clear()
