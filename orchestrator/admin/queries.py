"""The dashboard's reads: job list with filters and keyset pagination, one job's full record.

Every page is a fixed, small number of queries (no per-row queries): the list is one SELECT of the
page plus one GROUP BY for the status counts; a job's page loads its stage rows, the artifacts
they reference and its replay links in one query each.
"""
from __future__ import annotations

import base64
import datetime as dt
import heapq
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from db.models import JOB_STATUSES, Artifact, Job, StageRun, StreamWindow
from tasks.artifact_store import artifact_shas
from tasks.contracts import STAGES

PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE = 1_000_000
SORTS = {
    "created_desc": (Job.created_at, True),
    "created_asc": (Job.created_at, False),
    "updated_desc": (Job.updated_at, True),
    "finished_desc": (Job.finished_at, True),
}
LIST_COLUMNS = (Job.id, Job.created_at, Job.updated_at, Job.finished_at, Job.status, Job.seed, Job.source,
                Job.failed_stage, Job.error_type, Job.error_message, Job.replay_of, Job.request,
                Job.cancel_requested)


class BadFilter(ValueError):
    pass


@dataclass
class JobFilters:
    status: str | None = None
    failed_stage: str | None = None
    error_type: str | None = None
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None
    text: str | None = None
    sort: str = "created_desc"
    limit: int = DEFAULT_PAGE_SIZE
    cursor: str | None = None  # keyset position for created_* sorts
    page: int = 1  # offset pages for the other sorts

    @classmethod
    def from_args(cls, args) -> JobFilters:
        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()
            return value or None

        status, stage, sort = text("status"), text("stage"), text("sort") or "created_desc"
        if status is not None and status not in JOB_STATUSES:
            raise BadFilter(f"status must be one of {', '.join(JOB_STATUSES)}")
        if stage is not None and stage not in STAGES:
            raise BadFilter(f"stage must be one of {', '.join(STAGES)}")
        if sort not in SORTS:
            raise BadFilter(f"sort must be one of {', '.join(SORTS)}")
        limit = _whole_number(args, "limit", DEFAULT_PAGE_SIZE)
        if limit not in PAGE_SIZES:
            raise BadFilter(f"limit must be one of {', '.join(map(str, PAGE_SIZES))}")
        page = max(1, _whole_number(args, "page", 1))
        if page > MAX_PAGE:  # the SQL offset must stay a 64-bit integer
            raise BadFilter(f"page must be at most {MAX_PAGE}")
        return cls(status=status, failed_stage=stage, error_type=text("error_type"),
                   created_from=_parse_date(text("from"), "from"), created_to=_parse_date(text("to"), "to", end=True),
                   text=text("q"), sort=sort, limit=limit, cursor=text("cursor"), page=page)

    def query_args(self, **changes: Any) -> dict[str, Any]:
        """The URL parameters that reproduce these filters (for links: next page, status tabs)."""
        values = {"status": self.status, "stage": self.failed_stage, "error_type": self.error_type,
                  "from": self.created_from.date().isoformat() if self.created_from else None,
                  "to": (self.created_to - dt.timedelta(days=1)).date().isoformat() if self.created_to else None,
                  "q": self.text, "sort": self.sort if self.sort != "created_desc" else None,
                  "limit": self.limit if self.limit != DEFAULT_PAGE_SIZE else None}
        values.update(changes)
        return {k: v for k, v in values.items() if v not in (None, "")}


def _whole_number(args, name: str, default: int) -> int:
    raw = (args.get(name) or "").strip()
    try:
        return int(raw) if raw else default
    except ValueError as exc:
        raise BadFilter(f"{name} must be a whole number, got {raw!r}") from exc


def _parse_date(value: str | None, name: str, *, end: bool = False) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadFilter(f"{name} must be a date like 2026-01-31") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    if end and len(value) <= 10:  # a bare date means "through the end of that day"
        parsed += dt.timedelta(days=1)
    return parsed


def _like_escape(text: str) -> str:
    return text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _conditions(filters: JobFilters, *, with_status: bool) -> list:
    conditions = []
    if with_status and filters.status:
        conditions.append(Job.status == filters.status)
    if filters.failed_stage:
        conditions.append(Job.failed_stage == filters.failed_stage)
    if filters.error_type:
        conditions.append(Job.error_type == filters.error_type)
    if filters.created_from:
        conditions.append(Job.created_at >= filters.created_from)
    if filters.created_to:
        conditions.append(Job.created_at < filters.created_to)
    if filters.text:
        conditions.append(Job.search_text.like(f"%{_like_escape(filters.text)}%", escape="\\"))
    return conditions


