"""The stage-recording wrapper that every pipeline stage goes through.

For one message (job id, attempt) it: claims the StageRun row (so a duplicate delivery backs off),
resolves the stage's typed input from SQL and records it before computing, runs the stage, checks
the typed output, and records outputs, artifacts, timings and the environment - or, on failure,
the error type, message and full traceback. Every write is keyed by (job, stage, attempt), so a
repeated write (re-delivery, an error callback that runs twice) changes nothing.

Crash safety (design.md section 4, tasks/reconciler.py):
- Claim: one conditional UPDATE moves the row from queued to running; any other delivery of the same
  attempt (a broker re-delivery, a requeue after a lost child) finds it running, succeeded or
  superseded and backs off without computing. It is noted on the row (environment.duplicate_deliveries).
- Heartbeat: while a stage runs, a thread writes heartbeat_at every `heartbeat_s`, so even one long
  prefill or codec window keeps its lease (12 heartbeats). A row whose heartbeat stops is taken over
  by the reconciler as a NEW attempt; the old attempt is marked "lost".
- Fencing: every write after the claim is conditional on the row still being held by this process.
  A holder that comes back after losing its lease (its row was superseded) stops at its next
  heartbeat or cancel check and its result is discarded, so a stage never succeeds twice.
- Failures: transient ones (out of GPU memory) get ONE new attempt, sent right away, on a fresh worker
  process (the GPU failure handler replaces the process); everything else fails the job, once.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback as traceback_module
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.clock import db_now
from db.engine import rowcount, session_scope
from db.models import (
    JOB_ACTIVE,
    STAGE_CLAIMABLE,
    STAGE_DONE,
    Artifact,
    Job,
    JobStatus,
    StageRun,
    StageStatus,
    StreamWindow,
    utcnow,
)
from tasks.artifact_store import ArtifactStore, artifact_shas, open_store
from tasks.celery_app import app, queue_for, task_name
from tasks.contracts import STAGE_CONTRACTS, STAGES, ArtifactRef
from tasks.environment import environment_snapshot, torch_snapshot
from tasks.pipeline import chain as pipeline_chain
from tasks.pipeline.attempts import add_attempts, end_job, latest_by_stage
from tasks.settings import Settings, get_settings
from tasks.worker_stop import worker_is_stopping

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.5
CANCEL_CHECK_INTERVAL_S = 1.0
LEASE_HEARTBEATS = 12  # a running row is lost after this many missed heartbeats
TRANSIENT_RETRIES = 1  # transient failures get exactly one new attempt
TRANSIENT_RETRY_REQUESTER = "retry:transient"
HAND_BACK_REQUESTER = "worker-stop"
HANDED_BACK_ERROR = "WorkerStopped"
MAX_NOTED_DUPLICATES = 20


class JobCancelled(Exception):
    """Raised inside a stage when its job's cancel flag is set."""


class StageSuperseded(Exception):
    """This attempt lost its lease and a newer attempt replaced it: stop, write nothing more."""


class TransientStageError(Exception):
    """Base for failures worth one more attempt on a fresh worker process."""


