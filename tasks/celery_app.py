"""The Celery application, configured once from Settings (design.md section 4 explains each value)."""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from tasks.contracts import GPU_STAGES, STAGES
from tasks.settings import Settings, get_settings
# The broker's visibility timeout must exceed twice the longest hard time limit, or Redis
# re-delivers a long GPU task while it runs (tasks/time_limits.py derives both).
from tasks.time_limits import MAX_HARD_TIME_LIMIT_S, VISIBILITY_TIMEOUT_S, broker_transport_options  # noqa: F401

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"
MODEL_LOAD_ALLOWANCE_S = 300  # worker_proc_alive_timeout: a child loading 16 GB of weights must not be killed


def task_name(stage: str) -> str:
    return f"songpipe.{stage}"


def queue_for(stage: str) -> str:
    return GPU_QUEUE if stage in GPU_STAGES else CPU_QUEUE


class BrokerNotConfigured(RuntimeError):
    pass


def broker_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    raise BrokerNotConfigured(
        "REDIS_URL is not set: start the stack with `songpipe run` (it starts an embedded Redis) "
        "or set REDIS_URL=redis://host:6379/0")


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(
        broker_url=broker_url(settings) if settings.redis_url else None,
        task_ignore_result=True,  # our SQL rows are the record; Celery's result backend is not
        task_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True,  # stage writes are idempotent upserts
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE)],
        task_default_queue=CPU_QUEUE,
        task_routes={task_name(stage): {"queue": queue_for(stage)} for stage in STAGES},
        worker_send_task_events=True, task_send_sent_event=True,  # Flower keeps working alongside
        worker_proc_alive_timeout=MODEL_LOAD_ALLOWANCE_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )


app = Celery("songpipe")
configure(app, get_settings())
