"""The stage-recording wrapper that every pipeline stage goes through.

For one message (job id, attempt) it: claims the StageRun row (so a duplicate delivery backs off),
resolves the stage's typed input from SQL and records it before computing, runs the stage, checks
the typed output, and records outputs, artifacts, timings and the environment - or, on failure,
the error type, message and full traceback. Every write is keyed by (job, stage, attempt), so a
repeated write (re-delivery, an error callback that runs twice) changes nothing.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
import traceback as traceback_module
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from pydantic import BaseModel
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import Artifact, Job, StageRun, utcnow
from tasks.artifact_store import LocalDirectoryStore, open_store
from tasks.celery_app import app, queue_for, task_name
from tasks.contracts import STAGE_CONTRACTS, STAGES, ArtifactRef
from tasks.environment import environment_snapshot
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5
CANCEL_CHECK_INTERVAL_S = 1.0


class JobCancelled(Exception):
    """Raised inside a stage when its job's cancel flag is set."""


class StageAlreadyRunning(Exception):
    """Another worker holds this stage attempt with a fresh heartbeat: this delivery backs off."""


@dataclass
class StageContext:
    """What a stage's compute function may use besides its typed input."""

    job_id: str
    stage: str
    attempt: int
    settings: Settings
    store: LocalDirectoryStore
    environment_extra: dict[str, Any] = field(default_factory=dict)
    _last_progress: float = 0.0
    _last_cancel_check: float = 0.0
    _cancelled: bool = False
    _started: float = field(default_factory=time.monotonic)

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    def progress(self, done: int, total: int, unit: str = "frames", *, force: bool = False) -> None:
        """Record progress and a heartbeat, at most every half second (a fast loop is not slowed)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_WRITE_INTERVAL_S and done < total:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-9)
        payload = {"done": done, "total": total, "unit": unit, "rate_per_s": round(done / elapsed, 3),
                   "elapsed_s": round(elapsed, 3)}
        with session_scope(self.database_url) as session:
            session.execute(update(StageRun).where(*_row_key(self.job_id, self.stage, self.attempt))
                            .values(progress=payload, heartbeat_at=utcnow()))

    def heartbeat(self) -> None:
        with session_scope(self.database_url) as session:
            session.execute(update(StageRun).where(*_row_key(self.job_id, self.stage, self.attempt))
                            .values(heartbeat_at=utcnow()))

    def should_cancel(self) -> bool:
        """Cooperative cancel check against the job's flag in SQL, throttled to once a second."""
        now = time.monotonic()
        if self._cancelled or now - self._last_cancel_check < CANCEL_CHECK_INTERVAL_S:
            return self._cancelled
        self._last_cancel_check = now
        with session_scope(self.database_url) as session:
            self._cancelled = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._cancelled

    def put_artifact(self, data: bytes, kind: str) -> ArtifactRef:
        ref = self.store.put(data, kind)
        with session_scope(self.database_url) as session:
            _upsert_artifact(session, ref, self.store.location(ref.sha256))
        return ref


Resolver = Callable[[Session, Job, Settings], BaseModel]
Compute = Callable[[Any, StageContext], BaseModel]


def _row_key(job_id: str, stage: str, attempt: int) -> tuple:
    return (StageRun.job_id == job_id, StageRun.stage == stage, StageRun.attempt == attempt)


def _upsert_artifact(session: Session, ref: ArtifactRef, location: str) -> None:
    if session.get(Artifact, ref.sha256) is None:
        session.add(Artifact(sha256=ref.sha256, kind=ref.kind, media_type=ref.media_type, bytes=ref.bytes,
                             location=location))
        session.flush()


def _artifact_refs(payload: Any) -> list[str]:
    """Every sha256 of an ArtifactRef found anywhere in a stage output."""
    found: list[str] = []
    if isinstance(payload, dict):
        if {"sha256", "kind", "bytes", "media_type"} <= payload.keys():
            found.append(payload["sha256"])
        for value in payload.values():
            found.extend(_artifact_refs(value))
    elif isinstance(payload, list):
        for value in payload:
            found.extend(_artifact_refs(value))
    return found


def describe_error(exc: BaseException) -> tuple[str, str]:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    return name, str(exc) or repr(exc)


def stale_after_s(settings: Settings) -> float:
    return max(60.0, 6 * settings.heartbeat_s)