def lease_s(settings: Settings) -> float:
    """How long a running row may go without a heartbeat before it counts as lost."""
    return max(LEASE_HEARTBEATS * settings.heartbeat_s, 1.0)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-device-memory error, by name or message (this module does not import torch)."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """Out of device memory (e.g. after fragmentation) may pass on a fresh process, and so may an error
    that declares itself transient (`transient = True`, e.g. a stalled engine); nothing else is retried."""
    if isinstance(exc, TransientStageError) or getattr(exc, "transient", False) is True:
        return True
    return is_out_of_memory(exc)


StageHook = Callable[["StageContext", str, dict], None]
_stage_hooks: list[StageHook] = []


def add_stage_hook(hook: StageHook) -> None:
    """Call `hook(ctx, event, info)` at "start" (inputs recorded, before compute) and at every "progress".

    The GPU worker registers fault injection and the poisoned-process guard here (gpu_worker/).
    """
    if hook not in _stage_hooks:
        _stage_hooks.append(hook)


WORKER_NAME: str | None = None  # the Celery node name (e.g. gpu1@host), set when a worker starts


def _holder() -> tuple[str, int]:
    return WORKER_NAME or socket.gethostname(), os.getpid()


@dataclass
class StageContext:
    """What a stage's compute function may use besides its typed input."""

    job_id: str
    stage: str
    attempt: int
    settings: Settings
    store: ArtifactStore
    environment_extra: dict[str, Any] = field(default_factory=dict)
    job_request: dict[str, Any] = field(default_factory=dict)
    _last_progress: float = 0.0
    _last_cancel_check: float = 0.0
    _cancelled: bool = False
    _stopping: bool = False
    _superseded: bool = False
    _environment_recorded: bool = False  # the full snapshot is on the row (written with the inputs)
    _started: float = field(default_factory=time.monotonic)
    _checkpoint: dict[str, Any] | None = None  # the last resume point, kept in every progress write

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    @property
    def superseded(self) -> bool:
        return self._superseded

    def _held(self) -> tuple:
        """This attempt's row, while this process still holds it (the fence for every write)."""
        host, pid = _holder()
        return (*_row_key(self.job_id, self.stage, self.attempt), StageRun.status == StageStatus.RUNNING,
                StageRun.worker_hostname == host, StageRun.worker_pid == pid)

    def _write_held(self, **values: Any) -> None:
        with session_scope(self.database_url) as session:
            written = rowcount(session.execute(update(StageRun).where(*self._held()).values(**values)
                                               .execution_options(synchronize_session=False)))
        if not written:
            self._superseded = True
            raise StageSuperseded(f"job {self.job_id} stage {self.stage} attempt {self.attempt} is no longer "
                                  "held by this process (superseded after a lost lease)")

    def progress(self, done: int, total: int, unit: str = "frames", *, force: bool = False) -> None:
        """Record progress and a heartbeat (at most every half second), then honour a cancel request."""
        self.run_hooks("progress", done=done, total=total, unit=unit)
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_WRITE_INTERVAL_S or done >= total:
            self._last_progress = now
            elapsed = max(now - self._started, 1e-9)
            payload: dict[str, Any] = {"done": done, "total": total, "unit": unit,
                                       "rate_per_s": round(done / elapsed, 3), "elapsed_s": round(elapsed, 3)}
            if self._checkpoint is not None:
                payload["checkpoint"] = self._checkpoint
            self._write_held(progress=payload, heartbeat_at=db_now())
        if self.should_cancel():
            raise JobCancelled(f"job {self.job_id} cancelled during {self.stage} after {done} of {total} {unit}")

    def checkpoint(self, done: int, total: int, unit: str, point: dict[str, Any]) -> None:
        """Record a resume point (e.g. the frames so far, as an artifact) with this attempt's progress:
        a later attempt of the same stage and inputs may continue from it
        (tasks.pipeline.attempts.latest_checkpoint)."""
        self._checkpoint = point
        self.progress(done, total, unit, force=True)

    def heartbeat(self) -> None:
        self._write_held(heartbeat_at=db_now())

    def record_inputs(self, inputs: BaseModel) -> None:
        """Replace the recorded inputs with what the stage finally consumed (a decode that followed its
        token stage records the finished token grid once it has it)."""
        self._write_held(inputs=inputs.model_dump(mode="json"))

    def record_stream_window(self, **values: Any) -> None:
        """One streamed codec window (db.models.StreamWindow), written only while this attempt is held."""
        with session_scope(self.database_url) as session:
            if session.scalar(select(StageRun.id).where(*self._held())) is None:
                self._superseded = True
                raise StageSuperseded(f"job {self.job_id} stage {self.stage} attempt {self.attempt} is no longer "
                                      "held by this process; its window is not recorded")
            session.add(StreamWindow(job_id=self.job_id, attempt=self.attempt, **values))

    def should_cancel(self) -> bool:
        """Cooperative cancel check against the job's flag in SQL, throttled to once a second.

        A superseded attempt stops here too (StageSuperseded), whatever the caller does with a True.
        """
        if self._superseded:
            raise StageSuperseded(f"job {self.job_id} stage {self.stage} attempt {self.attempt} was superseded")
        now = time.monotonic()
        if self._cancelled or self._stopping or now - self._last_cancel_check < CANCEL_CHECK_INTERVAL_S:
            return self._cancelled or self._stopping
        self._last_cancel_check = now
        with session_scope(self.database_url) as session:
            self._cancelled = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        # a clean stop of this worker: the stage ends like a cancel, then the runner hands it back
        self._stopping = not self._cancelled and worker_is_stopping(self.settings)
        return self._cancelled or self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    def put_artifact(self, data: bytes, kind: str) -> ArtifactRef:
        ref = self.store.put(data, kind)
        with session_scope(self.database_url) as session:
            _upsert_artifact(session, ref, self.store.location(ref.sha256))
        return ref

    def run_hooks(self, event: str, **info: Any) -> None:
        for hook in list(_stage_hooks):
            hook(self, event, info)


