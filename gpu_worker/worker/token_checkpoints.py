"""Token checkpoints: a song's frames so far, recorded so that a new attempt continues instead of starting over.

The batching engine hands the stage the frames generated so far every `token_checkpoint_frames` frames;
the stage stores them as a `tokens` artifact and records the resume point with its attempt's progress
(StageContext.checkpoint). A later attempt of the same job and stage with the same inputs (after a lost
worker, a failed attempt's retry) resumes from the furthest point, but only when it would compute the
same numbers: the same engine shape, kernels, card, dtype, draws, weights and code (`compat_key`).
Otherwise it starts from frame 0 and the record says why. docs/batching.md has the overview.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from db.engine import session_scope
from gpu_worker.checkpoints.heartcodec_checkpoint import CODEC_FOLDER, read_codec_config
from gpu_worker.worker.stages import tokens_from_bytes, tokens_to_bytes
from tasks.contracts import GenerateTokensInput
from tasks.pipeline.attempts import latest_checkpoint
from tasks.pipeline.handover import start_follower
from tasks.recording import StageContext

log = logging.getLogger(__name__)


def compat_key(**facts: Any) -> str:
    """A digest of everything a continuation's numbers depend on besides the inputs."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class ResumePoint:
    frames: torch.Tensor  # [8, k]
    attempt: int
    point: dict[str, Any]


def find_resume_point(inp: GenerateTokensInput, ctx: StageContext, compat: str) -> ResumePoint | None:
    """The furthest usable checkpoint of an earlier attempt; notes in the record what was found and used."""
    with session_scope(ctx.database_url) as session:
        found = latest_checkpoint(session, ctx.job_id, ctx.stage, ctx.attempt, inp.model_dump(mode="json"))
    if found is None:
        return None
    attempt, point = found
    about = {"attempt": attempt, "frames": point.get("done"), "tokens_sha256": point.get("tokens", {}).get("sha256")}
    if point.get("compat") != compat:
        ctx.environment_extra["resume_skipped"] = {**about, "reason": "recorded by another engine shape, card, "
                                                   "dtype, sampling scheme, checkpoint or code version"}
        return None
    try:
        grid = tokens_from_bytes(ctx.store.get(point["tokens"]["sha256"], "tokens"))
    except Exception as exc:  # noqa: BLE001 - a missing checkpoint means starting over, not failing the song
        log.warning("token checkpoint of job %s attempt %s is unreadable; starting over: %s", ctx.job_id, attempt, exc)
        ctx.environment_extra["resume_skipped"] = {**about, "reason": f"artifact unreadable: {exc}"}
        return None
    if grid.ndim != 2 or grid.shape[1] != point.get("done"):
        ctx.environment_extra["resume_skipped"] = {**about, "reason": f"artifact holds {list(grid.shape)} frames"}
        return None
    return ResumePoint(torch.from_numpy(grid.astype("int64")), attempt, point)


def stream_window_ends(checkpoint: Path, max_frames: int) -> tuple[int, ...]:
    """The frame counts at which a song of up to `max_frames` lets a following decode take its next codec
    window, by the checkpoint's window geometry: one frame past the window's last, so that the window cannot
    be the song's last one (that one wraps around and waits for the end). Empty when the song fits one window."""
    geometry = read_codec_config(checkpoint / CODEC_FOLDER).windows
    ends: list[int] = []
    while geometry.frames_needed(len(ends)) < max_frames:
        ends.append(geometry.frames_needed(len(ends)) + 1)
    return tuple(ends)


class CheckpointWriter:
    """Stores checkpoints the engine hands over; `save` runs on the stage's thread (SQL and the store)."""

    def __init__(self, ctx: StageContext, compat: str, total: int):
        self.ctx, self.compat, self.total = ctx, compat, total
        self.stream_started: dict[str, int] | None = None
        self.saved = 0

    def start_stream(self) -> None:
        """Send the job's decode stage now, to follow this attempt's checkpoints (docs/streaming.md): sent
        before the first frame, its delivery, claim and codec load are off the path to the first sound."""
        attempt = start_follower(self.ctx.database_url, self.ctx.job_id)
        self.stream_started = {"decode_attempt": attempt or 0}

    def save(self, done: int, grid: torch.Tensor) -> None:
        ref = self.ctx.put_artifact(tokens_to_bytes(grid), "tokens")
        self.ctx.checkpoint(done, self.total, "frames", {
            "done": done, "tokens": ref.model_dump(mode="json"), "compat": self.compat, "attempt": self.ctx.attempt})
        self.saved += 1
