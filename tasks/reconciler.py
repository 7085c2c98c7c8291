"""The reconciler: SQL is the source of truth, the broker is only transport.

Every accepted job has its stage rows in SQL before any message exists. One pass looks at every
active job (queued or running), finds its frontier - the first stage whose latest attempt has not
succeeded - and checks that something is really moving it:

- frontier RUNNING: its heartbeat (written every `heartbeat_s` by a thread in the worker) must be
  younger than the lease (12 heartbeats). Otherwise the worker is gone (SIGKILL, OOM killer, host
  loss, hard time limit). The attempt is marked "lost" and a NEW attempt of that stage and of every
  later stage is added and sent - unless the job was asked to cancel (-> cancelled), the attempt ran
  for its whole hard time limit (-> failed, TimeLimitExceeded, no retry), or this stage already lost
  its worker MAX_WORKER_LOSSES times (-> failed, WorkerLost: a crash that repeats is not retried in a loop).
- frontier QUEUED: its message must exist. After a grace period (the lease; it covers the moment
  between the SQL commit and the send, and a message popped by a worker but not yet claimed) the
  row must be visible in the broker: in a queue list or in the unacknowledged set that holds every
  message a worker has reserved or is running (kombu's Redis `unacked` hash). Absent in two
  looks a second apart, the message is gone (Redis restarted empty, a send that failed, a worker
  that died between committing its result and sending the next stage): the attempt is marked
  "lost" and re-sent as a new attempt. This also covers "stage succeeded but the next message was
  never sent": the next stage is the frontier, queued, and its message is nowhere.

A stage that succeeded is never re-run: only the frontier and the stages after it get new attempts.
Every change is a conditional UPDATE on the row's observed state, so a worker that claims the row
meanwhile, or a second reconciler, wins or loses cleanly; an old message that turns up later finds
its attempt "lost" and backs off at the claim (tasks/recording.py).
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from db.clock import as_utc, database_now
from db.engine import rowcount, session_scope
from db.models import JOB_ACTIVE, STAGE_CLAIMABLE, Job, JobStatus, StageRun, StageStatus
from tasks.celery_app import CPU_QUEUE, GPU_QUEUE, task_name
from tasks.contracts import STAGES
from tasks.pipeline import chain as pipeline_chain
from tasks.pipeline.attempts import add_attempts, end_job, end_waiting_cancelled_job, frontier, latest_runs
from tasks.recording import lease_s
from tasks.settings import Settings
from tasks.time_limits import following_limits, stage_limits

log = logging.getLogger(__name__)

LOST = StageStatus.LOST  # an attempt whose worker or message vanished; a newer attempt replaces it
WORKER_LOST, MESSAGE_LOST = "WorkerLost", "MessageLost"
MAX_WORKER_LOSSES = 3  # the third loss of the same stage fails the job instead of resending again
MAX_MESSAGE_LOSSES = 5
TIME_LIMIT_SLACK_S = 5.0
CONFIRM_DELAY_S = 1.0
ACTIVE = JOB_ACTIVE
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's Redis priority lists
UNACKED_KEY = "unacked"

MessageKey = tuple[str, str, int]  # (task name, job id, attempt)
BrokerView = Callable[[], set[MessageKey]]
Sender = Callable[[str, dict[str, int], int | None], None]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one pass did to one job, for the log and for tests."""

    job_id: str
    stage: str
    attempt: int
    action: str  # "resent", "failed", "cancelled", "succeeded"
    reason: str
    new_attempts: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Candidate:
    job_id: str
    row_id: int
    stage: str
    attempt: int
    kind: str  # "stale" (running, no heartbeat) or "unsent" (queued, message not seen)
    observed: str


# -- the broker side ---------------------------------------------------------------------------

def _redis_client(redis_url: str):
    import redis

    return redis.Redis.from_url(redis_url.replace("redis+socket://", "unix://"), socket_timeout=5,
                                socket_connect_timeout=5)


