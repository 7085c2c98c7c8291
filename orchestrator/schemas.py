"""Response models of the public JSON API: every body /api answers is one of these.

The OpenAPI document (orchestrator/openapi.py) is generated from them, and the views build their
bodies through them, so the document cannot drift from what is returned.

The public job view is what the holder of a job id may see: the request, statuses, timings and
the musical results. Operator facts stay out (code-review M5): tracebacks, worker hostnames and
pids, the environment record (hosts, GPUs, checkpoint paths, checksums), stage inputs (they name
the checkpoint folder), LLM exchanges (internal URL, prompts) and the code version. Text that
may still quote a path or URL (error messages, fallback reasons) is redacted. The full record is
the admin API's (`/admin/api/jobs/<id>`, login required).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from db.models import JOB_STATUSES, STAGE_STATUSES
from tasks.contracts import STAGES

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
StageStatus = Literal[STAGE_STATUSES]  # type: ignore[valid-type]
StageName = Literal[STAGES]  # type: ignore[valid-type]
JobId = Field(pattern=r"^[0-9a-f]{32}$", description="32 lower-case hex digits (uuid4)")

# stage output keys that describe the machine or the LLM service, not the song
PRIVATE_OUTPUT_KEYS = frozenset({"llm_exchanges", "device", "dtype", "checkpoint", "tokens_text_path"})
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_PATH = re.compile(r"(?<![\w.:/])(?:~|\.{1,2})?/(?:[^\s/'\"():,]+/)*[^\s/'\"():,]+")
REDACTED = "<redacted>"


def redact(text: str | None) -> str | None:
    """A message without URLs or filesystem paths (they name internal hosts and directories)."""
    if text is None:
        return None
    return _PATH.sub(REDACTED, _URL.sub(REDACTED, text))


def _public_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_public_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _public_value(v) for k, v in value.items() if k not in PRIVATE_OUTPUT_KEYS}
    return value


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(Response):
    field: str = Field(min_length=1, description="the request field at fault (dotted path), or body/client/id")
    message: str = Field(min_length=1)


class Errors(Response):
    """Every refusal: one entry per problem, each naming its field."""

    errors: list[FieldError] = Field(min_length=1)


class JobLinks(Response):
    self: str
    page: str
    audio: str
    stream: str = Field(description="the song as a WAV stream while it is decoded (GET /api/jobs/<id>/stream)")


class PublicStream(Response):
    """What a listener can hear now: the final samples recorded so far (docs/streaming.md)."""

    status: Literal["waiting", "streaming", "finished", "ended"] = Field(
        description="waiting: nothing final yet; streaming: some final, more to come; finished: the whole "
                    "song is final; ended: the job ended without a decoded song")
    attempt: int | None = Field(ge=1, description="the decode_audio attempt the stream follows")
    windows: int = Field(ge=0, description="codec windows that attempt has recorded")
    seconds_final: float = Field(ge=0, description="seconds of the song a listener may hear now")
    seconds_total: float | None = Field(ge=0, description="the song's length, once the token stage has finished")
    seconds_generated: float = Field(ge=0, description="seconds of audio the token stage has generated so far")
    decode_s: float = Field(ge=0, description="time the recorded windows took to decode")
    href: str = Field(description="the stream: chunked audio/wav of unknown length")


class JobCreated(Response):
    id: str = JobId
    seed: int = Field(ge=0)
    seed_source: Literal["user", "drawn"]
    status: Literal["queued"]
    dispatched: bool = Field(description="false: stored, but the broker was unavailable; the reconciler sends it")
    links: JobLinks


class PublicStageRun(Response):
    stage: StageName
    attempt: int = Field(ge=1)
    status: StageStatus
    queue: str
    reused_from: int | None
    error_type: str | None
    error_message: str | None = Field(description="paths and URLs redacted")
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    deliveries: int = Field(ge=0)
    progress: dict[str, Any] | None
    outputs: dict[str, Any] | None = Field(description="the stage's results, without machine or LLM details")


class PublicJobView(Response):
    id: str = JobId
    status: JobStatus
    seed: int = Field(ge=0)
    seed_source: str
    request: dict[str, Any] = Field(description="the validated request, deployment defaults filled in")
    pipeline: str
    source: str | None
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    replay_of: str | None
    replay_from_stage: str | None
    replay_overrides: dict[str, Any] | None
    failed_stage: str | None
    error_type: str | None
    error_message: str | None = Field(description="paths and URLs redacted")
    cancel_requested: bool
    tags_used: str | None
    audio_ready: bool
    output_format: Literal["mp3", "wav"]
    tiny_checkpoint: bool
    notice: str | None
    links: JobLinks
    stream: PublicStream
    stages: list[PublicStageRun]

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> PublicJobView:
        """The public part of orchestrator.job_views.job_view's full dict."""
        stage_fields = set(PublicStageRun.model_fields)
        stages = [PublicStageRun(**{k: v for k, v in row.items() if k in stage_fields} | {
                      "error_message": redact(row.get("error_message")),
                      "outputs": _public_value(row.get("outputs"))})
                  for row in view["stages"]]
        job_fields = set(cls.model_fields) - {"stages", "error_message"}
        return cls(**{k: v for k, v in view.items() if k in job_fields}, stages=stages,
                   error_message=redact(view.get("error_message")))


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (Errors, JobCreated, PublicJobView)  # PublicStream: inside the view
