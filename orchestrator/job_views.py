"""Read-only views of a job and its stage rows as JSON-ready dicts.

One shape for the API (`GET /api/jobs/<id>`), `songpipe show --json` and the job page, so what a
person sees in the browser is exactly what a script gets. Nothing here writes.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import JOB_TERMINAL, STAGE_DONE, Artifact, Job, StageRun
from gpu_worker.checkpoints.checkpoint_marker import MARKER as TINY_CHECKPOINT_MARKER
from tasks.contracts import STAGES
from tasks.pipeline.attempts import latest_done, latest_runs
from tasks.pipeline.stream_windows import SAMPLES_PER_FRAME, StreamState, seconds, stream_state
from tasks.settings import Settings

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
TERMINAL_JOB_STATUSES = JOB_TERMINAL
TINY_CHECKPOINT_NOTICE = "random weights: noise, not music (tiny test checkpoint in use)"


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_PATTERN.match(value))


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat()


def checkpoint_is_tiny(settings: Settings) -> bool:
    return settings.uses_tiny_checkpoint or (Path(settings.resolved_checkpoint_dir) / TINY_CHECKPOINT_MARKER).exists()


def stage_view(row: StageRun) -> dict[str, Any]:
    return {
        "stage": row.stage, "attempt": row.attempt, "status": row.status, "queue": row.queue,
        "inputs": row.inputs, "outputs": row.outputs, "artifacts": row.artifacts or [],
        "reused_from": row.reused_from,
        "error_type": row.error_type, "error_message": row.error_message, "traceback": row.traceback,
        "celery_task_id": row.celery_task_id, "worker_hostname": row.worker_hostname, "worker_pid": row.worker_pid,
        "queued_at": _time(row.queued_at), "started_at": _time(row.started_at),
        "finished_at": _time(row.finished_at), "heartbeat_at": _time(row.heartbeat_at),
        "duration_s": row.duration_s, "recording_s": row.recording_s, "deliveries": row.deliveries,
        "progress": row.progress, "environment": row.environment,
    }


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/api/jobs/{job_id}", "page": f"/jobs/{job_id}", "audio": f"/api/jobs/{job_id}/audio",
            "stream": f"/api/jobs/{job_id}/stream"}


def stream_view(state: StreamState) -> dict[str, Any]:
    """What a listener of the job can hear now (docs/streaming.md): the song page's player reads it."""
    return {
        "status": state.status, "attempt": state.attempt, "windows": len(state.windows),
        "seconds_final": seconds(state.samples_final) or 0.0, "seconds_total": seconds(state.total_samples),
        "seconds_generated": seconds(state.frames_generated * SAMPLES_PER_FRAME) or 0.0,
        "decode_s": round(sum(part.decode_s for part in state.windows), 3),
        "href": links(state.job_id)["stream"],
    }


def _tags_used(latest: dict[str, StageRun]) -> str | None:
    tags = latest.get("generate_tags")
    return (tags.outputs or {}).get("tags_string") if tags is not None else None


def _tiny(job_rows: dict[str, StageRun], settings: Settings) -> bool:
    """Whether this job's model stages used (or will use) tiny random weights.

    The checkpoint folder recorded in the token stage's inputs decides (its marker file), so a tiny
    checkpoint given through HEARTMULA_CKPT counts too; before that stage starts, the configuration.
    """
    for stage in ("generate_tokens", "decode_audio"):
        row = job_rows.get(stage)
        if row is None:
            continue
        if (row.environment or {}).get("tiny_checkpoint"):
            return True
        checkpoint = (row.inputs or {}).get("checkpoint")
        if checkpoint:
            return (Path(checkpoint) / TINY_CHECKPOINT_MARKER).exists()
    return checkpoint_is_tiny(settings)


def job_view(session: Session, job_id: str, settings: Settings) -> dict[str, Any] | None:
    """The job with every stage row (all attempts, in pipeline order), or None for an unknown id."""
    if not is_job_id(job_id):
        return None
    job = session.get(Job, job_id)
    if job is None:
        return None
    rows = list(session.scalars(select(StageRun).where(StageRun.job_id == job_id)))
    rows.sort(key=lambda r: (STAGES.index(r.stage) if r.stage in STAGES else len(STAGES), r.attempt))
    latest = latest_runs(rows)
    audio = latest.get("encode_audio")
    audio_ready = audio is not None and audio.status in STAGE_DONE and bool(audio.outputs)
    tiny = _tiny(latest, settings)
    stream = stream_state(session, job_id)
    assert stream is not None  # the job row was read above
    return {
        "id": job.id, "status": job.status, "seed": job.seed, "seed_source": job.seed_source,
        "request": job.request, "pipeline": job.pipeline, "code_version": job.code_version, "source": job.source,
        "created_at": _time(job.created_at), "updated_at": _time(job.updated_at),
        "finished_at": _time(job.finished_at),
        "replay_of": job.replay_of, "replay_from_stage": job.replay_from_stage,
        "replay_overrides": job.replay_overrides,
        "failed_stage": job.failed_stage, "error_type": job.error_type, "error_message": job.error_message,
        "cancel_requested": job.cancel_requested, "cancel_reason": job.cancel_reason,
        "tags_used": _tags_used(latest),
        "audio_ready": audio_ready,
        "output_format": (job.request or {}).get("output_format", "mp3"),
        "tiny_checkpoint": tiny,
        "notice": TINY_CHECKPOINT_NOTICE if tiny else None,
        "links": links(job.id),
        "stream": stream_view(stream),
        "stages": [stage_view(row) for row in rows],
    }


def load_job_view(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """`job_view` in a session of its own: what the API, the job page and `songpipe show` read."""
    with session_scope(settings.resolved_database_url) as session:
        return job_view(session, job_id, settings)


def job_exists(session: Session, job_id: str) -> bool:
    return is_job_id(job_id) and session.get(Job, job_id) is not None


def audio_artifact(session: Session, job_id: str) -> Artifact | None:
    """The final audio of a job: its latest finished encode stage's output, looked up by sha256."""
    if not is_job_id(job_id):
        return None
    row = latest_done(session, job_id, "encode_audio").get("encode_audio")
    sha256 = ((row.outputs or {}).get("audio") or {}).get("sha256") if row is not None else None
    return session.get(Artifact, sha256) if sha256 else None
