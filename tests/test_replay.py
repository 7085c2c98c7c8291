"""Replay from stored inputs: retry adds attempts, re-run-as-new copies, both check artifacts first.

The stages run in this process through the same recording wrapper the Celery tasks use (the tiny
random checkpoint on CPU), against SQLite and PostgreSQL. Sending the Celery chain is replaced by a
recorder, so each test sees exactly which attempts a replay would send.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import Job, StageRun, utcnow
from orchestrator import replay
from orchestrator.submission import new_job_rows
from tasks.artifact_store import ArtifactIntegrityError, open_store
from tasks.contracts import STAGES, JobRequest
from tasks.reconciler import reconcile_once
from tasks.recording import lease_s
from tasks.settings import Settings

LYRICS = "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you"


@pytest.fixture(scope="module")
def settings(database_url: str, tiny_checkpoint_dir: Path, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("replay-data"), database_url=database_url,
                    checkpoint_dir=tiny_checkpoint_dir, device="cpu", default_tags_backend="given",
                    default_lyrics_backend="rules")


def runners() -> dict:
    from gpu_worker.worker import stages as gpu_stages
    from tasks import cpu_stages

    return {"refine_lyrics": cpu_stages.refine_lyrics_task.runner, "generate_tags": cpu_stages.generate_tags_task.runner,
            "generate_tokens": gpu_stages.generate_tokens_task.runner,
            "decode_audio": gpu_stages.decode_audio_task.runner, "encode_audio": cpu_stages.encode_audio_task.runner}


def submit(settings: Settings, **request) -> str:
    body = {"lyrics": LYRICS, "tags": "ska", "seed": 7, "max_audio_length_ms": 800, "output_format": "wav", **request}
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest.model_validate(body), settings, source="cli").id


def run_stages(settings: Settings, job_id: str, attempts: dict[str, int]) -> None:
    """Run the given stage attempts in pipeline order, stopping at the first failure (as a chain does)."""
    for stage in STAGES:
        if stage in attempts:
            try:
                runners()[stage].run(job_id, attempts[stage], settings=settings)
            except Exception:
                return


def rows(settings: Settings, job_id: str) -> list[dict]:
    with session_scope(settings.resolved_database_url) as session:
        found = session.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.id))
        return [{c.key: getattr(r, c.key) for c in StageRun.__table__.columns} for r in found]


def row(settings: Settings, job_id: str, stage: str, attempt: int) -> dict:
    return next(r for r in rows(settings, job_id) if r["stage"] == stage and r["attempt"] == attempt)


def job(settings: Settings, job_id: str) -> dict:
    with session_scope(settings.resolved_database_url) as session:
        found = session.get(Job, job_id)
        return {c.key: getattr(found, c.key) for c in Job.__table__.columns}


def table_sizes(settings: Settings) -> tuple[int, int]:
    with session_scope(settings.resolved_database_url) as session:
        return (session.scalar(select(func.count()).select_from(Job)),
                session.scalar(select(func.count()).select_from(StageRun)))


class Sent(list):
    def __call__(self, job_id: str, attempts: dict[str, int], max_audio_length_ms: int | None = None) -> None:
        self.append((job_id, dict(attempts)))


@pytest.fixture(scope="module")
def succeeded(settings: Settings) -> str:
    job_id = submit(settings)
    run_stages(settings, job_id, {stage: 1 for stage in STAGES})
    assert job(settings, job_id)["status"] == "succeeded", rows(settings, job_id)
    return job_id


@pytest.fixture(scope="module")
def failed_in_tags(settings: Settings) -> str:
    # the LLM tags backend with no LLM configured and no fallback fails for real in generate_tags
    job_id = submit(settings, tags_backend="llm")
    run_stages(settings, job_id, {stage: 1 for stage in STAGES})
    assert job(settings, job_id)["status"] == "failed"
    assert job(settings, job_id)["failed_stage"] == "generate_tags"
    return job_id


# -- reproducibility --------------------------------------------------------------------------

def test_retrying_the_token_stage_with_the_same_seed_gives_bit_identical_tokens(settings, succeeded):
    sent = Sent()
    result = replay.retry(succeeded, "generate_tokens", settings=settings, sender=sent)
    assert result.attempts == {"generate_tokens": 2, "decode_audio": 2, "encode_audio": 2}
    run_stages(settings, succeeded, result.attempts)
    assert job(settings, succeeded)["status"] == "succeeded"
    first, second = row(settings, succeeded, "generate_tokens", 1), row(settings, succeeded, "generate_tokens", 2)
    assert second["status"] == "succeeded"
    assert second["inputs"] == first["inputs"]
    assert second["outputs"]["tokens"]["sha256"] == first["outputs"]["tokens"]["sha256"]


def test_a_new_job_replaying_the_token_stage_reproduces_the_tokens(settings, succeeded):
    result = replay.rerun_as_new(succeeded, "generate_tokens", settings=settings, sender=Sent())
    runners()["generate_tokens"].run(result.job_id, 1, settings=settings)
    original = row(settings, succeeded, "generate_tokens", 1)["outputs"]["tokens"]["sha256"]
    assert row(settings, result.job_id, "generate_tokens", 1)["outputs"]["tokens"]["sha256"] == original


# -- retry --------------------------------------------------------------------------------------

def test_retry_adds_attempt_2_rows_and_leaves_attempt_1_rows_untouched(settings, failed_in_tags):
    before = rows(settings, failed_in_tags)
    sent = Sent()
    result = replay.retry(failed_in_tags, settings=settings, requested_by="alice", sender=sent)
    assert result.from_stage == "generate_tags"
    assert result.attempts == {s: 2 for s in STAGES[1:]}
    assert sent == [(failed_in_tags, result.attempts)]
    after = rows(settings, failed_in_tags)
    assert after[: len(before)] == before  # every attempt-1 row exactly as it was
    new = after[len(before):]  # nothing before generate_tags runs again: its output is reused
    assert [(r["stage"], r["attempt"], r["status"], r["requested_by"]) for r in new] == \
        [(s, 2, "queued", "retry:alice") for s in STAGES[1:]]
    record = job(settings, failed_in_tags)
    assert (record["status"], record["failed_stage"], record["error_type"], record["error_message"]) == \
        ("queued", None, None, None)


def test_retry_of_a_queued_or_running_job_is_refused_and_writes_nothing(settings):
    job_id = submit(settings)
    sizes = table_sizes(settings)
    with pytest.raises(replay.ReplayConflict, match="is queued"):
        replay.retry(job_id, settings=settings, sender=Sent())
    assert table_sizes(settings) == sizes


def test_retry_from_a_stage_without_reusable_upstream_output_is_refused(settings, failed_in_tags):
    with pytest.raises(replay.ReplayError, match="generate_tags has no successful attempt"):
        replay.rerun_as_new(failed_in_tags, "generate_tokens", settings=settings, sender=Sent())


# -- artifact integrity ---------------------------------------------------------------------------

@pytest.fixture
def corrupted_tokens(settings, succeeded):
    """The succeeded job's token artifact, overwritten with other bytes for one test, then restored."""
    sha = row(settings, succeeded, "generate_tokens", 1)["outputs"]["tokens"]["sha256"]
    path = open_store(settings.resolved_artifact_dir).local_path(sha)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    yield sha
    path.write_bytes(good)