class _Heartbeat:
    """Writes heartbeat_at every `heartbeat_s` while the stage computes (a thread: long kernels, long
    windows and model loads keep their lease); notices when the attempt was superseded.

    The runner stops and joins it BEFORE the attempt's terminal write (M1): a beat landing after that
    write would find the row no longer running and wrongly mark the attempt superseded, which would
    drop its transient retry. A beat that finds the row gone once stopping has begun is ignored too.
    """

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{ctx.stage}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _beat(self) -> None:
        with session_scope(self.ctx.database_url) as session:
            written = rowcount(session.execute(update(StageRun).where(*self.ctx._held()).values(heartbeat_at=db_now())
                                               .execution_options(synchronize_session=False)))
        if not written and not self._stop.is_set():
            self.ctx._superseded = True
            raise StageSuperseded(f"job {self.ctx.job_id} stage {self.ctx.stage} attempt {self.ctx.attempt} is no "
                                  "longer held by this process (superseded after a lost lease)")

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            try:
                self._beat()
            except StageSuperseded:
                log.warning("job %s stage %s attempt %s was superseded while running; it stops at its next check",
                            self.ctx.job_id, self.ctx.stage, self.ctx.attempt)
                return
            except Exception:  # a database hiccup must not end the stage; the lease tolerates missed beats
                log.warning("heartbeat of job %s stage %s failed", self.ctx.job_id, self.ctx.stage, exc_info=True)


Resolver = Callable[[Session, Job, Settings], BaseModel]
Compute = Callable[[Any, StageContext], BaseModel]


def _row_key(job_id: str, stage: str, attempt: int) -> tuple:
    return (StageRun.job_id == job_id, StageRun.stage == stage, StageRun.attempt == attempt)


def _upsert_artifact(session: Session, ref: ArtifactRef, location: str) -> None:
    if session.get(Artifact, ref.sha256) is None:
        session.add(Artifact(sha256=ref.sha256, kind=ref.kind, media_type=ref.media_type, bytes=ref.bytes,
                             location=location))
        session.flush()


def _end_environment(row: StageRun, ctx: StageContext) -> dict[str, Any]:
    """The row's environment at the end of an attempt: what the start recorded, refreshed where it can change.

    Host, versions and code do not change within a process, so once the start snapshot is on the row only
    the torch facts (GPU memory; torch may have been loaded by the stage) and the stage's extras are merged.
    """
    fresh = torch_snapshot() if ctx._environment_recorded else environment_snapshot(queue=row.queue)
    return {**(row.environment or {}), **fresh, **ctx.environment_extra}


