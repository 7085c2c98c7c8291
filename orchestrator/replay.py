"""Replay from stored inputs: the two verbs of design.md section 3.

- `retry`: the same job gets a NEW attempt (max + 1) of the failed stage (or a chosen one) and of
  every stage after it. Earlier stages' recorded outputs are reused as they are, after checking
  that every artifact they reference is in the store and still hashes to its sha256.
- `rerun_as_new`: a new job linked by `replay_of`, from a chosen stage, with validated overrides.
  Stages before that stage are copied as rows with status "reused" (outputs copied, `reused_from`
  pointing at the source row), so the new job's record is complete on its own.

Both write everything in one transaction and only then send the Celery chain: a refused replay
(bad override, corrupted artifact, job still running) writes nothing.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from db.engine import rowcount, session_scope
from db.models import JOB_ACTIVE, Job, JobStatus, StageRun, StageStatus, utcnow
from orchestrator.submission import new_job_rows
from tasks.artifact_store import ArtifactIntegrityError, artifact_shas, open_store
from tasks.contracts import STAGES, JobRequest
from tasks.pipeline import chain as pipeline_chain
from tasks.pipeline.attempts import add_attempts, end_waiting_cancelled_job, latest_done
from tasks.settings import Settings, get_settings

ACTIVE_STATUSES = JOB_ACTIVE
log = logging.getLogger(__name__)
# Each overridable request field and the first stage that reads it: an override is only honoured
# when that stage runs again (re-running from a later stage would copy its old output).
OVERRIDE_FIRST_STAGE: dict[str, str] = {
    "lyrics": "refine_lyrics",
    "max_audio_length_ms": "refine_lyrics",  # refine_lyrics gets the frame budget, generate_tokens the limit
    "style": "generate_tags",
    "tags": "generate_tags",
    "seed": "generate_tokens",
    "temperature": "generate_tokens",
    "top_k": "generate_tokens",
    "cfg_scale": "generate_tokens",
    "output_format": "encode_audio",
}
OVERRIDABLE = tuple(OVERRIDE_FIRST_STAGE)


class ReplayError(Exception):
    """A replay that was refused; the message says why and what to do. Nothing was written."""


class JobNotFound(ReplayError, LookupError):
    pass


class ReplayConflict(ReplayError):
    """The job's state does not allow this replay (e.g. it is still queued or running)."""


class OverrideError(ReplayError, ValueError):
    def __init__(self, message: str, *, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.errors = errors or {}


@dataclass(frozen=True)
class ReplayResult:
    job_id: str
    mode: str  # "retry" or "new"
    from_stage: str
    attempts: dict[str, int]  # the stages that will run, with their attempt numbers
    reused: dict[str, int] = field(default_factory=dict)  # stage -> source stage_run id
    dispatched: bool = True  # False: stored, but the broker refused; the reconciler sends it later

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "mode": self.mode, "from_stage": self.from_stage,
                "attempts": self.attempts, "reused": self.reused, "dispatched": self.dispatched}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ReplayError(f"from_stage {stage!r} is not a stage; stages are {', '.join(STAGES)}")


def latest_done_runs(session: Session, job_id: str) -> dict[str, StageRun]:
    """Per stage, the latest attempt that succeeded or was reused (what downstream stages read)."""
    return latest_done(session, job_id)


def verify_reused_outputs(runs: list[StageRun], settings: Settings) -> None:
    """Every artifact the reused outputs point at must exist and hash to its sha256."""
    store = open_store(settings)
    for run in runs:
        for sha in dict.fromkeys(artifact_shas(run.outputs)):
            try:
                store.get(sha)
            except ArtifactIntegrityError as exc:
                raise ArtifactIntegrityError(
                    f"cannot reuse the recorded outputs of job {run.job_id} stage {run.stage} attempt "
                    f"{run.attempt}: {exc}; replay from {run.stage} (or earlier) to recompute it") from exc