def test_retry_refuses_a_reused_artifact_whose_bytes_no_longer_match_and_writes_nothing(
        settings, succeeded, corrupted_tokens):
    sizes, before, status = table_sizes(settings), rows(settings, succeeded), job(settings, succeeded)["status"]
    sent = Sent()
    with pytest.raises(ArtifactIntegrityError) as error:
        replay.retry(succeeded, "decode_audio", settings=settings, sender=sent)
    message = str(error.value)
    assert corrupted_tokens in message and "corrupted" in message and "generate_tokens" in message
    assert (table_sizes(settings), rows(settings, succeeded), job(settings, succeeded)["status"]) == \
        (sizes, before, status)
    assert sent == []


def test_rerun_as_new_refuses_a_missing_artifact_and_writes_nothing(settings, succeeded):
    sha = row(settings, succeeded, "decode_audio", 1)["outputs"]["wav"]["sha256"]
    path = open_store(settings.resolved_artifact_dir).local_path(sha)
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    try:
        sizes = table_sizes(settings)
        with pytest.raises(ArtifactIntegrityError, match=f"{sha} is missing"):
            replay.rerun_as_new(succeeded, "encode_audio", settings=settings, sender=Sent())
        assert table_sizes(settings) == sizes
    finally:
        moved.rename(path)


# -- re-run as new job ----------------------------------------------------------------------------

def test_rerun_as_new_copies_earlier_stages_as_reused_rows_linked_to_their_source(settings, succeeded):
    sent = Sent()
    result = replay.rerun_as_new(succeeded, "generate_tokens", {"seed": 99}, settings=settings,
                                 requested_by="alice", sender=sent)
    new = job(settings, result.job_id)
    assert (new["replay_of"], new["replay_from_stage"], new["replay_overrides"], new["seed"], new["source"]) == \
        (succeeded, "generate_tokens", {"seed": 99}, 99, "replay")
    copied = {r["stage"]: r for r in rows(settings, result.job_id)}
    for stage in ("refine_lyrics", "generate_tags"):
        source = row(settings, succeeded, stage, 1)
        assert copied[stage]["status"] == "reused" and copied[stage]["reused_from"] == source["id"]
        assert (copied[stage]["inputs"], copied[stage]["outputs"]) == (source["inputs"], source["outputs"])
    assert [copied[s]["status"] for s in STAGES[2:]] == ["queued"] * 3
    assert sent == [(result.job_id, {s: 1 for s in STAGES[2:]})]


