"""The pipeline's state machine vocabulary: one home for every job and stage status and their sets.

Values are the strings stored in SQL and shown by the API, so they never change spelling. The
database enforces them with CHECK constraints (migration 0003); docs/state-machine.md draws the
transitions and says who writes each one.
"""
from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StageStatus(enum.StrEnum):
    QUEUED = "queued"  # written, waiting for its message to be claimed
    RUNNING = "running"  # claimed by one worker process, which holds it (heartbeat lease)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # its worker or its message vanished; a newer attempt replaces it (the reconciler)
    # a newer attempt of the same stage replaced it (retry, replay) before it ran, or while it followed a
    # stage that was re-run (a streaming decode, docs/streaming.md)
    SUPERSEDED = "superseded"
    SKIPPED = "skipped"  # will never run: an earlier stage of its job failed or the job was cancelled
    REUSED = "reused"  # copied from another job's succeeded attempt (re-run as a new job)


JOB_STATUSES: tuple[str, ...] = tuple(JobStatus)
STAGE_STATUSES: tuple[str, ...] = tuple(StageStatus)

# jobs
JOB_ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
JOB_TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# stage attempts
STAGE_CLAIMABLE: frozenset[StageStatus] = frozenset({StageStatus.QUEUED})  # a worker may start it; else back off
STAGE_DONE: frozenset[StageStatus] = frozenset({StageStatus.SUCCEEDED, StageStatus.REUSED})  # outputs downstream reads
STAGE_ENDED: frozenset[StageStatus] = frozenset(set(StageStatus) - {StageStatus.QUEUED, StageStatus.RUNNING})
STAGE_PENDING: frozenset[StageStatus] = frozenset({StageStatus.QUEUED, StageStatus.RUNNING})  # work still owed
# an attempt that ended this way may leave a resume point for the next attempt of its stage
STAGE_RESUMABLE: frozenset[StageStatus] = frozenset({StageStatus.LOST, StageStatus.FAILED})


def sql_in(values: frozenset[str] | tuple[str, ...]) -> str:
    """`'a', 'b'` for a CHECK constraint (sorted, so the DDL is stable)."""
    return ", ".join(f"'{value}'" for value in sorted(values))
