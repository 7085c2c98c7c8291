"""The workers and queues page: live Celery workers, queue lengths, and what each GPU worker holds.

Live facts come from Celery's remote control (ping, active, reserved, stats: four broadcasts run
in parallel, ~1 s in all) and from Redis (tasks.broker.queue_lengths: LLEN of the "cpu" and "gpu" lists). What a GPU worker
runs on (device name, memory, loaded model checksums) and its last heartbeat come from SQL: each
stage attempt records its worker's environment snapshot, so the newest row per (host, queue) is
the newest known state of that worker - also for a worker that is down right now.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import StageRun
from tasks.celery_app import CPU_QUEUE, GPU_QUEUE
from tasks.settings import Settings

INSPECT_TIMEOUT_S = 1.0


def celery_inspect(timeout: float = INSPECT_TIMEOUT_S) -> dict[str, Any]:
    from tasks.celery_app import app

    inspector = app.control.inspect(timeout=timeout)
    calls = {"ping": inspector.ping, "active": inspector.active, "reserved": inspector.reserved,
             "stats": inspector.stats, "active_queues": inspector.active_queues}
    results: dict[str, Any] = {}
    errors: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=timeout + 5) or {}
            except Exception as exc:  # broker down or unreachable: the page says so instead of failing
                results[name] = {}
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
    nodes = sorted(set().union(*(set(r) for r in results.values())))
    workers = []
    for node in nodes:
        stats = results["stats"].get(node, {})
        workers.append({
            "name": node,
            "host": node.split("@", 1)[-1],
            "alive": node in results["ping"],
            "queues": sorted(q["name"] for q in results["active_queues"].get(node, [])
                             if isinstance(q, dict) and isinstance(q.get("name"), str)),
            "active": results["active"].get(node, []),
            "reserved": results["reserved"].get(node, []),
            "pid": stats.get("pid"),
            "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
            "processes": (stats.get("pool") or {}).get("processes"),
            "total_tasks": stats.get("total"),
            "uptime_s": stats.get("uptime"),
        })
    return {"workers": workers, "errors": errors}


def queue_lengths(settings: Settings) -> dict[str, Any]:
    from tasks.broker import BrokerNotConfigured, resolve_broker_url
    from tasks.broker import queue_lengths as broker_queue_lengths

    try:
        url = resolve_broker_url(settings)
        return {"error": None, "queues": broker_queue_lengths(url, (CPU_QUEUE, GPU_QUEUE))}
    except BrokerNotConfigured as exc:
        return {"error": str(exc), "queues": {}}
    except Exception as exc:  # noqa: BLE001 - broker down: the page says so instead of failing
        return {"error": f"{type(exc).__name__}: {exc}", "queues": {}}


def recorded_workers(session: Session) -> list[dict[str, Any]]:
    """Newest environment snapshot and heartbeat per (worker host, queue), from the stage rows."""
    # max(id) alone is answered from the (worker_hostname, queue, id) index without a table scan
    latest = (select(StageRun.worker_hostname, StageRun.queue, func.max(StageRun.id).label("last_id"))
              .where(StageRun.worker_hostname.is_not(None))
              .group_by(StageRun.worker_hostname, StageRun.queue)).subquery()
    rows = session.execute(
        select(latest.c.worker_hostname, latest.c.queue, StageRun.heartbeat_at.label("last_heartbeat"),
               StageRun.environment,
               StageRun.worker_pid, StageRun.stage, StageRun.status, StageRun.job_id, StageRun.finished_at)
        .join(StageRun, StageRun.id == latest.c.last_id)
        .order_by(latest.c.queue, latest.c.worker_hostname))
    out = []
    for row in rows:
        env = row.environment or {}
        out.append({
            "host": row.worker_hostname, "queue": row.queue, "last_heartbeat": row.last_heartbeat,
            "pid": row.worker_pid, "last_stage": row.stage, "last_status": row.status, "last_job": row.job_id,
            "device": env.get("device"), "gpu_name": env.get("gpu_name"),
            "gpu_memory_total": env.get("gpu_memory_total"), "gpu_memory_allocated": env.get("gpu_memory_allocated"),
            "gpu_memory_reserved": env.get("gpu_memory_reserved"), "driver": env.get("driver"),
            "torch": env.get("torch"), "cuda_runtime": env.get("cuda_runtime"),
            "model_checksums": env.get("model_checksums") or {}, "code_version": env.get("code_version"),
            "tiny_checkpoint": env.get("tiny_checkpoint"),
        })
    return out


def workers_overview(session: Session, settings: Settings, *, live: bool = True) -> dict[str, Any]:
    live_info = celery_inspect() if live and settings.redis_url else {
        "workers": [], "errors": [] if live else ["live inspection skipped"]}
    if live and not settings.redis_url:
        live_info["errors"].append("no broker configured (REDIS_URL unset)")
    return {"live": live_info, "queues": queue_lengths(settings), "recorded": recorded_workers(session)}