def _encode_cursor(created_at: dt.datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        created_at = dt.datetime.fromisoformat(created)
    except (ValueError, TypeError) as exc:
        raise BadFilter("cursor is not valid; start again from the first page") from exc
    return created_at, str(job_id)


@dataclass
class JobPage:
    rows: list[dict[str, Any]]
    counts: dict[str, int]
    total: int
    next_cursor: str | None = None
    next_page: int | None = None


TEXT_SCAN_MAX_MATCHES = 5000


def list_jobs(session: Session, filters: JobFilters) -> JobPage:
    counts = status_counts(session, filters)
    matching = counts.get(filters.status, 0) if filters.status else sum(counts.values())
    page = JobPage(rows=[], counts=counts, total=sum(counts.values()))
    if matching == 0:
        return page
    if filters.text and matching <= TEXT_SCAN_MAX_MATCHES:
        rows, more = _page_from_matches(session, filters)
    else:
        rows, more = _page_in_sql(session, filters)
    page.rows = rows
    if more:
        if filters.sort.startswith("created_"):
            page.next_cursor = _encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
        else:
            page.next_page = filters.page + 1
    return page


def _page_in_sql(session: Session, filters: JobFilters) -> tuple[list[dict[str, Any]], bool]:
    column, descending = SORTS[filters.sort]
    stmt = select(*LIST_COLUMNS).where(*_conditions(filters, with_status=True))
    keyset = filters.sort.startswith("created_")
    if keyset and filters.cursor:
        created_at, job_id = _decode_cursor(filters.cursor)
        if descending:
            stmt = stmt.where(or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id)))
        else:
            stmt = stmt.where(or_(Job.created_at > created_at, and_(Job.created_at == created_at, Job.id > job_id)))
    order: tuple[ColumnElement[Any], ...] = (column.desc(), Job.id.desc()) if descending else (column.asc(), Job.id.asc())
    if column is Job.finished_at:
        order = (column.is_(None), *order)  # unfinished jobs last, on every database
    stmt = stmt.order_by(*order).limit(filters.limit + 1)
    if not keyset:
        stmt = stmt.offset((filters.page - 1) * filters.limit)
    rows = [dict(row._mapping) for row in session.execute(stmt)]
    return rows[: filters.limit], len(rows) > filters.limit


def _page_from_matches(session: Session, filters: JobFilters) -> tuple[list[dict[str, Any]], bool]:
    """Few jobs match a text filter: walking the created_at index would look up nearly every row
    (LIKE '%word%' can use no index) before finding a page, so read the sort key and id of the
    matches in one sequential scan, page them in Python, and load only the page's rows."""
    column, descending = SORTS[filters.sort]
    candidates: list[tuple[Any, str]] = [(value, job_id) for value, job_id in
                  session.execute(select(column, Job.id).where(*_conditions(filters, with_status=True)))]
    keyset = filters.sort.startswith("created_")
    if keyset and filters.cursor:
        created_at, cursor_id = _decode_cursor(filters.cursor)
        position = (_naive_utc(created_at), cursor_id)
        candidates = [c for c in candidates
                      if ((_naive_utc(c[0]), c[1]) < position if descending else (_naive_utc(c[0]), c[1]) > position)]
    offset = 0 if keyset else (filters.page - 1) * filters.limit

    def key(item: tuple) -> tuple:
        value = _naive_utc(item[0]) if isinstance(item[0], dt.datetime) else item[0]
        # unfinished (NULL finished_at) last in either direction, as in the SQL order
        return (value is not None, value or dt.datetime.min, item[1]) if descending else \
            (value is None, value or dt.datetime.min, item[1])

    pick = heapq.nlargest if descending else heapq.nsmallest
    chosen = pick(offset + filters.limit + 1, candidates, key=key)[offset:]
    more = len(chosen) > filters.limit
    ids = [job_id for _, job_id in chosen[: filters.limit]]
    by_id = {row.id: dict(row._mapping) for row in session.execute(select(*LIST_COLUMNS).where(Job.id.in_(ids)))} \
        if ids else {}
    return [by_id[job_id] for job_id in ids if job_id in by_id], more