def test_an_unknown_override_is_an_error_naming_it(settings, succeeded):
    sizes = table_sizes(settings)
    with pytest.raises(replay.OverrideError, match="'colour'") as error:
        replay.rerun_as_new(succeeded, overrides={"colour": "blue"}, settings=settings, sender=Sent())
    assert error.value.errors == {"colour": "unknown override"}
    assert table_sizes(settings) == sizes


def test_an_override_its_stage_would_ignore_is_an_error_naming_field_and_stage(settings, succeeded):
    with pytest.raises(replay.OverrideError) as error:
        replay.rerun_as_new(succeeded, "generate_tokens", {"lyrics": "other words", "seed": 3}, settings=settings,
                            sender=Sent())
    assert "'lyrics'" in str(error.value) and "refine_lyrics" in str(error.value)
    assert set(error.value.errors) == {"lyrics"}


def test_override_values_are_validated_by_the_request_model(settings, succeeded):
    cases = {"temperature": 0, "seed": -1, "tags": "ska,,", "output_format": "ogg", "top_k": "many"}
    for field, value in cases.items():
        with pytest.raises(replay.OverrideError) as error:
            replay.rerun_as_new(succeeded, overrides={field: value}, settings=settings, sender=Sent())
        assert field in error.value.errors, (field, error.value.errors)


def test_a_refused_send_leaves_the_replay_stored_and_queued_for_the_reconciler(settings, succeeded):
    def broken(job_id, attempts, *_):
        raise ConnectionError("broker down")

    result = replay.rerun_as_new(succeeded, "encode_audio", settings=settings, sender=broken)
    assert result.dispatched is False and result.as_dict()["dispatched"] is False
    with session_scope(settings.resolved_database_url) as session:
        newest = session.get(Job, result.job_id)
        assert (newest.status, newest.error_type) == ("queued", None)
        encode = next(r for r in newest.stage_runs if r.stage == "encode_audio")
        assert encode.status == "queued"
    sent = Sent()  # the reconciler's pass, once the broker answers, finds the message missing and sends it
    decisions = reconcile_once(settings, broker_view=set, sender=sent, confirm_delay_s=0,
                               now=utcnow() + dt.timedelta(seconds=lease_s(settings) + 1))
    mine = [(d.stage, d.action) for d in decisions if d.job_id == result.job_id]
    assert mine == [("encode_audio", "resent")]
    assert any(call[0] == result.job_id for call in sent)


# -- cancel and the CLI ---------------------------------------------------------------------------

def test_cancel_records_who_when_and_why(settings):
    job_id = submit(settings)
    assert replay.cancel(job_id, reason="wrong tags", requested_by="alice", settings=settings) is True
    record = job(settings, job_id)
    assert (record["cancel_requested"], record["cancel_reason"], record["cancel_requested_by"]) == \
        (True, "wrong tags", "alice")
    assert record["cancel_requested_at"] is not None
    assert record["status"] == "cancelled"  # nothing was running: it ends at once (H4)
    assert [r["status"] for r in rows(settings, job_id)] == ["cancelled"] + ["skipped"] * (len(STAGES) - 1)
    assert replay.cancel(job_id, settings=settings) is False


def test_cli_replay_new_with_overrides_prints_json(settings, succeeded, tmp_path, monkeypatch):
    from orchestrator.replay_cli import replay_command
    from tasks.settings import reset_settings_cache

    monkeypatch.setenv("SONGPIPE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("HEARTMULA_CKPT", str(settings.checkpoint_dir))
    reset_settings_cache()
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("new words\nfor the song")
    try:
        ok = CliRunner().invoke(replay_command, [succeeded, "--mode", "new", "--seed", "5", "--lyrics-file",
                                                 str(lyrics), "--no-send", "--json"])
        bad = CliRunner().invoke(replay_command, [succeeded, "--mode", "new", "--from-stage", "decode_audio",
                                                  "--tags", "jazz", "--no-send", "--json"])
    finally:
        reset_settings_cache()
    assert ok.exit_code == 0, ok.output
    created = json.loads(ok.output)
    assert created["mode"] == "new" and created["attempts"] == {s: 1 for s in STAGES}
    assert job(settings, created["job_id"])["request"]["lyrics"] == "new words\nfor the song"
    assert bad.exit_code == 2 and json.loads(bad.output)["fields"] == {"tags": "needs from_stage generate_tags or earlier"}
