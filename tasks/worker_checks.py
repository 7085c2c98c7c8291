"""Checks every worker runs at start: a broker is configured and the schema is current."""
from celery.signals import celeryd_after_setup, worker_init, worker_process_init

from db.engine import dispose_engines
from db.schema import require_current_schema
from tasks.celery_app import broker_url
from tasks.settings import get_settings


@worker_init.connect
def _check_before_start(**_kwargs) -> None:
    settings = get_settings()
    broker_url(settings)
    require_current_schema(settings.resolved_database_url)


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    # a forked child must not share the parent's database sockets
    dispose_engines()


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs) -> None:
    # stage rows then name the worker node (gpu1@host), which tells GPU workers on one host apart
    from tasks import recording

    recording.WORKER_NAME = sender