class StageRunner:
    """Runs one stage attempt with the full record around it; used by Celery tasks and by the CLI."""

    def __init__(self, stage: str, resolve: Resolver, compute: Compute,
                 on_failure: Callable[[BaseException, StageContext], None] | None = None):
        if stage not in STAGE_CONTRACTS:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        self.stage = stage
        self.input_model, self.output_model = STAGE_CONTRACTS[stage]
        self.resolve = resolve
        self.compute = compute
        self.on_failure = on_failure

    def run(self, job_id: str, attempt: int, *, celery_task_id: str | None = None,
            settings: Settings | None = None) -> dict[str, Any] | None:
        settings = settings or get_settings()
        url = settings.resolved_database_url
        ctx = StageContext(job_id, self.stage, attempt, settings, open_store(settings.resolved_artifact_dir))
        recording = 0.0
        t_claim = time.monotonic()
        claim = self._claim(url, job_id, attempt, celery_task_id, settings)
        recording += time.monotonic() - t_claim
        if claim == "done":
            return None
        started = t_claim  # the duration covers the whole attempt, its own recording included
        try:
            if claim == "cancelled":
                raise JobCancelled(f"job {job_id} was cancelled before stage {self.stage} started")
            t0 = time.monotonic()
            with session_scope(url) as session:
                job = session.get(Job, job_id)
                inputs = self.input_model.model_validate(self.resolve(session, job, settings).model_dump())
                session.execute(update(StageRun).where(*_row_key(job_id, self.stage, attempt)).values(
                    inputs=inputs.model_dump(mode="json"),
                    environment=environment_snapshot(queue=queue_for(self.stage))))
            recording += time.monotonic() - t0
            result = self.compute(inputs, ctx)
            outputs = self.output_model.model_validate(result.model_dump())
            t1 = time.monotonic()
            self._record_success(url, job_id, attempt, outputs, ctx, started, recording)
            return outputs.model_dump(mode="json")
        except JobCancelled as exc:
            self._record_end(url, job_id, attempt, "cancelled", exc, ctx, started, with_traceback=False)
            raise Ignore() from exc
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self._record_end(url, job_id, attempt, "failed", exc, ctx, started, with_traceback=True)
            if self.on_failure is not None:
                self.on_failure(exc, ctx)
            raise

    # -- the record ---------------------------------------------------------------------------

    def _claim(self, url: str, job_id: str, attempt: int, celery_task_id: str | None, settings: Settings) -> str:
        """Mark the row running; 'run', 'cancelled', or 'done' (nothing to do for this delivery)."""
        now = utcnow()
        stale = now - dt.timedelta(seconds=stale_after_s(settings))
        with session_scope(url) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} does not exist")
            row = session.scalar(select(StageRun).where(*_row_key(job_id, self.stage, attempt)))
            if row is None:
                raise LookupError(f"job {job_id} has no {self.stage} attempt {attempt}")
            claimed = session.execute(
                update(StageRun).where(*_row_key(job_id, self.stage, attempt)).where(or_(
                    StageRun.status.in_(("queued", "pending")),
                    (StageRun.status == "running") & or_(StageRun.heartbeat_at.is_(None), StageRun.heartbeat_at < stale)))
                .values(status="running", started_at=now, heartbeat_at=now, celery_task_id=celery_task_id,
                        worker_hostname=socket.gethostname(), worker_pid=os.getpid(),
                        deliveries=StageRun.deliveries + 1)
                .execution_options(synchronize_session=False)).rowcount
            if not claimed:
                session.refresh(row)
                log.warning("job %s stage %s attempt %s: delivery skipped, row is %s", job_id, self.stage, attempt,
                            row.status)
                if row.status == "running":
                    raise Ignore()  # another worker holds it with a fresh heartbeat: never compute twice
                if row.status in ("succeeded", "reused"):
                    return "done"
                raise Ignore()
            if job.status == "queued":
                job.status = "running"
            return "cancelled" if job.cancel_requested else "run"

    def _record_success(self, url: str, job_id: str, attempt: int, outputs: BaseModel, ctx: StageContext,
                        started: float, recording: float) -> None:
        t0 = time.monotonic()
        payload = outputs.model_dump(mode="json")
        with session_scope(url) as session:
            row = session.scalar(select(StageRun).where(*_row_key(job_id, self.stage, attempt)))
            row.status = "succeeded"
            row.outputs = payload
            row.artifacts = _artifact_refs(payload)
            row.finished_at = utcnow()
            row.heartbeat_at = row.finished_at
            row.environment = {**(row.environment or {}), **environment_snapshot(queue=row.queue),
                               **ctx.environment_extra}
            job = session.get(Job, job_id)
            if self.stage == STAGES[-1]:
                job.status = "succeeded"
                job.finished_at = row.finished_at
            session.flush()
            now = time.monotonic()
            row.recording_s = recording + (now - t0)  # the final commit is not counted: measured by its caller
            row.duration_s = now - started

    def _record_end(self, url: str, job_id: str, attempt: int, status: str, exc: BaseException,
                    ctx: StageContext, started: float, *, with_traceback: bool) -> None:
        error_type, message = describe_error(exc)
        if isinstance(exc, SoftTimeLimitExceeded):
            message = f"stage {self.stage} exceeded its soft time limit"
        trace = "".join(traceback_module.format_exception(exc)) if with_traceback else None
        with session_scope(url) as session:
            row = session.scalar(select(StageRun).where(*_row_key(job_id, self.stage, attempt)))
            row.status = status
            row.error_type = error_type
            row.error_message = message
            row.traceback = trace
            exchanges = getattr(exc, "llm_exchanges", None)
            if exchanges:  # a failed LLM backend's raw requests and answers are evidence too
                row.outputs = {"llm_exchanges": [e.model_dump(mode="json") if hasattr(e, "model_dump") else e
                                                 for e in exchanges]}
            row.finished_at = utcnow()
            row.duration_s = time.monotonic() - started
            row.environment = {**(row.environment or {}), **environment_snapshot(queue=row.queue),
                               **ctx.environment_extra}
            job = session.get(Job, job_id)
            job.status = status
            job.finished_at = row.finished_at
            if status == "failed":
                job.failed_stage, job.error_type, job.error_message = self.stage, error_type, message
            else:
                job.cancel_reason = job.cancel_reason or message


def stage_task(stage: str, resolve: Resolver, compute: Compute,
               on_failure: Callable[[BaseException, StageContext], None] | None = None) -> Task:
    """Register the Celery task for a stage; its body is the StageRunner, nothing else."""
    runner = StageRunner(stage, resolve, compute, on_failure)

    @app.task(name=task_name(stage), bind=True, acks_late=True, reject_on_worker_lost=True)
    def _task(self: Task, job_id: str, attempt: int) -> None:
        runner.run(job_id, attempt, celery_task_id=self.request.id)

    _task.runner = runner  # type: ignore[attr-defined]
    return _task