def describe_error(exc: BaseException) -> tuple[str, str]:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    return name, str(exc) or repr(exc)


@dataclass(frozen=True)
class ScheduledRetry:
    job_id: str
    attempts: dict[str, int]
    max_audio_length_ms: int | None


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
            settings: Settings | None = None, continue_chain: bool = False) -> dict[str, Any] | None:
        """`continue_chain`: this delivery was sent outside the job's chain (a decode started early to stream,
        docs/streaming.md), whose own delivery then backs off; on success it sends the stages after it."""
        settings = settings or get_settings()
        url = settings.resolved_database_url
        ctx = StageContext(job_id, self.stage, attempt, settings, open_store(settings))
        t_claim = time.monotonic()
        claim = self._claim(url, job_id, attempt, celery_task_id)
        recording = time.monotonic() - t_claim
        if claim == "done":
            return None
        started = time.monotonic()
        with _Heartbeat(ctx) as beat:
            try:
                if claim == "cancelled":
                    raise JobCancelled(f"job {job_id} was cancelled before stage {self.stage} started")
                t0 = time.monotonic()
                with session_scope(url) as session:
                    job = session.get_one(Job, job_id)
                    ctx.job_request = dict(job.request or {})
                    inputs = self.input_model.model_validate(self.resolve(session, job, settings).model_dump())
                    written = rowcount(session.execute(update(StageRun).where(*ctx._held()).values(
                        inputs=inputs.model_dump(mode="json"),
                        environment=environment_snapshot(queue=queue_for(self.stage)))
                        .execution_options(synchronize_session=False)))
                    if not written:
                        raise StageSuperseded(f"job {job_id} stage {self.stage} attempt {attempt} was superseded")
                ctx._environment_recorded = True  # committed
                recording += time.monotonic() - t0
                ctx.run_hooks("start")
                result = self.compute(inputs, ctx)
                outputs = self.output_model.model_validate(result.model_dump())
                beat.stop()
                self._record_success(url, job_id, attempt, outputs, ctx, started, recording)
                if continue_chain:
                    self._send_rest(url, job_id)
                return outputs.model_dump(mode="json")
            except StageSuperseded as exc:
                log.warning("%s; result discarded", exc)
                raise Ignore() from exc
            except JobCancelled as exc:
                beat.stop()
                if ctx.stopping and not ctx.superseded:
                    handed_back = self._hand_back(url, job_id, attempt, ctx, started)
                    if handed_back is not None:
                        _send_retry(handed_back)
                elif not ctx.superseded:
                    self._record_end_unless_superseded(url, job_id, attempt, StageStatus.CANCELLED, exc, ctx, started)
                raise Ignore() from exc
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if ctx.superseded:
                    log.warning("job %s stage %s attempt %s failed after being superseded (%s); not recorded",
                                job_id, self.stage, attempt, describe_error(exc)[0])
                    raise Ignore() from exc
                beat.stop()
                if self.on_failure is not None:
                    try:  # before the record, so what it decides (e.g. process replacement) is recorded too
                        self.on_failure(exc, ctx)
                    except Exception:
                        log.exception("failure handler of stage %s raised", self.stage)
                retry = self._record_end_unless_superseded(url, job_id, attempt, StageStatus.FAILED, exc, ctx, started)
                if ctx.superseded:
                    raise Ignore() from exc
                if retry is not None:
                    _send_retry(retry)
                raise

    # -- the record ---------------------------------------------------------------------------

    def claimable(self, job_id: str, attempt: int, settings: Settings | None = None) -> bool:
        """Whether a delivery could still claim this attempt now (an active job, a claimable row): a
        delivery deferred for admission waits in the broker only while it can (else it runs, and backs off
        at the claim)."""
        url = (settings or get_settings()).resolved_database_url
        with session_scope(url) as session:
            job = session.get(Job, job_id)
            status = session.scalar(select(StageRun.status).where(*_row_key(job_id, self.stage, attempt)))
            return job is not None and job.status in JOB_ACTIVE and status in STAGE_CLAIMABLE

    def _claim(self, url: str, job_id: str, attempt: int, celery_task_id: str | None) -> str:
        """Mark the row running; 'run', 'cancelled', or 'done' (nothing to do for this delivery).

        Only a queued row of an active job can be claimed, in one conditional UPDATE: of two
        concurrent deliveries exactly one wins. The loser backs off (Ignore: acknowledged, the
        chain does not continue from it) and is noted on the row.
        """
        now = utcnow()
        host, pid = _holder()
        outcome = "ignore"
        with session_scope(url) as session:
            job = session.get_one(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} does not exist")
            row = session.scalar(select(StageRun).where(*_row_key(job_id, self.stage, attempt)))
            if row is None:
                raise LookupError(f"job {job_id} has no {self.stage} attempt {attempt}")
            claimed = 0
            if job.status in JOB_ACTIVE:
                claimed = rowcount(session.execute(
                    update(StageRun).where(*_row_key(job_id, self.stage, attempt),
                                           StageRun.status.in_(STAGE_CLAIMABLE))
                    .values(status=StageStatus.RUNNING, started_at=db_now(), heartbeat_at=db_now(), celery_task_id=celery_task_id,
                            worker_hostname=host, worker_pid=pid, deliveries=StageRun.deliveries + 1)
                    .execution_options(synchronize_session=False)))
            if not claimed:
                session.refresh(row)
                log.warning("job %s stage %s attempt %s: delivery %s skipped, row is %s (job %s)", job_id,
                            self.stage, attempt, celery_task_id, row.status, job.status)
                noted = list((row.environment or {}).get("duplicate_deliveries", []))[-(MAX_NOTED_DUPLICATES - 1):]
                noted.append({"at": now.isoformat(), "celery_task_id": celery_task_id, "hostname": host, "pid": pid,
                              "row_status": row.status, "job_status": job.status})
                row.environment = {**(row.environment or {}), "duplicate_deliveries": noted}
                if row.status in STAGE_DONE and job.status in JOB_ACTIVE:
                    outcome = "done"  # a re-delivery after success: let the chain go on (idempotent downstream)
            else:
                if job.status == JobStatus.QUEUED:
                    job.status = JobStatus.RUNNING
                outcome = "cancelled" if job.cancel_requested else "run"
        if outcome == "ignore":
            raise Ignore()  # after the commit, so the note about the skipped delivery is kept
        return outcome

    def _send_rest(self, url: str, job_id: str) -> None:
        """Send the queued attempts of the stages after this one (the chain this delivery was not part of)."""
        later = STAGES[STAGES.index(self.stage) + 1:]
        with session_scope(url) as session:
            job = session.get_one(Job, job_id)
            latest = latest_by_stage(session, job_id)
            attempts = {stage: latest[stage].attempt for stage in later
                        if stage in latest and latest[stage].status in STAGE_CLAIMABLE}
            length = (job.request or {}).get("max_audio_length_ms")
        if attempts:
            _send_retry(ScheduledRetry(job_id, attempts, length))

    def _record_end_unless_superseded(self, url: str, job_id: str, attempt: int, status: str, exc: BaseException,
                                      ctx: StageContext, started: float) -> ScheduledRetry | None:
        try:
            return self._record_end(url, job_id, attempt, status, exc, ctx, started,
                                    with_traceback=status == StageStatus.FAILED)
        except StageSuperseded as lost:
            log.warning("%s; its %s (%s) is not recorded", lost, status, describe_error(exc)[0])
            return None

    def _hand_back(self, url: str, job_id: str, attempt: int, ctx: StageContext,
                   started: float) -> ScheduledRetry | None:
        """A clean worker stop: this attempt ends `lost` and a new one is queued now, not after a lease."""
        with session_scope(url) as session:
            job = session.get_one(Job, job_id)
            max_audio_length_ms = (job.request or {}).get("max_audio_length_ms")
            attempts = add_attempts(session, job, self.stage, requested_by=HAND_BACK_REQUESTER)
            written = rowcount(session.execute(update(StageRun).where(*ctx._held()).values(
                status=StageStatus.LOST, error_type=HANDED_BACK_ERROR, finished_at=db_now(),
                duration_s=time.monotonic() - started,
                error_message=(f"handed back: the worker stopped cleanly during {self.stage}; "
                               f"continued as attempt {attempts[self.stage]}"))
                .execution_options(synchronize_session=False)))
            if not written:
                session.rollback()
                log.warning("job %s stage %s attempt %s: not held at hand-back; left to the reconciler",
                            job_id, self.stage, attempt)
                return None
        log.info("job %s stage %s attempt %s handed back on a clean stop (new attempt %s)",
                 job_id, self.stage, attempt, attempts[self.stage])
        return ScheduledRetry(job_id, attempts, max_audio_length_ms)

    def _held_row(self, session: Session, ctx: StageContext) -> StageRun:
        row = session.scalar(select(StageRun).where(*ctx._held()))
        if row is None:
            ctx._superseded = True
            raise StageSuperseded(f"job {ctx.job_id} stage {self.stage} attempt {ctx.attempt} was superseded "
                                  "before its result could be recorded")
        return row

    def _record_success(self, url: str, job_id: str, attempt: int, outputs: BaseModel, ctx: StageContext,
                        started: float, recording: float) -> None:
        t0 = time.monotonic()
        payload = outputs.model_dump(mode="json")
        with session_scope(url) as session:
            row = self._held_row(session, ctx)
            finished = db_now()  # the database's clock, like every lease time (db/clock.py)
            environment = _end_environment(row, ctx)
            written = rowcount(session.execute(update(StageRun).where(*ctx._held()).values(
                status=StageStatus.SUCCEEDED, outputs=payload, artifacts=artifact_shas(payload), finished_at=finished,
                heartbeat_at=finished, duration_s=time.monotonic() - started, environment=environment,
                recording_s=recording + (time.monotonic() - t0))
                .execution_options(synchronize_session=False)))
            if not written:  # superseded between the read and the write: this result must not count
                ctx._superseded = True
                raise StageSuperseded(f"job {job_id} stage {self.stage} attempt {attempt} was superseded")
            if self.stage == STAGES[-1]:
                job = session.get_one(Job, job_id)
                job.status = JobStatus.SUCCEEDED
                job.finished_at = finished

    def _record_end(self, url: str, job_id: str, attempt: int, status: str, exc: BaseException,
                    ctx: StageContext, started: float, *, with_traceback: bool) -> ScheduledRetry | None:
        """Record a failed or cancelled attempt; a first transient failure schedules one new attempt."""
        error_type, message = describe_error(exc)
        if isinstance(exc, SoftTimeLimitExceeded):
            message = f"stage {self.stage} exceeded its soft time limit"
        trace = "".join(traceback_module.format_exception(exc)) if with_traceback else None
        retry: ScheduledRetry | None = None
        with session_scope(url) as session:
            row = self._held_row(session, ctx)
            job = session.get_one(Job, job_id)
            if status == StageStatus.FAILED and is_transient(exc) and not job.cancel_requested:
                retry = self._schedule_transient_retry(session, job)
                if retry is not None:
                    message = (f"{message} [transient: retried once as attempt {retry.attempts[self.stage]} "
                               "on a fresh worker process]")
            values: dict[str, Any] = dict(
                status=status, error_type=error_type, error_message=message, traceback=trace, finished_at=db_now(),
                duration_s=time.monotonic() - started,
                environment=_end_environment(row, ctx))
            exchanges = getattr(exc, "llm_exchanges", None)
            if exchanges:  # a failed LLM backend's raw requests and answers are evidence too
                values["outputs"] = {"llm_exchanges": [e.model_dump(mode="json") if hasattr(e, "model_dump") else e
                                                       for e in exchanges]}
            written = rowcount(session.execute(update(StageRun).where(*ctx._held()).values(**values)
                                               .execution_options(synchronize_session=False)))
            if not written:
                ctx._superseded = True
                raise StageSuperseded(f"job {job_id} stage {self.stage} attempt {attempt} was superseded")
            if retry is not None:
                return retry  # the job goes on with the new attempt
            # A job that already ended (the stage a streaming decode followed failed) keeps its end; a follower
            # cancelled while the stage it follows still runs leaves the ending to that stage (it stops too).
            if job.status in JOB_ACTIVE and not (status == StageStatus.CANCELLED and self._earlier_running(session, job_id)):
                end_job(session, job, status, self.stage, error_type, message, values["finished_at"])
        return retry

    def _earlier_running(self, session: Session, job_id: str) -> bool:
        """An earlier stage of the job still runs (this stage followed it: a streaming decode)."""
        earlier = STAGES[:STAGES.index(self.stage)]
        return bool(earlier) and (session.scalar(select(func.count()).select_from(StageRun).where(
            StageRun.job_id == job_id, StageRun.stage.in_(earlier), StageRun.status == StageStatus.RUNNING)) or 0) > 0

    def _schedule_transient_retry(self, session: Session, job: Job) -> ScheduledRetry | None:
        earlier = session.scalar(select(func.count()).select_from(StageRun).where(
            StageRun.job_id == job.id, StageRun.stage == self.stage,
            StageRun.requested_by == TRANSIENT_RETRY_REQUESTER)) or 0
        if earlier >= TRANSIENT_RETRIES:
            return None
        attempts = add_attempts(session, job, self.stage, requested_by=TRANSIENT_RETRY_REQUESTER,
                                supersede_reason=None)
        return ScheduledRetry(job.id, attempts, (job.request or {}).get("max_audio_length_ms"))


