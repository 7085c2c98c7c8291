"""Accepting a job: validate, draw the seed, write Job + StageRun rows in one transaction, then send.

The SQL rows exist before any message: a broker hiccup after the commit loses nothing (the job is
visible as queued and can be re-sent), while a validation error stores nothing at all.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import JOB_ACTIVE, Job, JobStatus, StageRun, StageStatus
from tasks.celery_app import queue_for
from tasks.contracts import MAX_SEED, PIPELINE_NAME, STAGES, JobRequest
from tasks.environment import code_version
from tasks.pipeline import chain as pipeline_chain
from tasks.settings import Settings
from tasks.stage_inputs import refine_lyrics_input

log = logging.getLogger(__name__)

SEED_DRAW_BOUND = 2**31  # drawn seeds stay within 31 bits so every client can show them exactly


@dataclass(frozen=True)
class SubmittedJob:
    id: str
    seed: int
    seed_source: str
    dispatched: bool = True  # False: stored, but the broker refused; the reconciler sends it later


def resolve_defaults(request: JobRequest, settings: Settings) -> JobRequest:
    """Fill the per-deployment defaults into the request, so the stored request says what ran."""
    updates: dict[str, Any] = {}
    if request.lyrics_backend is None:
        updates["lyrics_backend"] = settings.default_lyrics_backend
    if request.tags_backend is None:
        # tags given and nothing else asked for: keep exactly the user's tags
        updates["tags_backend"] = "given" if request.tags and not request.style else settings.default_tags_backend
    return request.model_copy(update=updates)


def draw_seed() -> int:
    return secrets.randbelow(SEED_DRAW_BOUND)


def search_text(request: JobRequest) -> str:
    parts = [request.lyrics, request.style or "", ",".join(request.tags or [])]
    return "\n".join(parts).lower()


def new_job_rows(session: Session, request: JobRequest, settings: Settings, *, source: str,
                 client_id: str | None = None, seed: int | None = None, replay_of: str | None = None,
                 replay_from_stage: str | None = None, replay_overrides: dict | None = None) -> Job:
    """Add a job and its first attempt rows to `session` (the caller commits)."""
    request = resolve_defaults(request, settings)
    chosen_seed = seed if seed is not None else request.seed
    seed_source = "user" if chosen_seed is not None else "drawn"
    if chosen_seed is None:
        chosen_seed = draw_seed()
    if not 0 <= chosen_seed <= MAX_SEED:
        raise ValueError(f"seed {chosen_seed} is outside 0..{MAX_SEED}")
    job = Job(id=uuid.uuid4().hex, status=JobStatus.QUEUED, request=request.model_dump(mode="json"), seed=chosen_seed,
              seed_source=seed_source, pipeline=PIPELINE_NAME, code_version=code_version(), source=source,
              client_id=client_id, replay_of=replay_of, replay_from_stage=replay_from_stage,
              replay_overrides=replay_overrides, search_text=search_text(request))
    session.add(job)
    for stage in STAGES:
        job.stage_runs.append(StageRun(stage=stage, attempt=1, status=StageStatus.QUEUED, queue=queue_for(stage)))
    # the first stage's input is known now: record it before any message exists
    job.stage_runs[0].inputs = refine_lyrics_input(session, job, settings).model_dump(mode="json")
    session.flush()
    return job


def submit_job(request: JobRequest, settings: Settings, *, source: str = "api",
               client_id: str | None = None) -> SubmittedJob:
    from tasks.metrics import count_broker_error

    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, request, settings, source=source, client_id=client_id)
        submitted = SubmittedJob(job.id, job.seed, job.seed_source)
    try:
        pipeline_chain.send_chain(submitted.id, {stage: 1 for stage in STAGES}, request.max_audio_length_ms)
    except (KombuOperationalError, RedisError, OSError) as exc:
        # The job is committed: answering an error would make a client resubmit a duplicate.
        # The reconciler finds queued rows whose message is missing and sends them.
        count_broker_error("publish")
        log.warning("job %s stored but not sent (%s); the reconciler will send it", submitted.id, exc)
        return dataclasses.replace(submitted, dispatched=False)
    except Exception:  # any other publish error after the commit: same answer, with the traceback logged
        log.exception("job %s stored but not sent; the reconciler will send it", submitted.id)
        return dataclasses.replace(submitted, dispatched=False)
    return submitted


def queued_job_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(JOB_ACTIVE))) or 0
