"""Side by side of two jobs or two stage attempts: which inputs differ, are the tokens identical.

A reference is a job id (32 hex characters) or a stage attempt written `run:<id>` (or just the
numeric StageRun id). Two jobs are compared stage by stage, using the attempt each stage's
downstream read (the latest succeeded/reused one, else the latest attempt).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, StageRun
from db.status import STAGE_DONE
from tasks.contracts import STAGES
from tasks.pipeline.attempts import representative_runs

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_MISSING = object()


class CompareError(ValueError):
    pass


@dataclass
class FieldDiff:
    path: str
    a: Any
    b: Any


@dataclass
class StageComparison:
    stage: str
    a: StageRun | None
    b: StageRun | None
    input_diffs: list[FieldDiff] = field(default_factory=list)
    output_diffs: list[FieldDiff] = field(default_factory=list)
    tokens_identical: bool | None = None  # only for generate_tokens (or a token artifact in outputs)

    @property
    def inputs_identical(self) -> bool:
        return not self.input_diffs

    def as_dict(self) -> dict[str, Any]:
        def run(r: StageRun | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"id": r.id, "job_id": r.job_id, "attempt": r.attempt, "status": r.status,
                    "duration_s": r.duration_s, "reused_from": r.reused_from,
                    "tokens_sha256": token_sha(r)}
        return {"stage": self.stage, "a": run(self.a), "b": run(self.b),
                "inputs_identical": self.inputs_identical, "tokens_identical": self.tokens_identical,
                "input_diffs": [d.__dict__ for d in self.input_diffs],
                "output_diffs": [d.__dict__ for d in self.output_diffs]}


@dataclass
class Comparison:
    kind: str  # "jobs" or "attempts"
    a_ref: str
    b_ref: str
    job_a: Job | None
    job_b: Job | None
    job_diffs: list[FieldDiff]
    stages: list[StageComparison]

    def as_dict(self) -> dict[str, Any]:
        def job(j: Job | None) -> dict[str, Any] | None:
            return None if j is None else {"id": j.id, "status": j.status, "seed": j.seed,
                                           "replay_of": j.replay_of, "created_at": j.created_at.isoformat()}
        return {"kind": self.kind, "a": self.a_ref, "b": self.b_ref, "job_a": job(self.job_a),
                "job_b": job(self.job_b), "job_diffs": [d.__dict__ for d in self.job_diffs],
                "stages": [s.as_dict() for s in self.stages]}


def diff(a: Any, b: Any, path: str = "") -> list[FieldDiff]:
    """Field-level differences between two JSON values (dicts recursively, lists and scalars whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found: list[FieldDiff] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
            if va is _MISSING or vb is _MISSING:
                found.append(FieldDiff(sub, None if va is _MISSING else va, None if vb is _MISSING else vb))
            else:
                found.extend(diff(va, vb, sub))
        return found
    return [] if a == b else [FieldDiff(path or "(value)", a, b)]


def token_sha(run: StageRun | None) -> str | None:
    if run is None or not run.outputs:
        return None
    tokens = run.outputs.get("tokens")
    return tokens.get("sha256") if isinstance(tokens, dict) else None


def _compare_runs(stage: str, a: StageRun | None, b: StageRun | None) -> StageComparison:
    result = StageComparison(stage, a, b)
    result.input_diffs = diff(a.inputs if a else None, b.inputs if b else None)
    result.output_diffs = diff(a.outputs if a else None, b.outputs if b else None)
    sha_a, sha_b = token_sha(a), token_sha(b)
    if sha_a and sha_b:
        result.tokens_identical = sha_a == sha_b
    return result


def _representative_runs(session: Session, job_id: str) -> dict[str, StageRun]:
    """Per stage: the latest succeeded/reused attempt, else the latest attempt of any status."""
    return representative_runs(session.scalars(select(StageRun).where(StageRun.job_id == job_id)))


def _resolve(session: Session, ref: str) -> Job | StageRun:
    ref = (ref or "").strip()
    if _JOB_ID.match(ref):
        job = session.get(Job, ref)
        if job is None:
            raise CompareError(f"job {ref} does not exist")
        return job
    number = ref.removeprefix("run:")
    if number.isdigit():
        run = session.get(StageRun, int(number))
        if run is None:
            raise CompareError(f"stage attempt run:{number} does not exist")
        return run
    raise CompareError(f"{ref!r} is neither a job id (32 hex characters) nor a stage attempt (run:<id>)")


def compare(session: Session, a_ref: str, b_ref: str) -> Comparison:
    a, b = _resolve(session, a_ref), _resolve(session, b_ref)
    if isinstance(a, StageRun) and isinstance(b, StageRun):
        if a.stage != b.stage:
            raise CompareError(f"run:{a.id} is stage {a.stage} but run:{b.id} is stage {b.stage}")
        ja, jb = session.get_one(Job, a.job_id), session.get_one(Job, b.job_id)
        return Comparison("attempts", a_ref, b_ref, ja, jb, _job_diffs(ja, jb), [_compare_runs(a.stage, a, b)])
    if not (isinstance(a, Job) and isinstance(b, Job)):
        raise CompareError("compare two jobs or two stage attempts, not one of each")
    runs_a, runs_b = _representative_runs(session, a.id), _representative_runs(session, b.id)
    stages = [_compare_runs(stage, runs_a.get(stage), runs_b.get(stage)) for stage in STAGES]
    return Comparison("jobs", a_ref, b_ref, a, b, _job_diffs(a, b), stages)


def _job_diffs(a: Job, b: Job) -> list[FieldDiff]:
    def view(job: Job) -> dict[str, Any]:
        return {"request": job.request, "seed": job.seed, "pipeline": job.pipeline, "code_version": job.code_version}
    return diff(view(a), view(b))


def related_jobs(session: Session, job_id: str) -> list[Job]:
    """The jobs worth comparing with `job_id`: its original, its replays and its siblings (replays of
    the same original), newest first, for the compare page's picker."""
    job = session.get(Job, job_id) if job_id else None
    if job is None:
        return []
    root = job.replay_of or job.id
    family = session.scalars(select(Job).where((Job.replay_of == root) | (Job.id == root) | (Job.replay_of == job.id))
                             .order_by(Job.created_at.desc()))
    return [j for j in family if j.id != job.id]


def final_audio_sha(session: Session, job_id: str) -> str | None:
    """The sha256 of the job's encoded song, for the side-by-side players."""
    row = session.scalars(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "encode_audio",
                                                 StageRun.status.in_(STAGE_DONE))
                          .order_by(StageRun.attempt.desc())).first()
    return ((row.outputs or {}).get("audio") or {}).get("sha256") if row is not None else None
