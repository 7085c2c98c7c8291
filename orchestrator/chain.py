"""Builds the Celery chain for a job: one immutable signature per stage, routed by stage."""
from __future__ import annotations

from celery import chain, signature

from tasks.celery_app import app, queue_for, task_name
from tasks.contracts import STAGES


def stage_signature(job_id: str, stage: str, attempt: int):
    return signature(task_name(stage), args=(job_id, attempt), immutable=True, app=app, queue=queue_for(stage))


def build_chain(job_id: str, attempts: dict[str, int]):
    """The chain of the stages in `attempts` (in pipeline order), each with its attempt number."""
    stages = [stage for stage in STAGES if stage in attempts]
    if not stages:
        raise ValueError("a chain needs at least one stage")
    return chain(*(stage_signature(job_id, stage, attempts[stage]) for stage in stages))


def send_chain(job_id: str, attempts: dict[str, int]) -> None:
    build_chain(job_id, attempts).apply_async()
