"""The stats page: jobs per hour, failures by stage and error type, duration percentiles per stage.

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
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def jobs_per_hour(session: Session, now: dt.datetime, hours: int = 24) -> list[dict[str, Any]]:
    start = (now - dt.timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    buckets: dict[dt.datetime, dict[str, int]] = {start + dt.timedelta(hours=i): {} for i in range(hours)}
    rows = session.execute(select(Job.created_at, Job.status).where(Job.created_at >= start))
    for created_at, status in rows:
        hour = _as_utc(created_at).replace(minute=0, second=0, microsecond=0)
        if hour in buckets:
            buckets[hour][status] = buckets[hour].get(status, 0) + 1
    return [{"hour": hour, "total": sum(counts.values()), "counts": counts} for hour, counts in buckets.items()]


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
            .order_by(StageRun.finished_at.desc()).limit(MAX_DURATION_SAMPLES)))
        out.append({"stage": stage, "count": len(values), "p50": percentile(values, 50),
                    "p95": percentile(values, 95), "max": values[-1] if values else None})
    return out


def stats_overview(session: Session, window_hours: int = 24 * 7, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    since = now - dt.timedelta(hours=window_hours)
    per_hour = jobs_per_hour(session, now)
    return {"now": now, "window_hours": window_hours, "since": since, "per_hour": per_hour,
            "per_hour_max": max([b["total"] for b in per_hour] + [1]),
            "failures": failures(session, since), "durations": stage_durations(session, since)}
