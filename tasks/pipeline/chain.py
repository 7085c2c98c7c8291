"""Builds the Celery chain for a job: one immutable signature per stage, routed by stage."""
from __future__ import annotations

from celery import chain, signature

from tasks.celery_app import app, queue_for, task_name
from tasks.contracts import STAGES
from tasks.settings import get_settings
from tasks.time_limits import following_limits, signature_options


def stage_signature(job_id: str, stage: str, attempt: int, max_audio_length_ms: int | None = None):
    """One stage's message; its soft/hard time limits grow with the song (tasks/time_limits.py)."""
    return signature(task_name(stage), args=(job_id, attempt), immutable=True, app=app, queue=queue_for(stage),
                     **signature_options(stage, max_audio_length_ms, get_settings()))


def build_chain(job_id: str, attempts: dict[str, int], max_audio_length_ms: int | None = None):
    """The chain of the stages in `attempts` (in pipeline order), each with its attempt number."""
    stages = [stage for stage in STAGES if stage in attempts]
    if not stages:
        raise ValueError("a chain needs at least one stage")
    return chain(*(stage_signature(job_id, stage, attempts[stage], max_audio_length_ms) for stage in stages))


def send_chain(job_id: str, attempts: dict[str, int], max_audio_length_ms: int | None = None) -> None:
    build_chain(job_id, attempts, max_audio_length_ms).apply_async()


def send_follower(job_id: str, stage: str, attempt: int, followed: str, max_audio_length_ms: int | None) -> None:
    """Send one stage's attempt early, while `followed` (the stage before it) still runs: it follows that
    stage's recorded progress (docs/streaming.md) and, on success, sends the stages after it itself."""
    limits = following_limits(stage, followed, max_audio_length_ms, get_settings())
    signature(task_name(stage), args=(job_id, attempt), kwargs={"continue_chain": True}, immutable=True, app=app,
              queue=queue_for(stage), **limits.signature_options()).apply_async()
