"""Which token checkpoint a new attempt continues from (gpu_worker/worker/token_checkpoints.py), against SQL.

Only an earlier attempt of the same job and stage that ended lost or failed, with exactly the same
recorded inputs, counts; the furthest wins; one made by another engine shape is refused with a reason.
"""
from __future__ import annotations

import pytest
import torch

from db.engine import session_scope
from db.models import StageRun
from gpu_worker.worker.stages import tokens_to_bytes
from gpu_worker.worker.token_checkpoints import CheckpointWriter, compat_key, find_resume_point
from orchestrator.submission import new_job_rows
from tasks.artifact_store import open_store
from tasks.contracts import GenerateTokensInput, JobRequest
from tasks.pipeline.attempts import latest_checkpoint
from tasks.recording import StageContext
from tasks.settings import Settings

INPUTS = {"lyrics": "la la", "tags": "ska", "seed": 7, "checkpoint": "/ckpt",
          "params": {"temperature": 1.0, "top_k": 50, "cfg_scale": 1.5, "max_audio_length_ms": 8000}}


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, redis_url="redis://127.0.0.1:1/0",
                    default_tags_backend="given", default_lyrics_backend="rules")


@pytest.fixture
def job_id(settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest(lyrics="la la", tags="ska", seed=7, max_audio_length_ms=8000),
                            settings, source="test").id


def add_attempt(settings, job_id: str, attempt: int, status: str, inputs: dict, done: int | None,
                sha: str = "0" * 64, compat: str = "c") -> None:
    progress = None if done is None else {"done": done, "total": 100, "unit": "frames", "checkpoint": {
        "done": done, "tokens": {"sha256": sha, "kind": "tokens"}, "compat": compat, "attempt": attempt}}
    with session_scope(settings.resolved_database_url) as session:
        existing = session.query(StageRun).filter_by(job_id=job_id, stage="generate_tokens", attempt=attempt).first()
        row = existing or StageRun(job_id=job_id, stage="generate_tokens", attempt=attempt, queue="gpu")
        row.status, row.inputs, row.progress = status, inputs, progress
        session.add(row)


def test_the_furthest_checkpoint_of_an_ended_attempt_with_the_same_inputs_wins(settings, job_id):
    other_seed = {**INPUTS, "seed": 8}
    add_attempt(settings, job_id, 1, "lost", INPUTS, 32)
    add_attempt(settings, job_id, 2, "failed", INPUTS, 48)
    add_attempt(settings, job_id, 3, "lost", other_seed, 96)  # other inputs: another song
    add_attempt(settings, job_id, 4, "cancelled", INPUTS, 80)  # a cancel is not a resume point
    add_attempt(settings, job_id, 5, "lost", INPUTS, None)  # died before its first checkpoint
    with session_scope(settings.resolved_database_url) as session:
        attempt, point = latest_checkpoint(session, job_id, "generate_tokens", 6, INPUTS)
        assert (attempt, point["done"]) == (2, 48)
        assert latest_checkpoint(session, job_id, "generate_tokens", 2, INPUTS)[0] == 1  # earlier attempts only
        assert latest_checkpoint(session, job_id, "generate_tokens", 1, INPUTS) is None
        assert latest_checkpoint(session, job_id, "generate_tokens", 6, {**INPUTS, "seed": 9}) is None


def test_a_checkpoint_is_used_only_by_an_engine_that_computes_the_same_numbers(settings, job_id):
    store = open_store(settings)
    grid = torch.randint(0, 8000, (8, 40), dtype=torch.int32)
    ref = store.put(tokens_to_bytes(grid), "tokens")
    ours = compat_key(slots=8, card="cpu")
    assert ours != compat_key(slots=16, card="cpu") and ours == compat_key(card="cpu", slots=8)
    add_attempt(settings, job_id, 1, "lost", INPUTS, 40, sha=ref.sha256, compat=ours)
    inp = GenerateTokensInput.model_validate(INPUTS)

    def context(attempt: int) -> StageContext:
        return StageContext(job_id, "generate_tokens", attempt, settings, store)

    refused = context(2)
    assert find_resume_point(inp, refused, compat_key(slots=16, card="cpu")) is None
    assert refused.environment_extra["resume_skipped"]["frames"] == 40
    assert "engine shape" in refused.environment_extra["resume_skipped"]["reason"]

    used = context(2)
    point = find_resume_point(inp, used, ours)
    assert point is not None and point.attempt == 1 and torch.equal(point.frames, grid.long())
    assert "resume_skipped" not in used.environment_extra


def test_a_missing_checkpoint_artifact_means_starting_over_with_the_reason_recorded(settings, job_id):
    add_attempt(settings, job_id, 1, "lost", INPUTS, 40, sha="ab" * 32, compat="c")
    ctx = StageContext(job_id, "generate_tokens", 2, settings, open_store(settings))
    assert find_resume_point(GenerateTokensInput.model_validate(INPUTS), ctx, "c") is None
    assert "unreadable" in ctx.environment_extra["resume_skipped"]["reason"]


def test_the_writer_stores_the_grid_and_records_it_with_the_attempts_progress(settings, job_id, monkeypatch):
    ctx = StageContext(job_id, "generate_tokens", 1, settings, open_store(settings))
    written: list[dict] = []
    monkeypatch.setattr(StageContext, "_write_held", lambda self, **values: written.append(values))
    grid = torch.randint(0, 8000, (8, 16), dtype=torch.int32)
    writer = CheckpointWriter(ctx, "c", total=100)
    writer.save(16, grid)
    point = written[-1]["progress"]["checkpoint"]
    assert (point["done"], point["compat"], point["attempt"], writer.saved) == (16, "c", 1, 1)
    assert ctx.store.get(point["tokens"]["sha256"], "tokens") == tokens_to_bytes(grid)
    ctx.progress(20, 100, force=True)  # later progress writes keep the last resume point
    assert written[-1]["progress"]["checkpoint"] == point and written[-1]["progress"]["done"] == 20