def _reusable_upstream(session: Session, job_id: str, from_stage: str) -> list[StageRun]:
    done = latest_done_runs(session, job_id)
    upstream = []
    for stage in STAGES[: STAGES.index(from_stage)]:
        run = done.get(stage)
        if run is None or run.outputs is None:
            raise ReplayError(f"job {job_id}: stage {stage} has no successful attempt whose outputs could be "
                              f"reused; replay from {stage} (or earlier) instead of {from_stage}")
        upstream.append(run)
    return upstream


def _default_from_stage(session: Session, job: Job) -> str:
    if job.failed_stage:
        return job.failed_stage
    done = latest_done_runs(session, job.id)
    for stage in STAGES:
        if stage not in done:
            return stage
    raise ReplayError(f"job {job.id} has no failed or unfinished stage; name the stage to re-run (from_stage)")


# -- retry ------------------------------------------------------------------------------------

def retry(job_id: str, from_stage: str | None = None, *, settings: Settings | None = None,
          requested_by: str | None = None, send: bool = True,
          sender: Callable[[str, dict[str, int], int | None], None] | None = None) -> ReplayResult:
    settings = settings or get_settings()
    if from_stage is not None:
        _check_stage(from_stage)
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        if job.status in ACTIVE_STATUSES:
            raise ReplayConflict(f"job {job_id} is {job.status}; retry it once it has failed, succeeded or "
                                 f"been cancelled (or cancel it first)")
        stage = from_stage or _default_from_stage(session, job)
        upstream = _reusable_upstream(session, job_id, stage)
        verify_reused_outputs(upstream, settings)
        # claim the job atomically: two concurrent retries cannot both pass (works without row locks)
        claimed = rowcount(session.execute(
            update(Job).where(Job.id == job_id, Job.status.not_in(ACTIVE_STATUSES))
            .values(status=JobStatus.QUEUED, failed_stage=None, error_type=None, error_message=None, finished_at=None,
                    cancel_requested=False, cancel_reason=None, cancel_requested_by=None,
                    cancel_requested_at=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)))
        if not claimed:
            raise ReplayConflict(f"job {job_id} was queued by someone else meanwhile")
        attempts = add_attempts(session, job_id, stage, requested_by=_who("retry", requested_by))
        result = ReplayResult(job_id, "retry", stage, attempts, {run.stage: run.id for run in upstream})
    if send:
        result = _send(result, settings, sender)
    return result


# -- re-run as a new job ----------------------------------------------------------------------