def _send_retry(retry: ScheduledRetry) -> None:
    try:
        pipeline_chain.send_chain(retry.job_id, retry.attempts, retry.max_audio_length_ms)
    except Exception:  # the rows are queued in SQL: the reconciler sends them when the broker is back
        log.exception("could not send the transient retry of job %s; the reconciler will", retry.job_id)


Admission = Callable[[Any], bool]


def waits_in_broker(admit: Admission | None, runner: StageRunner, request: Any, job_id: str, attempt: int,
                    settings: Settings | None = None) -> bool:
    """A delivery this process does not admit now goes back to the broker, but only while its attempt can
    still be claimed: one for a cancelled job goes on to the claim, which notes it and drops it."""
    return admit is not None and not admit(request) and runner.claimable(job_id, attempt, settings)


def stage_task(stage: str, resolve: Resolver, compute: Compute,
               on_failure: Callable[[BaseException, StageContext], None] | None = None,
               admit: Admission | None = None, admission_retry_s: float = 1.0) -> Task:
    """Register the Celery task for a stage; its body is the StageRunner, nothing else.

    `admit(request)`: whether this process takes the delivery now; if not, the message goes back to the
    broker for `admission_retry_s` (a retry before the claim: the attempt's row stays queued, unchanged),
    unless the attempt can no longer be claimed (its job was cancelled meanwhile): then it goes to the
    claim, which records the skipped delivery and drops it."""
    runner = StageRunner(stage, resolve, compute, on_failure)

    @app.task(name=task_name(stage), bind=True, acks_late=True, reject_on_worker_lost=True)
    def _task(self: Task, job_id: str, attempt: int, continue_chain: bool = False) -> None:
        if waits_in_broker(admit, runner, self.request, job_id, attempt):
            raise self.retry(countdown=admission_retry_s, max_retries=None)
        runner.run(job_id, attempt, celery_task_id=self.request.id, continue_chain=continue_chain)

    _task.runner = runner  # type: ignore[attr-defined]
    return _task
