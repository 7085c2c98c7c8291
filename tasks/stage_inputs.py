"""How each stage's typed input is assembled from SQL: the job's request plus upstream outputs.

The same functions serve the Celery stages, retry (which re-resolves from the recorded upstream
outputs) and `songpipe stage ...` (which can also take a stored input verbatim).
"""
from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from db.models import Job
from tasks.contracts import (
    DecodeAudioInput,
    EncodeAudioInput,
    FollowedTokens,
    GenerateTagsInput,
    GenerateTokensInput,
    JobRequest,
    RefineLyricsInput,
    SongFileTags,
)
from tasks.pipeline.attempts import latest_done, pending_attempt
from tasks.settings import Settings

T = TypeVar("T")


class MissingUpstreamOutput(LookupError):
    pass


def upstream_outputs(session: Session, job_id: str, stage: str) -> dict[str, Any]:
    """Outputs of the latest successful attempt of `stage` in this job (retries reuse these)."""
    row = latest_done(session, job_id, stage).get(stage)
    if row is None or row.outputs is None:
        raise MissingUpstreamOutput(f"job {job_id}: stage {stage} has no successful attempt to read outputs from")
    return row.outputs


def job_request(job: Job) -> JobRequest:
    return JobRequest.model_validate(job.request)


def _resolved(value: T | None, name: str) -> T:
    """A backend the submission resolved (None in a request means the deployment default)."""
    if value is None:
        raise ValueError(f"the job's {name} was not resolved at submission")
    return value


def refine_lyrics_input(session: Session, job: Job, settings: Settings) -> RefineLyricsInput:
    request = job_request(job)
    return RefineLyricsInput(lyrics=request.lyrics, backend=_resolved(request.lyrics_backend, "lyrics_backend"),
                             allow_fallback=request.allow_fallback, max_frames=request.params.max_frames)


def generate_tags_input(session: Session, job: Job, settings: Settings) -> GenerateTagsInput:
    request = job_request(job)
    refined = upstream_outputs(session, job.id, "refine_lyrics")
    return GenerateTagsInput(style=request.style, user_tags=request.tags, lyrics=refined["lyrics"],
                             extra_tags=refined.get("direction_tags", []),
                             backend=_resolved(request.tags_backend, "tags_backend"), allow_fallback=request.allow_fallback)


def generate_tokens_input(session: Session, job: Job, settings: Settings) -> GenerateTokensInput:
    request = job_request(job)
    refined = upstream_outputs(session, job.id, "refine_lyrics")
    tags = upstream_outputs(session, job.id, "generate_tags")
    return GenerateTokensInput(lyrics=refined["lyrics"], tags=tags["tags_string"], seed=job.seed,
                               params=request.params, checkpoint=str(settings.resolved_checkpoint_dir))


def decode_audio_input(session: Session, job: Job, settings: Settings) -> DecodeAudioInput:
    """The finished tokens; while the token stage still runs (a decode started early to stream the song,
    docs/streaming.md), the token attempt to follow instead."""
    checkpoint = str(settings.resolved_checkpoint_dir)
    try:
        tokens = upstream_outputs(session, job.id, "generate_tokens")
    except MissingUpstreamOutput:
        running = pending_attempt(session, job.id, "generate_tokens")
        if running is None:
            raise
        follow = FollowedTokens(attempt=running.attempt, max_frames=job_request(job).params.max_frames)
        return DecodeAudioInput(tokens=None, frames=None, seed=job.seed, checkpoint=checkpoint, follow=follow)
    return DecodeAudioInput(tokens=tokens["tokens"], frames=tokens["frames"], seed=job.seed, checkpoint=checkpoint)


def _model_checksum(session: Session, job_id: str) -> str | None:
    """One short digest of the LM files the token stage loaded (its recorded model_checksums)."""
    row = latest_done(session, job_id, "generate_tokens").get("generate_tokens")
    checksums = ((row.environment or {}) if row is not None else {}).get("model_checksums")
    if not checksums:
        return None
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(checksums.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def song_title(lyrics: str) -> str:
    """The first sung line: section markers such as [verse] are skipped."""
    for line in lyrics.splitlines():
        line = line.strip()
        if line and not (line.startswith("[") and line.endswith("]")):
            return line[:120]
    return "untitled"


def encode_audio_input(session: Session, job: Job, settings: Settings) -> EncodeAudioInput:
    request = job_request(job)
    decoded = upstream_outputs(session, job.id, "decode_audio")
    tags = SongFileTags(title=song_title(request.lyrics), job_id=job.id, seed=job.seed,
                        model_checksum=_model_checksum(session, job.id))
    return EncodeAudioInput(wav=decoded["wav"], output_format=request.output_format, file_tags=tags,
                            loudness_target_lufs=settings.loudness_target_lufs)


RESOLVERS = {
    "refine_lyrics": refine_lyrics_input,
    "generate_tags": generate_tags_input,
    "generate_tokens": generate_tokens_input,
    "decode_audio": decode_audio_input,
    "encode_audio": encode_audio_input,
}