def _naive_utc(value: dt.datetime) -> dt.datetime:
    """Comparable across SQLite (naive UTC) and PostgreSQL (aware) values."""
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def status_counts(session: Session, filters: JobFilters) -> dict[str, int]:
    """Jobs per status under every filter but the status itself, in one query."""
    conditions = _conditions(filters, with_status=False)
    counts = {status: 0 for status in JOB_STATUSES}
    if filters.text:
        # one row of FILTERed counts: the planner scans the table sequentially, where GROUP BY
        # would walk the status index with a random row lookup per job to test the LIKE
        stmt = select(*(func.count().filter(Job.status == status) for status in JOB_STATUSES)).where(*conditions)
        counts.update(zip(JOB_STATUSES, session.execute(stmt).one()))
    else:
        grouped = select(Job.status, func.count()).where(*conditions).group_by(Job.status)
        counts.update({status: count for status, count in session.execute(grouped)})
    return counts


def known_error_types(session: Session, limit: int = 50) -> list[str]:
    """Distinct error types for the filter's drop-down (walks the error_type index)."""
    stmt = select(Job.error_type).where(Job.error_type.is_not(None)).group_by(Job.error_type) \
        .order_by(Job.error_type).limit(limit)
    return [value for (value,) in session.execute(stmt) if value is not None]


# -- one job ----------------------------------------------------------------------------------

@dataclass
class JobRecord:
    job: Job
    runs: list[StageRun]
    artifacts: dict[str, Artifact]
    replays: list[dict[str, Any]]
    original: dict[str, Any] | None
    reused_sources: dict[int, dict[str, Any]]  # stage_run id -> {job_id, stage, attempt}
    windows: list[StreamWindow]  # codec windows decoded while the song was made, by decode attempt and window


def job_record(session: Session, job_id: str) -> JobRecord | None:
    job = session.get(Job, job_id)
    if job is None:
        return None
    runs = list(session.scalars(select(StageRun).where(StageRun.job_id == job_id)
                                .order_by(StageRun.id)))
    # inputs too: a failed attempt's input artifact (e.g. a bad token grid) is what one needs to see
    shas = sorted({sha for run in runs for sha in artifact_shas(run.outputs) + artifact_shas(run.inputs)})
    found = session.scalars(select(Artifact).where(Artifact.sha256.in_(shas))).all() if shas else []
    kind_order = {"tokens": 0, "wav": 1, "mp3": 2}
    artifacts = {a.sha256: a for a in sorted(found, key=lambda a: (kind_order.get(a.kind, 9), a.created_at, a.sha256))}
    replay_cols = (Job.id, Job.status, Job.created_at, Job.replay_from_stage, Job.replay_overrides, Job.seed)
    replays = [dict(r._mapping) for r in session.execute(
        select(*replay_cols).where(Job.replay_of == job_id).order_by(Job.created_at))]
    original = None
    if job.replay_of:
        row = session.execute(select(*replay_cols).where(Job.id == job.replay_of)).first()
        original = dict(row._mapping) if row else {"id": job.replay_of, "status": "missing"}
    source_ids = [run.reused_from for run in runs if run.reused_from]
    reused_sources = {}
    if source_ids:
        for rid, jid, stage, attempt in session.execute(
                select(StageRun.id, StageRun.job_id, StageRun.stage, StageRun.attempt)
                .where(StageRun.id.in_(source_ids))):
            reused_sources[rid] = {"job_id": jid, "stage": stage, "attempt": attempt}
    windows = list(session.scalars(select(StreamWindow).where(StreamWindow.job_id == job_id)
                                   .order_by(StreamWindow.attempt, StreamWindow.window)))
    return JobRecord(job, runs, artifacts, replays, original, reused_sources, windows)


def progress_snapshot(session: Session, job_id: str) -> dict[str, Any] | None:
    """What the job page polls while a job runs: its status and each attempt's status and progress."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        return None
    runs = session.execute(select(StageRun.id, StageRun.stage, StageRun.attempt, StageRun.status,
                                  StageRun.progress, StageRun.heartbeat_at)
                           .where(StageRun.job_id == job_id).order_by(StageRun.id))
    return {"job_id": job_id, "status": status, "runs": [
        {"id": r.id, "stage": r.stage, "attempt": r.attempt, "status": r.status, "progress": r.progress,
         "heartbeat_at": r.heartbeat_at.isoformat() if r.heartbeat_at else None} for r in runs]}