def _message_key(payload: dict[str, Any]) -> MessageKey | None:
    """(task, job id, attempt) of one kombu message as stored in Redis, or None for anything else."""
    try:
        headers = payload.get("headers") or {}
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(headers["task"]), str(args[0]), int(args[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def redis_broker_view(redis_url: str, queues: Iterable[str] = (CPU_QUEUE, GPU_QUEUE)) -> set[MessageKey]:
    """Every stage message the broker holds: waiting in a queue, or delivered and not yet acknowledged."""
    client = _redis_client(redis_url)
    try:
        raw: list[dict[str, Any]] = []
        for queue in queues:
            for suffix in PRIORITY_SUFFIXES:
                raw.extend(json.loads(item) for item in client.lrange(f"{queue}{suffix}", 0, -1))
        for item in client.hvals(UNACKED_KEY):
            raw.append(json.loads(item)[0])
    finally:
        client.close()
    return {key for key in map(_message_key, raw) if key is not None}


def _default_sender(job_id: str, attempts: dict[str, int], max_audio_length_ms: int | None) -> None:
    pipeline_chain.send_chain(job_id, attempts, max_audio_length_ms)


# -- one pass ----------------------------------------------------------------------------------

def find_candidates(session: Session, settings: Settings, now: dt.datetime) -> tuple[list[_Candidate], list[str]]:
    """Frontier rows that look stuck, and active jobs whose every stage is already done."""
    lease = dt.timedelta(seconds=lease_s(settings))
    rows = session.scalars(select(StageRun).join(Job, Job.id == StageRun.job_id).where(Job.status.in_(ACTIVE)))
    by_job: dict[str, list[StageRun]] = {}
    for run in rows:
        by_job.setdefault(run.job_id, []).append(run)
    candidates: list[_Candidate] = []
    finished: list[str] = []
    for job_id, job_rows in by_job.items():
        row, previous = frontier(latest_runs(job_rows))
        if row is None:
            if previous is not None and previous.stage == STAGES[-1]:
                finished.append(job_id)
            continue
        if row.status == StageStatus.RUNNING:
            seen = as_utc(row.heartbeat_at or row.started_at)
            if seen is None or now - seen > lease:
                candidates.append(_Candidate(job_id, row.id, row.stage, row.attempt, "stale", row.status))
        elif row.status in STAGE_CLAIMABLE:
            since = max(t for t in (as_utc(row.queued_at), as_utc(previous.finished_at) if previous else None) if t)
            if now - since > lease:
                candidates.append(_Candidate(job_id, row.id, row.stage, row.attempt, "unsent", row.status))
    return candidates, finished


def _losses(session: Session, job_id: str, stage: str, error_type: str) -> int:
    return session.scalar(select(func.count()).select_from(StageRun).where(
        StageRun.job_id == job_id, StageRun.stage == stage, StageRun.status == LOST,
        StageRun.error_type == error_type)) or 0


def _settle(session: Session, settings: Settings, cand: _Candidate, now: dt.datetime) -> Decision | None:
    """Apply the rule to one candidate inside one transaction; None when the row moved meanwhile."""
    job = session.get(Job, cand.job_id)
    row = session.get(StageRun, cand.row_id)
    if job is None or row is None or job.status not in ACTIVE:
        return None
    cutoff = now - dt.timedelta(seconds=lease_s(settings))
    if cand.kind == "stale":
        guard: tuple[ColumnElement[bool], ...] = (StageRun.status == StageStatus.RUNNING,
                 or_(StageRun.heartbeat_at.is_(None), StageRun.heartbeat_at < cutoff))
        seen = as_utc(row.heartbeat_at or row.started_at) or now
        ran_s = (seen - (as_utc(row.started_at) or seen)).total_seconds()
        length = (job.request or {}).get("max_audio_length_ms")
        # a decode that followed its token stage (streaming) has lived through both stages' budgets
        follows = bool((row.inputs or {}).get("follow"))
        hard_s = (following_limits(row.stage, STAGES[STAGES.index(row.stage) - 1], length, settings) if follows
                  else stage_limits(row.stage, length, settings)).hard_s
        progress = row.progress or {}
        where = (f"worker {row.worker_hostname} pid {row.worker_pid}, no heartbeat for "
                 f"{(now - seen).total_seconds():.0f} s"
                 + (f", last progress {progress.get('done')}/{progress.get('total')} {progress.get('unit')}"
                    if progress else ""))
        error_type, losses, limit = WORKER_LOST, _losses(session, job.id, row.stage, WORKER_LOST), MAX_WORKER_LOSSES
        if ran_s >= hard_s - TIME_LIMIT_SLACK_S:
            error_type = "TimeLimitExceeded"
    else:
        guard = (StageRun.status.in_(STAGE_CLAIMABLE),)
        where = f"no message for this attempt in the broker queues or unacknowledged set ({cand.observed})"
        error_type, losses, limit = MESSAGE_LOST, _losses(session, job.id, row.stage, MESSAGE_LOST), MAX_MESSAGE_LOSSES

    if job.cancel_requested:
        status, action, message = StageStatus.CANCELLED, "cancelled", f"cancelled; its {row.stage} attempt was lost ({where})"
    elif error_type == "TimeLimitExceeded":
        status, action = StageStatus.FAILED, "failed"
        message = f"stage {row.stage} ran for its whole hard time limit ({hard_s} s) and was killed ({where})"
    elif losses + 1 >= limit:
        status, action = StageStatus.FAILED, "failed"
        message = (f"stage {row.stage} was lost {losses + 1} times ({error_type}); not retried again. "
                   f"Last: {where}")
    else:
        status, action = LOST, "resent"
        message = f"{error_type}: {where}; superseded by a new attempt"
    changed = rowcount(session.execute(update(StageRun).where(StageRun.id == row.id, *guard).values(
        status=status, error_type=error_type if status != StageStatus.CANCELLED else None, error_message=message,
        finished_at=now).execution_options(synchronize_session=False)))
    if not changed:
        return None  # a worker claimed it, or its heartbeat came back: nothing is stuck
    if status != LOST:
        end_job(session, job, status, row.stage, error_type, message, now)
        return Decision(job.id, row.stage, row.attempt, action, message)
    attempts = add_attempts(session, job, row.stage, requested_by=f"reconciler:{error_type}")
    return Decision(job.id, row.stage, row.attempt, action, message, attempts)


def reconcile_once(settings: Settings, *, broker_view: BrokerView | None = None, sender: Sender | None = None,
                   now: dt.datetime | None = None, confirm_delay_s: float = CONFIRM_DELAY_S) -> list[Decision]:
    """One pass over the active jobs; returns what it changed. Callable from tests with stubs."""
    url = settings.resolved_database_url
    if broker_view is None:
        if not settings.redis_url:
            raise RuntimeError("the reconciler needs REDIS_URL to look into the broker")
        broker_view = lambda: redis_broker_view(settings.redis_url)  # noqa: E731
    sender = _default_sender if sender is None else sender
    if now is None:  # the database's clock: heartbeats were written with it too (db/clock.py)
        with session_scope(url) as session:
            now = database_now(session)
    cancelled: list[Decision] = []
    with session_scope(url) as session:
        # a cancel asked while a stage ran (or raced a claim) ends here once no stage holds the job
        for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE), Job.cancel_requested)).all():
            row = end_waiting_cancelled_job(session, job, now)
            if row is not None:
                cancelled.append(Decision(job.id, row.stage, row.attempt, "cancelled",
                                          "cancel requested and no stage was running"))
    with session_scope(url) as session:
        candidates, finished = find_candidates(session, settings, now)
        for job_id in finished:  # every stage done yet the job still active: only the status is missing
            session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                            .values(status=JobStatus.SUCCEEDED, finished_at=now))
    unsent = [c for c in candidates if c.kind == "unsent"]
    if unsent:
        try:
            present = broker_view()
            unsent = [c for c in unsent if (task_name(c.stage), c.job_id, c.attempt) not in present]
            if unsent and confirm_delay_s > 0:  # a message between BRPOP and the unacked hash is in neither
                time.sleep(confirm_delay_s)
                present = broker_view()
                unsent = [c for c in unsent if (task_name(c.stage), c.job_id, c.attempt) not in present]
        except Exception as exc:  # broker down: nothing can be re-sent now, and absence proves nothing
            log.warning("reconciler: cannot look into the broker (%s); queued rows are checked next pass", exc)
            unsent = []
    decisions: list[Decision] = cancelled + [Decision(job_id, STAGES[-1], 0, "succeeded", "every stage had succeeded")
                                             for job_id in finished]
    for cand in [c for c in candidates if c.kind == "stale"] + unsent:
        with session_scope(url) as session:
            decision = _settle(session, settings, cand, now)
            length = None
            if decision is not None:
                length = (session.get_one(Job, cand.job_id).request or {}).get("max_audio_length_ms")
        if decision is None:
            continue
        decisions.append(decision)
        log.warning("reconciler: job %s %s attempt %s -> %s: %s", decision.job_id, decision.stage, decision.attempt,
                    decision.action, decision.reason)
        if decision.new_attempts:
            try:
                sender(decision.job_id, decision.new_attempts, length)
            except Exception as exc:  # rows stay queued in SQL; a later pass re-sends them
                log.warning("reconciler: could not send job %s (%s); will retry", decision.job_id, exc)
    return decisions


def run_forever(settings: Settings, *, interval_s: float | None = None, stop: threading.Event | None = None,
                echo: Callable[[str], None] | None = None) -> None:
    """The reconcile loop of the `reconcile` Procfile process; `stop` ends it (tests, signals)."""
    stop = stop or threading.Event()
    interval = interval_s if interval_s is not None else max(2 * settings.heartbeat_s, 0.2)
    while not stop.is_set():
        try:
            for decision in reconcile_once(settings):
                if echo is not None:
                    echo(f"job {decision.job_id} {decision.stage} #{decision.attempt}: {decision.action} - "
                         f"{decision.reason}" + (f" -> attempts {decision.new_attempts}" if decision.new_attempts else ""))
        except Exception:
            log.exception("reconciler pass failed; trying again in %.1f s", interval)
        stop.wait(interval)
