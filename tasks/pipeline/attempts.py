"""Attempt bookkeeping: which attempt of each stage counts, and adding new attempts.

One home for "the latest attempt per stage" (the job page, the reconciler, replay, compare, the
stage inputs and the admin pages all ask it) and for the rows a retry, a re-send or a transient
retry adds. An older attempt that never started is marked superseded when a newer one replaces it,
so no row waits forever in `queued` (docs/state-machine.md).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.clock import db_now
from db.engine import rowcount
from db.models import STAGE_CLAIMABLE, STAGE_DONE, STAGE_PENDING, Job, JobStatus, StageRun, StageStatus
from db.status import STAGE_RESUMABLE
from tasks.celery_app import queue_for
from tasks.contracts import STAGES


def latest_runs(rows: Iterable[StageRun]) -> dict[str, StageRun]:
    """Per stage, the row with the highest attempt number among `rows`."""
    latest: dict[str, StageRun] = {}
    for row in rows:
        if row.stage not in latest or row.attempt > latest[row.stage].attempt:
            latest[row.stage] = row
    return latest


def latest_by_stage(session: Session, job_id: str) -> dict[str, StageRun]:
    """Per stage of the job, its latest attempt (whatever its status)."""
    return latest_runs(session.scalars(select(StageRun).where(StageRun.job_id == job_id)))


def latest_done(session: Session, job_id: str, stage: str | None = None) -> dict[str, StageRun]:
    """Per stage, the latest attempt that succeeded or was reused: the outputs downstream stages read."""
    query = select(StageRun).where(StageRun.job_id == job_id, StageRun.status.in_(STAGE_DONE))
    if stage is not None:
        query = query.where(StageRun.stage == stage)
    return latest_runs(session.scalars(query))


def representative_runs(rows: Iterable[StageRun]) -> dict[str, StageRun]:
    """Per stage: the latest done attempt if there is one, else the latest attempt of any status."""
    rows = list(rows)
    chosen = latest_runs(rows)
    chosen.update(latest_runs(row for row in rows if row.status in STAGE_DONE))
    return chosen


def frontier(latest: dict[str, StageRun]) -> tuple[StageRun | None, StageRun | None]:
    """(latest attempt of the first stage not done, latest attempt of the stage before it)."""
    previous = None
    for stage in STAGES:
        row = latest.get(stage)
        if row is None:
            return None, previous
        if row.status not in STAGE_DONE:
            return row, previous
        previous = row
    return None, previous


def next_attempt_numbers(session: Session, job_id: str, stages: Iterable[str]) -> dict[str, int]:
    highest = dict(session.execute(select(StageRun.stage, func.max(StageRun.attempt))
                                   .where(StageRun.job_id == job_id).group_by(StageRun.stage)).all())
    return {stage: int(highest.get(stage) or 0) + 1 for stage in stages}


def supersede_unstarted(session: Session, job_id: str, stages: Iterable[str], reason: str) -> int:
    """Older attempts of `stages` that never started (still claimable) become superseded."""
    return rowcount(session.execute(
        update(StageRun).where(StageRun.job_id == job_id, StageRun.stage.in_(list(stages)),
                               StageRun.status.in_(STAGE_CLAIMABLE))
        .values(status=StageStatus.SUPERSEDED, error_message=reason, finished_at=db_now())
        .execution_options(synchronize_session=False)))


def supersede_followers(session: Session, job_id: str, stages: Iterable[str], reason: str) -> int:
    """Running attempts of `stages` become superseded: a decode that followed its token stage while it ran
    (docs/streaming.md) stops at its next heartbeat when that token stage is re-run, and the new attempt
    of the decode follows the new token attempt."""
    return rowcount(session.execute(
        update(StageRun).where(StageRun.job_id == job_id, StageRun.stage.in_(list(stages)),
                               StageRun.status == StageStatus.RUNNING)
        .values(status=StageStatus.SUPERSEDED, error_message=reason, finished_at=db_now())
        .execution_options(synchronize_session=False)))


def add_attempts(session: Session, job: Job | str, from_stage: str, *, requested_by: str,
                 supersede_reason: str | None = None) -> dict[str, int]:
    """Queued rows for a new attempt (highest + 1) of `from_stage` and every stage after it.

    Stages before `from_stage` keep their succeeded rows, which the new attempts read. Unstarted
    older attempts of the re-run stages are superseded in the same transaction. The caller commits,
    then sends the chain for the returned attempts.
    """
    job_id = job if isinstance(job, str) else job.id
    rerun = STAGES[STAGES.index(from_stage):]
    attempts = next_attempt_numbers(session, job_id, rerun)
    supersede_unstarted(session, job_id, rerun, supersede_reason or f"replaced by a newer attempt ({requested_by})")
    supersede_followers(session, job_id, rerun[1:], f"stopped: the {from_stage} it followed was re-run ({requested_by})")
    for stage in rerun:
        session.add(StageRun(job_id=job_id, stage=stage, attempt=attempts[stage], status=StageStatus.QUEUED,
                             queue=queue_for(stage), requested_by=requested_by))
    session.flush()
    return attempts


def skip_unstarted(session: Session, job_id: str, reason: str) -> int:
    """Every unstarted row of an ending job becomes skipped (written with the job's terminal status)."""
    return rowcount(session.execute(
        update(StageRun).where(StageRun.job_id == job_id, StageRun.status.in_(STAGE_CLAIMABLE))
        .values(status=StageStatus.SKIPPED, error_message=reason, finished_at=db_now())
        .execution_options(synchronize_session=False)))


def end_job(session: Session, job: Job, status: JobStatus | str, stage: str, error_type: str | None, message: str,
            finished_at: Any) -> None:
    """End a job because `stage` failed or was cancelled; its unstarted rows become skipped, same transaction.

    Used by the stage runtime, the reconciler and cancel: a finished job never keeps a queued row.
    """
    job.status = JobStatus(status)
    job.finished_at = finished_at
    if job.status == JobStatus.FAILED:
        job.failed_stage, job.error_type, job.error_message = stage, error_type, message
        reason = f"never ran: stage {stage} failed ({error_type})"
    else:
        job.cancel_reason = job.cancel_reason or message
        reason = "never ran: the job was cancelled"
    skip_unstarted(session, job.id, reason)


def end_waiting_cancelled_job(session: Session, job: Job, now: dt.datetime) -> StageRun | None:
    """A cancel-requested job whose frontier waits in the queue ends now: that row cancelled (only while
    still claimable: a worker that claimed it first wins, and then the cooperative flag stops it), later
    rows skipped, the job cancelled - one transaction. Returns the cancelled row, or None."""
    row, _ = frontier(latest_by_stage(session, job.id))
    if row is None or row.status not in STAGE_CLAIMABLE:
        return None
    changed = rowcount(session.execute(
        update(StageRun).where(StageRun.id == row.id, StageRun.status.in_(STAGE_CLAIMABLE))
        .values(status=StageStatus.CANCELLED, finished_at=now,
                error_message=f"cancelled before it started: {job.cancel_reason or 'cancel requested'}")
        .execution_options(synchronize_session=False)))
    if not changed:
        return None
    end_job(session, job, JobStatus.CANCELLED, row.stage, None, job.cancel_reason or "cancelled", now)
    return row


def latest_checkpoint(session: Session, job_id: str, stage: str, before_attempt: int,
                      inputs: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The furthest resume point an earlier attempt of this stage recorded with these very inputs:
    (attempt, its `progress.checkpoint`), or None. Only attempts that ended lost or failed count."""
    rows = session.scalars(select(StageRun).where(
        StageRun.job_id == job_id, StageRun.stage == stage, StageRun.attempt < before_attempt,
        StageRun.status.in_(STAGE_RESUMABLE)))
    best: tuple[int, dict[str, Any]] | None = None
    for row in rows:
        point = (row.progress or {}).get("checkpoint")
        if not point or row.inputs != inputs:
            continue
        if best is None or int(point.get("done", 0)) > int(best[1].get("done", 0)):
            best = (row.attempt, point)
    return best


def pending_attempt(session: Session, job_id: str, stage: str) -> StageRun | None:
    """The newest attempt of `stage` when it is still queued or running (work owed), else None."""
    row = latest_by_stage(session, job_id).get(stage)
    return row if row is not None and row.status in STAGE_PENDING else None


@dataclass(frozen=True)
class FollowedProgress:
    """What a following stage sees of the stage before it (docs/streaming.md)."""

    job_status: str
    outputs: dict[str, Any] | None  # the latest done attempt's outputs, once there is one
    outputs_attempt: int | None
    checkpoint: dict[str, Any] | None  # the newest attempt's latest resume point
    checkpoint_attempt: int | None


def followed_progress(session: Session, job_id: str, stage: str) -> FollowedProgress:
    """The followed stage's finished outputs, or the newest attempt's latest checkpoint so far.

    Only the newest attempt's checkpoints count: an older attempt's frames may come from another engine
    shape (a retry that could not resume), and a re-run of the followed stage supersedes its follower
    anyway (`supersede_followers`). The follower still verifies every window against the finished grid."""
    job = session.get_one(Job, job_id)
    rows = list(session.scalars(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage)))
    done = latest_runs(row for row in rows if row.status in STAGE_DONE).get(stage)
    newest = latest_runs(rows).get(stage)
    point = (newest.progress or {}).get("checkpoint") if newest is not None else None
    return FollowedProgress(job_status=str(job.status), outputs=done.outputs if done is not None else None,
                            outputs_attempt=done.attempt if done is not None else None,
                            checkpoint=point or None, checkpoint_attempt=newest.attempt if point and newest else None)