def validate_overrides(original_request: dict[str, Any], overrides: dict[str, Any], from_stage: str) -> JobRequest:
    """The new job's request: original + overrides, checked by JobRequest and against from_stage."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise OverrideError(f"unknown override{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                            f"overridable fields are {', '.join(OVERRIDABLE)}",
                            errors={name: "unknown override" for name in unknown})
    start = STAGES.index(from_stage)
    ignored = {name: OVERRIDE_FIRST_STAGE[name] for name in overrides
               if STAGES.index(OVERRIDE_FIRST_STAGE[name]) < start}
    if ignored:
        details = "; ".join(f"override {name!r} is read by stage {stage}, which would be copied unchanged when "
                            f"re-running from {from_stage}: re-run from {stage} (or earlier) to change it"
                            for name, stage in ignored.items())
        raise OverrideError(details, errors={name: f"needs from_stage {stage} or earlier"
                                             for name, stage in ignored.items()})
    merged = {**original_request, **overrides}
    if ("tags" in overrides or "style" in overrides) and original_request.get("tags_backend") == "given":
        merged["tags_backend"] = None  # re-decided for the new tags/style, as at submission
    try:
        return JobRequest.model_validate(merged)
    except ValidationError as exc:
        errors = {".".join(map(str, e["loc"])) or "request": e["msg"] for e in exc.errors()}
        raise OverrideError("invalid override: " + "; ".join(f"{k}: {v}" for k, v in errors.items()),
                            errors=errors) from exc


def rerun_as_new(job_id: str, from_stage: str = "refine_lyrics", overrides: dict[str, Any] | None = None, *,
                 settings: Settings | None = None, requested_by: str | None = None, send: bool = True,
                 sender: Callable[[str, dict[str, int], int | None], None] | None = None) -> ReplayResult:
    settings = settings or get_settings()
    _check_stage(from_stage)
    overrides = dict(overrides or {})
    with session_scope(settings.resolved_database_url) as session:
        original = session.get(Job, job_id)
        if original is None:
            raise JobNotFound(f"job {job_id} does not exist")
        request = validate_overrides(original.request, overrides, from_stage)
        upstream = _reusable_upstream(session, job_id, from_stage)
        verify_reused_outputs(upstream, settings)
        seed = overrides.get("seed", original.seed)
        job = new_job_rows(session, request, settings, source="replay", seed=seed, replay_of=job_id,
                           replay_from_stage=from_stage, replay_overrides=overrides)
        job.seed_source = "user" if "seed" in overrides else "replay"
        sources = {run.stage: run for run in upstream}
        for row in job.stage_runs:
            source = sources.get(row.stage)
            if source is not None:
                row.status, row.reused_from = StageStatus.REUSED, source.id
                row.inputs, row.outputs, row.artifacts = source.inputs, source.outputs, source.artifacts
            row.requested_by = _who("replay", requested_by)
        session.flush()
        attempts = {row.stage: row.attempt for row in job.stage_runs if row.stage not in sources}
        result = ReplayResult(job.id, "new", from_stage, attempts, {s: r.id for s, r in sources.items()})
    if send:
        result = _send(result, settings, sender)
    return result


# -- sending ----------------------------------------------------------------------------------

def _who(verb: str, requested_by: str | None) -> str:
    return f"{verb}:{requested_by}" if requested_by else verb


def _send(result: ReplayResult, settings: Settings,
          sender: Callable[[str, dict[str, int], int | None], None] | None) -> ReplayResult:
    """Send the chain. A refused send is the submission's policy (L1): the rows are committed and
    queued, so the reconciler sends them once the broker answers; the caller learns dispatched=False."""
    if sender is None:
        sender = pipeline_chain.send_chain
    try:
        with session_scope(settings.resolved_database_url) as session:
            length = session.get_one(Job, result.job_id).request.get("max_audio_length_ms")
        sender(result.job_id, result.attempts, length)
    except Exception as exc:  # noqa: BLE001 - whatever the broker client raised, the record is safe
        log.warning("replay %s of job %s stored but not sent (%s: %s); the reconciler will send it",
                    result.mode, result.job_id, type(exc).__name__, exc)
        return dataclasses.replace(result, dispatched=False)
    return result


# -- cancel -----------------------------------------------------------------------------------

def cancel(job_id: str, *, reason: str | None = None, requested_by: str | None = None,
           settings: Settings | None = None) -> bool:
    """Stop a queued or running job; False when a cancel was already requested.

    No stage running: one transaction marks the waiting frontier row cancelled (only if it is still
    claimable, so a worker that claims it first wins), its later rows skipped and the job cancelled;
    the stale message backs off at the claim. A stage running: the flag is cooperative - the token
    stage stops within a few frames, any stage stops at its next cancel check, and the job ends when
    that stage ends or is found lost (tasks/reconciler.py ends cancel-requested jobs whose frontier waits).
    """
    settings = settings or get_settings()
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        if job.status == JobStatus.CANCELLED:
            return False  # cancelling twice is not an error
        if job.status not in ACTIVE_STATUSES:
            raise ReplayConflict(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
        if job.cancel_requested:
            return False
        now = utcnow()
        job.cancel_requested = True
        job.cancel_reason = reason or "cancelled from the admin dashboard"
        job.cancel_requested_by = requested_by
        job.cancel_requested_at = now
        session.flush()
        end_waiting_cancelled_job(session, job, now)
    return True
