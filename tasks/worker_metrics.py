"""A worker's /metrics: multiprocess files, an HTTP server in the main process, stage-end observations.

Imported by the worker entry points (tasks/cpu_worker.py, gpu_worker/worker/celery_worker.py); it only
connects Celery signals, so importing it elsewhere changes nothing.

- worker_init (main process, before the pool forks): when SONGPIPE_METRICS_PORT is set, a fresh
  multiprocess directory under the data dir, and prometheus-client's HTTP server on that port
  serving every process of this worker. Unset or 0: no server and no files (the default; tests
  that want metrics set a port).
- task_postrun (the process that ran the stage): the attempt's duration and queue wait, read
  from its StageRun row, so the metric and the record agree.
- stage hook "progress": units done and the current rate; GPU memory when CUDA is in use.
- worker_process_shutdown: the child's live gauges are dropped (mark_process_dead).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import (
    task_postrun,
    worker_init,
    worker_process_shutdown,
    worker_shutdown,
)

from db.status import STAGE_DONE
from tasks import metrics
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

_server: dict[str, Any] = {}


def worker_metrics_dir(settings: Settings, pid: int | None = None) -> Path:
    """One directory per worker main process: two workers on one host never share files."""
    return settings.data_dir / "prometheus" / f"worker-{pid or os.getpid()}"


def _remove_dirs_of_dead_workers(parent: Path) -> None:
    for path in parent.glob("worker-*"):
        try:
            os.kill(int(path.name.removeprefix("worker-")), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def start_worker_metrics_server(port: int, host: str = "127.0.0.1", settings: Settings | None = None) -> int:
    """Serve this worker's metrics (all its processes) on host:port; returns the bound port."""
    from prometheus_client import start_http_server

    settings = settings or get_settings()
    path = worker_metrics_dir(settings)
    _remove_dirs_of_dead_workers(path.parent)
    shutil.rmtree(path, ignore_errors=True)  # cleared at start: counters restart with the worker
    path.mkdir(parents=True)
    metrics.use_multiprocess_dir(str(path))
    metrics.count_database_errors_of_every_engine()
    server, thread = start_http_server(port, addr=host, registry=metrics.process_registry())
    _server.update(server=server, thread=thread, path=path)
    bound = server.server_address[1]
    log.info("metrics: serving http://%s:%s/metrics from %s", host, bound, path)
    return bound


@worker_init.connect
def _start_server(**_kwargs: Any) -> None:
    settings = get_settings()
    if settings.metrics_port:
        try:
            start_worker_metrics_server(settings.metrics_port, settings.metrics_host, settings)
        except OSError as exc:
            # Celery logs and ignores exceptions of signal handlers; SystemExit stops the worker
            raise SystemExit(f"songpipe worker: cannot serve metrics on {settings.metrics_host}:"
                             f"{settings.metrics_port}: {exc}") from exc


@worker_shutdown.connect
def _stop_server(**_kwargs: Any) -> None:
    server = _server.pop("server", None)
    if server is not None:
        server.shutdown()
        shutil.rmtree(_server.pop("path"), ignore_errors=True)


@worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_kwargs: Any) -> None:
    if _enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def _enabled() -> bool:
    # started in the main process before the pool forks, so prefork children see it too
    return "server" in _server


# -- stage ends --------------------------------------------------------------------------------

_observed: set[tuple[str, str, int]] = set()  # a redelivered message must not be observed twice
_observed_lock = threading.Lock()
OBSERVED_KEYS_KEPT = 10_000


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value  # SQLite returns naive UTC


def observe_attempt(database_url: str, job_id: str, stage: str, attempt: int) -> bool:
    """Observe one ended attempt run by this process from its row; False when there is nothing to observe."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import StageRun
    from tasks.contracts import STAGES

    key = (job_id, stage, attempt)
    with _observed_lock:
        if key in _observed:
            return False
    with session_scope(database_url) as session:
        row = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                                    StageRun.attempt == attempt))
        if row is None or row.worker_pid != os.getpid() or row.started_at is None or row.finished_at is None:
            return False  # another process ran it (or it never started here)
        ready = _aware(row.queued_at)
        index = STAGES.index(stage)
        if index > 0:  # a later stage's row exists from submission on; it can run once the previous ended
            previous = session.scalar(select(StageRun.finished_at).where(
                StageRun.job_id == job_id, StageRun.stage == STAGES[index - 1],
                StageRun.status.in_(STAGE_DONE)).order_by(StageRun.attempt.desc()).limit(1))
            if previous is not None:
                ready = max(ready, _aware(previous))
        started, finished = _aware(row.started_at), _aware(row.finished_at)
        duration = row.duration_s if row.duration_s is not None else (finished - started).total_seconds()
        wait = (started - ready).total_seconds()
        status = row.status
    metrics.observe_stage_end(stage, status, duration, wait)
    with _observed_lock:
        if len(_observed) >= OBSERVED_KEYS_KEPT:
            _observed.clear()
        _observed.add(key)
    return True


def _job_and_attempt(args: Any, kwargs: Any) -> tuple[str, int] | None:
    args, kwargs = list(args or ()), dict(kwargs or {})
    job_id = kwargs.get("job_id", args[0] if args else None)
    attempt = kwargs.get("attempt", args[1] if len(args) > 1 else None)
    if isinstance(job_id, str) and isinstance(attempt, int):
        return job_id, attempt
    return None


@task_postrun.connect
def _stage_ended(sender: Any = None, args: Any = None, kwargs: Any = None, **_kw: Any) -> None:
    if not _enabled():
        return
    name = getattr(sender, "name", "") or ""
    if not name.startswith("songpipe."):
        return
    stage = name.removeprefix("songpipe.")
    found = _job_and_attempt(args, kwargs)
    try:
        if found is not None:
            job_id, attempt = found
            observe_attempt(get_settings().resolved_database_url, job_id, stage, attempt)
        _running_units.pop((found or ("", 0)) + (stage,), None)
        _started.pop((found or ("", 0)) + (stage,), None)
        for unit in _units_seen.get(stage, ()):
            metrics.metrics().units_per_second.labels(stage=stage, unit=unit).set(0)
        metrics.record_gpu_memory()
    except Exception:  # metrics never fail a stage
        log.exception("metrics: could not observe the end of %s", name)


# -- progress ----------------------------------------------------------------------------------

_running_units: dict[tuple[str, int, str], int] = {}  # units already counted per running attempt
_units_seen: dict[str, set[str]] = {}
_started: dict[tuple[str, int, str], float] = {}  # monotonic start of each running attempt


def _on_progress(ctx: Any, event: str, info: dict) -> None:
    if not _enabled():
        return
    key = (ctx.job_id, ctx.attempt, ctx.stage)
    if event == "start":
        _started[key] = time.monotonic()
        return
    if event != "progress":
        return
    try:
        done, unit = int(info.get("done") or 0), str(info.get("unit") or "units")
        counted = _running_units.get(key, 0)
        elapsed = time.monotonic() - _started.get(key, time.monotonic())
        rate = done / elapsed if elapsed > 0 else None
        metrics.record_progress(ctx.stage, unit, done - counted, rate)
        _running_units[key] = max(done, counted)
        _units_seen.setdefault(ctx.stage, set()).add(unit)
        metrics.record_gpu_memory()
    except Exception:
        log.exception("metrics: could not record progress of %s", getattr(ctx, "stage", "?"))


def _register_progress_hook() -> None:
    from tasks.recording import add_stage_hook

    add_stage_hook(_on_progress)


_register_progress_hook()
