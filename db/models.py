"""SQL record of every job, every stage attempt and every artifact (SQLAlchemy 2.0 typed ORM).

A stage attempt is one row, never overwritten by a later attempt: retries add rows. Writes to a
row are idempotent upserts keyed by (job_id, stage, attempt), because Celery may deliver a task
or run an error callback twice.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.clock import db_now
from db.status import (  # noqa: F401
    JOB_ACTIVE,
    JOB_STATUSES,
    JOB_TERMINAL,
    STAGE_CLAIMABLE,
    STAGE_DONE,
    STAGE_ENDED,
    STAGE_PENDING,
    STAGE_STATUSES,
    JobStatus,
    StageStatus,
    sql_in,
)

JsonType = JSON().with_variant(JSONB(), "postgresql")


class StatusString(TypeDecorator):
    """A status column: binds enum members as their plain string value (drivers may dump enums by name)."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else str(value)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonType, list[Any]: JsonType}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex: unguessable
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(StatusString(), default=JobStatus.QUEUED)
    request: Mapped[dict[str, Any]] = mapped_column(JsonType)  # the validated submission, verbatim
    seed: Mapped[int] = mapped_column(BigInteger)
    seed_source: Mapped[str] = mapped_column(String(16))  # "user" or "drawn"
    pipeline: Mapped[str] = mapped_column(String(64))  # the one code path this job took
    code_version: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="api")  # form / api / cli / replay
    replay_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    replay_from_stage: Mapped[str | None] = mapped_column(String(32))
    replay_overrides: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    failed_stage: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(64))
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    client_id: Mapped[str | None] = mapped_column(String(64))
    # denormalised for the dashboard's text filter (lyrics/tags/style) without JSON scans
    search_text: Mapped[str] = mapped_column(Text, default="")

    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.id", cascade="all, delete-orphan")

    __table_args__ = (
        CheckConstraint(f"status IN ({sql_in(JOB_STATUSES)})", name="ck_jobs_status"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_replay_of", "replay_of"),
        # the dashboard: keyset pagination (newest first, ties by id); filter + status counts from one index
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_failed_stage_status_created_at", "failed_stage", "status", "created_at"),
        Index("ix_jobs_error_type_status_created_at", "error_type", "status", "created_at"),
    )


class StageRun(Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(StatusString(), default=StageStatus.QUEUED)
    queue: Mapped[str] = mapped_column(String(16))
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    artifacts: Mapped[list[Any] | None] = mapped_column(JsonType)  # sha256 list of produced artifacts
    reused_from: Mapped[int | None] = mapped_column(ForeignKey("stage_runs.id"))
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    worker_hostname: Mapped[str | None] = mapped_column(String(255))
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    queued_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=db_now())  # lease clock
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    recording_s: Mapped[float | None] = mapped_column(Float)  # time spent writing the record itself
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    environment: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)  # messages that reached a worker
    requested_by: Mapped[str | None] = mapped_column(String(64))  # who asked for this attempt (retry/replay)

    job: Mapped[Job] = relationship(back_populates="stage_runs")

    __table_args__ = (
        UniqueConstraint("job_id", "stage", "attempt", name="uq_stage_runs_job_stage_attempt"),
        CheckConstraint(f"status IN ({sql_in(STAGE_STATUSES)})", name="ck_stage_runs_status"),
        Index("ix_stage_runs_status", "status"),
        Index("ix_stage_runs_stage_status", "stage", "status"),
        Index("ix_stage_runs_error_type", "error_type"),
        Index("ix_stage_runs_finished_at", "finished_at"),
        # the workers page: latest record per worker host and queue
        Index("ix_stage_runs_worker_queue_id", "worker_hostname", "queue", "id"),
    )


class Artifact(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    media_type: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    location: Mapped[str] = mapped_column(Text)  # store-relative key, never a client-supplied path
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StreamWindow(Base):
    """One codec window decoded while its song was still being generated (docs/streaming.md).

    `pcm` is the artifact of the samples this window made final: 16-bit little-endian interleaved
    stereo, samples [sample_start, sample_end) of the song. The final WAV's data chunk is these
    artifacts concatenated in window order, so what a listener was streamed is what the record holds.
    A row names the decode attempt that wrote it; a new attempt never reads another attempt's rows.
    """

    __tablename__ = "stream_windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)  # the decode_audio attempt that decoded it
    window: Mapped[int] = mapped_column(Integer)
    frame_start: Mapped[int] = mapped_column(Integer)
    frame_end: Mapped[int] = mapped_column(Integer)  # exclusive
    tokens_sha256: Mapped[str] = mapped_column(String(64))  # of the [8, frames] int16 slice it was decoded from
    tokens_attempt: Mapped[int] = mapped_column(Integer)  # the generate_tokens attempt those frames came from
    pcm_sha256: Mapped[str] = mapped_column(String(64))
    sample_start: Mapped[int] = mapped_column(BigInteger)
    sample_end: Mapped[int] = mapped_column(BigInteger)  # exclusive
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    decode_s: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "window", name="uq_stream_windows_job_attempt_window"),
    )
