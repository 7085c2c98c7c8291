"""Prometheus metrics: every metric songpipe exports is defined here (docs/metrics.md lists them).

Two kinds:
- Counted in a process (stage durations, queue waits, progress units, GPU memory, broker and
  database errors). Celery's prefork children fork from the worker's main process, so a process
  that sets PROMETHEUS_MULTIPROC_DIR before its first metric is built (tasks/worker_metrics.py
  does, at worker start) writes them to per-process files that its main process serves.
- Read from the SQL record at scrape time (jobs by status, stage attempts by status, reconciler
  re-sends): the record is shared by every process and host, so one query is right everywhere
  and survives restarts. `RecordCollector` does this for the web tier's /metrics.

Metric objects are built on first use (`metrics()`), not at import: the multiprocess choice of
prometheus-client is fixed when the first value is created, and the worker decides it at start.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

NAMESPACE = "songpipe"
# Stages run from a fraction of a second (lyrics rules) to tens of minutes (a long song on a GPU).
STAGE_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class Metrics:
    stage_duration: Histogram
    stage_queue_wait: Histogram
    progress_units: Counter
    units_per_second: Gauge
    gpu_memory_allocated: Gauge
    gpu_memory_reserved: Gauge
    broker_errors: Counter
    database_errors: Counter


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def use_multiprocess_dir(path: str) -> None:
    """Write this process's (and its forked children's) metrics to files under `path`.

    Must run before the first metric value exists; prometheus-client reads the variable when its
    `values` module is imported, so the value class is chosen again here in case it already was.
    """
    if "metrics" in _built:
        raise RuntimeError("metrics were already created in this process; choose the directory first")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        values.ValueClass = values.get_value_class()


_built: dict[str, Metrics] = {}


def metrics() -> Metrics:
    """The process's metric objects (built once)."""
    if "metrics" not in _built:
        from prometheus_client import Counter, Gauge, Histogram

        _built["metrics"] = Metrics(
            stage_duration=Histogram(
                "stage_duration_seconds", "Time from a stage attempt's start to its end, by how it ended.",
                ["stage", "status"], namespace=NAMESPACE, buckets=STAGE_DURATION_BUCKETS),
            stage_queue_wait=Histogram(
                "stage_queue_wait_seconds",
                "Time a stage attempt waited for a worker: from when it could run (queued, or the "
                "previous stage finished) to its start.",
                ["stage"], namespace=NAMESPACE, buckets=QUEUE_WAIT_BUCKETS),
            progress_units=Counter(
                "stage_progress_units", "Units of work done by stages (frames generated, windows decoded).",
                ["stage", "unit"], namespace=NAMESPACE),
            units_per_second=Gauge(
                "stage_units_per_second",
                "Throughput of the stage attempts running now (frames or windows per second); 0 when idle.",
                ["stage", "unit"], namespace=NAMESPACE, multiprocess_mode="livesum"),
            gpu_memory_allocated=Gauge(
                "gpu_memory_allocated_bytes", "CUDA memory held by tensors of this worker's processes.",
                ["device"], namespace=NAMESPACE, multiprocess_mode="livesum"),
            gpu_memory_reserved=Gauge(
                "gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator of this worker's processes.",
                ["device"], namespace=NAMESPACE, multiprocess_mode="livesum"),
            broker_errors=Counter(
                "broker_errors", "Broker operations that failed (publishing a task, looking into the queues).",
                ["operation"], namespace=NAMESPACE),
            database_errors=Counter(
                "database_errors", "Database statements that raised an error, by DBAPI exception class.",
                ["error"], namespace=NAMESPACE),
        )
    return _built["metrics"]


# -- what other modules call -------------------------------------------------------------------

def count_broker_error(operation: str) -> None:
    """A broker operation failed: operation is "publish" (sending a chain) or "inspect" (reading queues)."""
    metrics().broker_errors.labels(operation=operation).inc()


def count_database_error(exc: BaseException) -> None:
    metrics().database_errors.labels(error=type(exc).__name__).inc()


def observe_stage_end(stage: str, status: str, duration_s: float | None, queue_wait_s: float | None) -> None:
    m = metrics()
    if duration_s is not None:
        m.stage_duration.labels(stage=stage, status=status).observe(max(duration_s, 0.0))
    if queue_wait_s is not None:
        m.stage_queue_wait.labels(stage=stage).observe(max(queue_wait_s, 0.0))


def record_progress(stage: str, unit: str, new_units: int, rate_per_s: float | None) -> None:
    m = metrics()
    if new_units > 0:
        m.progress_units.labels(stage=stage, unit=unit).inc(new_units)
    if rate_per_s is not None:
        m.units_per_second.labels(stage=stage, unit=unit).set(rate_per_s)


def record_gpu_memory() -> None:
    """Set the GPU memory gauges from torch; nothing when CUDA was never used in this process (CPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    m = metrics()
    for index in range(torch.cuda.device_count()):
        m.gpu_memory_allocated.labels(device=f"cuda:{index}").set(torch.cuda.memory_allocated(index))
        m.gpu_memory_reserved.labels(device=f"cuda:{index}").set(torch.cuda.memory_reserved(index))


def _on_database_error(context: Any) -> None:
    count_database_error(context.original_exception)


@functools.lru_cache(maxsize=1)
def count_database_errors_of_every_engine() -> None:
    """Count every DBAPI error raised through SQLAlchemy in this process (an Engine class event)."""
    from sqlalchemy import Engine, event

    event.listen(Engine, "handle_error", _on_database_error)


# -- serving -----------------------------------------------------------------------------------

def process_registry() -> CollectorRegistry:
    """What this process (or, in multiprocess mode, its whole process family) has counted."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


class RecordCollector:
    """Jobs, stage attempts and reconciler re-sends, counted in the SQL record at scrape time."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def describe(self) -> list:
        return []  # no collect() at registration time: that would query the database

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from sqlalchemy import func, select

        from db.engine import session_scope
        from db.models import JOB_STATUSES, Job, StageRun

        try:
            with session_scope(self.database_url) as session:
                jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                attempts = session.execute(select(StageRun.stage, StageRun.status, func.count())
                                           .group_by(StageRun.stage, StageRun.status)).all()
                lost = session.execute(select(StageRun.error_type, func.count()).where(StageRun.status == "lost")
                                       .group_by(StageRun.error_type)).all()
        except Exception:  # counted by the engine's error event; the rest of /metrics still answers
            log.exception("metrics: cannot read the job record")
            return
        family = GaugeMetricFamily(f"{NAMESPACE}_jobs", "Jobs in the record, by status.", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], jobs.get(status, 0))
        for status in sorted(set(jobs) - set(JOB_STATUSES)):
            family.add_metric([status], jobs[status])
        yield family
        family = GaugeMetricFamily(f"{NAMESPACE}_stage_attempts", "Stage attempts in the record, by stage and status.",
                                   labels=["stage", "status"])
        for stage, status, count in sorted(attempts):
            family.add_metric([stage, status], count)
        yield family
        resends = CounterMetricFamily(
            f"{NAMESPACE}_reconciler_resends", "Stage attempts the reconciler marked lost and sent again, by reason.",
            labels=["reason"])
        for reason, count in sorted((r or "unknown", c) for r, c in lost):
            resends.add_metric([reason], count)
        yield resends


def exposition(registries: list[CollectorRegistry]) -> bytes:
    """The text format of several registries, concatenated (their metric names do not overlap)."""
    from prometheus_client import generate_latest

    return b"".join(generate_latest(registry) for registry in registries)
