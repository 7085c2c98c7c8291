"""The Celery application: built from Settings on demand, configured nowhere at import.

`app` is the one app the stage tasks register on (`@app.task`); its configuration is a lazy
default that is evaluated only when something first reads `app.conf` (a worker starting, a task
being sent), from the settings of that moment and the broker that `tasks.broker` resolves.
Entry points that know their settings call `configure(app, settings)` (or `make_celery(settings)`
for a throwaway app, such as a ping probe) explicitly. An app with no broker gets a transport that
refuses to connect: nothing ever falls back to Celery's default amqp://localhost.
design.md section 4 explains each value.
"""
from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from tasks import kombu_redis
from tasks.broker import UNCONFIGURED_URL, BrokerNotConfigured, resolve_broker_url
from tasks.contracts import GPU_STAGES, STAGES
from tasks.settings import Settings, get_settings
from tasks.time_limits import broker_transport_options

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"
CHILD_INIT_ALLOWANCE_S = 300
__all__ = [
    "CPU_QUEUE",
    "GPU_QUEUE",
    "BrokerNotConfigured",
    "app",
    "broker_url",
    "celery_config",
    "configure",
    "make_celery",
    "queue_for",
    "task_name",
]


def task_name(stage: str) -> str:
    return f"songpipe.{stage}"


def queue_for(stage: str) -> str:
    return GPU_QUEUE if stage in GPU_STAGES else CPU_QUEUE


def broker_url(settings: Settings) -> str:
    """The broker every process of this deployment uses (tasks.broker.resolve_broker_url)."""
    return resolve_broker_url(settings)


def celery_config(settings: Settings, *, broker: str | None = None) -> dict[str, Any]:
    if broker is None:
        try:
            broker = resolve_broker_url(settings)
        except BrokerNotConfigured:
            broker = UNCONFIGURED_URL
    return dict(  # noqa: C408 - keyword form reads like the Celery docs
        broker_url=broker,
        task_ignore_result=True,  # our SQL rows are the record; Celery's result backend is not
        task_serializer="json", accept_content=["json"],
        # a lost task is re-sent by the reconciler after its lease (SQL fences the copy); acks_late
        # additionally lets Redis re-deliver a message whose worker died before acknowledging it
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_transport_options(settings),
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE)],
        task_default_queue=CPU_QUEUE,
        task_routes={task_name(stage): {"queue": queue_for(stage)} for stage in STAGES},
        worker_send_task_events=True, task_send_sent_event=True,  # Flower keeps working alongside
        # worker_process_init loads the CPU worker's embedding model before the child reports alive
        worker_proc_alive_timeout=CHILD_INIT_ALLOWANCE_S,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker outage of any length: keep trying, never exit
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )


def configure(app: Celery, settings: Settings, *, broker: str | None = None) -> None:
    app.conf.update(celery_config(settings, broker=broker))


def make_celery(settings: Settings, name: str = "songpipe", *, broker: str | None = None) -> Celery:
    """A new app configured from `settings` (probes, tests); stage tasks live on `app`."""
    new = Celery(name, set_as_current=False)
    configure(new, settings, broker=broker)
    return new


kombu_redis.register()  # the redis:// transport with the reconnect fix (tasks/kombu_redis.py)
app = Celery("songpipe")
# evaluated when app.conf is first read, not now (importing this module configures nothing)
app.add_defaults(lambda: celery_config(get_settings()))


def use_broker(settings: Settings, *, check_reachable: bool = True) -> Settings:
    """For every command and process that sends or inspects: resolve the broker (tasks.broker),
    check that it answers, configure `app` to it, and return settings naming it.

    Raises BrokerNotConfigured or BrokerUnreachable with a one-line message that names the address
    tried and how to set REDIS_URL (the CLI prints it as is, without a traceback).
    """
    from tasks.broker import require_reachable

    url = resolve_broker_url(settings)
    if check_reachable:
        require_reachable(url)
    configure(app, settings, broker=url)
    return settings.model_copy(update={"redis_url": url})
