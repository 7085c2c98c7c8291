"""Per-stage Celery time limits derived from the requested song length, and the broker lease they imply.

A stage gets a soft limit (SoftTimeLimitExceeded is raised inside it, so it records a clean
failure) and a hard limit a little later (the pool kills the child; the reconciler records that as
TimeLimitExceeded because the row stops heartbeating after running for the hard limit). Both grow
with the song: the token stage per frame, the codec and the encoder per second of audio. Every
hard limit is clamped to MAX_HARD_TIME_LIMIT_S, and the broker's visibility timeout is above twice
that (design.md section 4), so Redis never re-delivers a stage that is still within its limit.

The budgets assume a GPU for the model stages (the reference path is ~60 ms per frame; we allow
four times that) plus the model load a fresh worker process pays before its first song.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.contracts import FRAME_MS, STAGES
from tasks.settings import Settings

MAX_HARD_TIME_LIMIT_S = 4 * 3600  # longest hard limit any stage may get
VISIBILITY_TIMEOUT_S = 2 * MAX_HARD_TIME_LIMIT_S + 600
LONGEST_SONG_MS = 600_000  # assumed when the length is unknown (a chain sent without it)
MODEL_LOAD_S = 300  # a fresh GPU worker loads the weights on its first task
HARD_LIMIT_FACTOR = 1.25
HARD_LIMIT_MARGIN_S = 60


@dataclass(frozen=True)
class StageBudget:
    fixed_s: float  # startup, model load, prefill
    per_frame_s: float = 0.0  # token stage: one frame = 80 ms of audio
    per_audio_s: float = 0.0  # codec / encoder: per second of audio


BUDGETS: dict[str, StageBudget] = {
    "generate_tokens": StageBudget(fixed_s=MODEL_LOAD_S + 120, per_frame_s=0.25),
    "decode_audio": StageBudget(fixed_s=MODEL_LOAD_S + 120, per_audio_s=1.0),
    "encode_audio": StageBudget(fixed_s=120, per_audio_s=0.25),
}


@dataclass(frozen=True)
class StageLimits:
    soft_s: int
    hard_s: int

    def signature_options(self) -> dict[str, int]:
        return {"soft_time_limit": self.soft_s, "time_limit": self.hard_s}


def stage_limits(stage: str, max_audio_length_ms: int | None, settings: Settings) -> StageLimits:
    """Soft and hard limit for one stage of a song of `max_audio_length_ms` (None: the longest)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    length_ms = max(FRAME_MS, max_audio_length_ms or LONGEST_SONG_MS)
    budget = BUDGETS.get(stage)
    if budget is None:  # the text stages: LLM calls with their own timeouts and retries
        soft = float(settings.cpu_soft_time_limit_s)
    else:
        soft = budget.fixed_s + budget.per_frame_s * (length_ms // FRAME_MS) + budget.per_audio_s * length_ms / 1000
    hard = min(soft * HARD_LIMIT_FACTOR + HARD_LIMIT_MARGIN_S, MAX_HARD_TIME_LIMIT_S)
    soft = min(soft, hard - HARD_LIMIT_MARGIN_S)
    return StageLimits(soft_s=int(soft), hard_s=int(hard))


def following_limits(stage: str, followed: str, max_audio_length_ms: int | None, settings: Settings) -> StageLimits:
    """A stage that starts while the stage before it still runs (a streaming decode) lives through both."""
    own, before = stage_limits(stage, max_audio_length_ms, settings), stage_limits(followed, max_audio_length_ms, settings)
    hard = min(own.hard_s + before.hard_s, MAX_HARD_TIME_LIMIT_S)
    return StageLimits(soft_s=min(own.soft_s + before.soft_s, hard - HARD_LIMIT_MARGIN_S), hard_s=hard)


def signature_options(stage: str, max_audio_length_ms: int | None, settings: Settings) -> dict[str, Any]:
    """Options for the stage's Celery signature: its soft and hard time limit."""
    return stage_limits(stage, max_audio_length_ms, settings).signature_options()


def visibility_timeout_s(settings: Settings) -> int:
    """The broker lease of an unacknowledged message; only tests set a smaller one."""
    return settings.visibility_timeout_s or VISIBILITY_TIMEOUT_S


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s(settings)}
    if settings.visibility_timeout_s:
        # a deliberately short lease (tests of re-delivery) is only meaningful if workers look for
        # expired messages often; kombu's default sweep is every ~100 s
        options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    return options
