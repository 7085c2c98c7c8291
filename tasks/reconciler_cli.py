"""`songpipe reconcile`: the reconcile loop as its own small process (a Procfile line).

Registered on the main CLI with `main.add_command(reconcile)`; also runnable as
`python -m tasks.reconciler_cli` (the test harness and bench/chaos.py start it that way).
"""
from __future__ import annotations

import logging
import signal
import threading

import click


@click.command("reconcile")
@click.option("--interval", "interval_s", type=float, default=None,
              help="seconds between passes (default: twice SONGPIPE_HEARTBEAT_S)")
@click.option("--once", is_flag=True, help="run one pass, print what it did, and exit")
def reconcile(interval_s: float | None, once: bool) -> None:
    """Re-send stage attempts whose worker or broker message was lost (SQL is the source of truth)."""
    from orchestrator.stack import use_embedded_redis_if_running
    from tasks.celery_app import BrokerNotConfigured, app, broker_url, configure
    from tasks.reconciler import reconcile_once, run_forever
    from tasks.settings import get_settings, reset_settings_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reset_settings_cache()
    settings = use_embedded_redis_if_running(get_settings())
    try:
        broker_url(settings)
    except BrokerNotConfigured as exc:
        raise click.ClickException(str(exc)) from None
    configure(app, settings)
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
