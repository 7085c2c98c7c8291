"""The stats page, over one window chosen on the page: jobs over time, failures by stage and error
type, run time and queue wait percentiles per stage, and submission-to-audio time (what a user waits).

Percentiles are computed in Python over a bounded window (SQLite has no percentile function), so
the same code serves SQLite and PostgreSQL and the cost is capped by MAX_DURATION_SAMPLES.
"""
from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, StageRun, StageStatus, utcnow
from db.status import STAGE_DONE
from tasks.contracts import STAGES

MAX_DURATION_SAMPLES = 20_000  # newest succeeded attempts considered per stage
WINDOWS_H = (24, 24 * 7, 24 * 30)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


BUCKETS = 24  # bars in the jobs-over-time chart, whatever the window


def jobs_over_time(session: Session, now: dt.datetime, hours: int) -> list[dict[str, Any]]:
    """Jobs created per bucket of hours/BUCKETS hours, by status, over the window."""
    width = dt.timedelta(hours=hours / BUCKETS)
    end = now.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    start = end - width * BUCKETS
    buckets: list[dict[str, int]] = [{} for _ in range(BUCKETS)]
    rows = session.execute(select(Job.created_at, Job.status).where(Job.created_at >= start))
    for created_at, status in rows:
        index = int((_as_utc(created_at) - start) / width)
        if 0 <= index < BUCKETS:
            buckets[index][status] = buckets[index].get(status, 0) + 1
    return [{"start": start + width * i, "total": sum(counts.values()), "counts": counts}
            for i, counts in enumerate(buckets)]


def _summary(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": values[-1] if values else None}


def queue_waits(session: Session, since: dt.datetime) -> list[dict[str, Any]]:
    """Seconds from queued to started, per stage, over attempts that started in the window."""
    out = []
    for stage in STAGES:
        rows = session.execute(
            select(StageRun.queued_at, StageRun.started_at).where(
                StageRun.stage == stage, StageRun.started_at >= since, StageRun.queued_at.is_not(None))
            .order_by(StageRun.started_at.desc()).limit(MAX_DURATION_SAMPLES))
        waits = [max(0.0, (_as_utc(started) - _as_utc(queued)).total_seconds()) for queued, started in rows
                 if queued is not None and started is not None]  # both are, by the query
        out.append({"stage": stage, **_summary(waits)})
    return out


def submission_to_audio(session: Session, since: dt.datetime) -> dict[str, Any]:
    """Seconds from a job's submission to its encoded audio, over jobs that succeeded in the window."""
    rows = session.execute(
        select(Job.created_at, func.max(StageRun.finished_at)).join(StageRun, StageRun.job_id == Job.id)
        .where(Job.status == JobStatus.SUCCEEDED, Job.created_at >= since, StageRun.stage == "encode_audio",
               StageRun.status.in_(STAGE_DONE))
        .group_by(Job.id, Job.created_at).limit(MAX_DURATION_SAMPLES))
    return _summary([(_as_utc(done) - _as_utc(created)).total_seconds() for created, done in rows if done])


def failures(session: Session, since: dt.datetime) -> list[dict[str, Any]]:
    stmt = (select(Job.failed_stage, Job.error_type, func.count(), func.max(Job.created_at))
            .where(Job.status == JobStatus.FAILED, Job.created_at >= since)
            .group_by(Job.failed_stage, Job.error_type).order_by(func.count().desc()))
    return [{"stage": stage, "error_type": error_type, "count": count, "last": last}
            for stage, error_type, count, last in session.execute(stmt)]


def stage_durations(session: Session, since: dt.datetime) -> list[dict[str, Any]]:
    out = []
    for stage in STAGES:
        values = sorted(v for (v,) in session.execute(
            select(StageRun.duration_s).where(StageRun.stage == stage, StageRun.status == StageStatus.SUCCEEDED,
                                              StageRun.finished_at >= since, StageRun.duration_s.is_not(None))
            .order_by(StageRun.finished_at.desc()).limit(MAX_DURATION_SAMPLES)) if v is not None)
        out.append({"stage": stage, "count": len(values), "p50": percentile(values, 50),
                    "p95": percentile(values, 95), "max": values[-1] if values else None})
    return out


def stats_overview(session: Session, window_hours: int = 24 * 7, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything on the page, all over the same window."""
    now = now or utcnow()
    since = now - dt.timedelta(hours=window_hours)
    over_time = jobs_over_time(session, now, window_hours)
    return {"now": now, "window_hours": window_hours, "since": since, "over_time": over_time,
            "bucket_hours": window_hours / BUCKETS, "over_time_max": max([b["total"] for b in over_time] + [1]),
            "failures": failures(session, since), "durations": stage_durations(session, since),
            "queue_waits": queue_waits(session, since), "submission_to_audio": submission_to_audio(session, since)}
