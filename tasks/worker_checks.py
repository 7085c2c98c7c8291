"""Checks every worker runs at start (a broker is known, the schema is current), and per-child setup.

The start check raises SystemExit, not an ordinary exception: Celery's Signal.send catches every
Exception raised by a `worker_init` handler and carries on (the worker would log "ready" and
consume on an old schema); SystemExit is a BaseException and ends the worker with our message.
"""
import sys

from celery.signals import celeryd_after_setup, worker_init, worker_process_init, worker_shutdown, worker_shutting_down

from db.engine import configure_pool, dispose_engines
from db.schema import SchemaOutOfDateError, require_current_schema
from tasks.broker import BrokerNotConfigured
from tasks.celery_app import broker_url
from tasks.settings import get_settings
from tasks.worker_stop import clear_stopping, mark_stopping

REFUSED_EXIT = 3  # the supervisor does not restart a worker that refused to start (it would refuse again)


def refuse_to_start(message: str) -> None:
    print(f"songpipe worker: {message}", file=sys.stderr, flush=True)
    raise SystemExit(REFUSED_EXIT)


def check_before_start() -> None:
    settings = get_settings()
    refusal = settings.fault_injection_refusal()
    if refusal is not None:
        refuse_to_start(refusal)
    try:
        broker_url(settings)
        require_current_schema(settings.resolved_database_url)
    except (BrokerNotConfigured, SchemaOutOfDateError) as exc:
        refuse_to_start(str(exc))


@worker_init.connect
def _check_before_start(sender=None, **_kwargs) -> None:
    check_before_start()
    clear_stopping(get_settings())  # a marker left by a killed process of the same pid
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        configure_pool(concurrency)  # task threads and their heartbeats share this process's pool


@worker_shutting_down.connect
def _tell_running_stages(**_kwargs) -> None:
    # the pool children are not signalled on a warm shutdown: they find this marker at their next check
    mark_stopping(get_settings())


@worker_shutdown.connect
def _forget_stopping(**_kwargs) -> None:
    clear_stopping(get_settings())


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # a forked child must not share the parent's database sockets
    dispose_engines()


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs) -> None:
    # stage rows then name the worker node (gpu1@host), which tells GPU workers on one host apart
    from tasks import recording

    recording.WORKER_NAME = sender
