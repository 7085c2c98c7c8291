"""`songpipe reconcile`: the reconcile loop as its own small process (a Procfile line).

Registered on the main CLI with `main.add_command(reconcile)`; also runnable as
`python -m tasks.reconciler_cli` (the test harness and bench/chaos.py start it that way).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

import click

REFUSED_EXIT = 3  # as tasks.worker_checks: the supervisor does not restart a refusal


@click.command("reconcile")
@click.option("--interval", "interval_s", type=float, default=None,
              help="seconds between passes (default: twice SONGPIPE_HEARTBEAT_S)")
@click.option("--once", is_flag=True, help="run one pass, print what it did, and exit")
def reconcile(interval_s: float | None, once: bool) -> None:
    """Re-send stage attempts whose worker or broker message was lost (SQL is the source of truth)."""
    from db.schema import SchemaOutOfDateError, require_current_schema
    from tasks.broker import BrokerNotConfigured, BrokerUnreachable
    from tasks.celery_app import use_broker
    from tasks.reconciler import reconcile_once, run_forever
    from tasks.settings import get_settings, reset_settings_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reset_settings_cache()
    try:
        # an unreachable broker is not fatal: each pass skips what needs it and tries again
        settings = use_broker(get_settings(), check_reachable=False)
        require_current_schema(settings.resolved_database_url)
    except (BrokerNotConfigured, BrokerUnreachable, SchemaOutOfDateError) as exc:
        click.echo(f"songpipe reconcile: {exc}", err=True)
        sys.exit(REFUSED_EXIT)
    if once:
        for decision in reconcile_once(settings):
            click.echo(f"job {decision.job_id} {decision.stage} #{decision.attempt}: {decision.action} - "
                       f"{decision.reason}")
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"reconciler: watching {settings.resolved_database_url} and {settings.redis_url}")
    run_forever(settings, interval_s=interval_s, stop=stop, echo=click.echo)


if __name__ == "__main__":
    reconcile()
