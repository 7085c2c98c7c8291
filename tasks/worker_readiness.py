"""Which worker processes have their models loaded, kept in Redis so the song page can say why a
queued job waits ("waiting for a CPU worker: loading the tag model").

Each worker process reports `loading` before it loads its models and `ready` after; the record is a
Redis hash per queue, field "<hostname>:<pid>", value JSON {state, what, at}. Entries older than
STALE_S are ignored (a process that died without saying so). Readiness reporting never fails a
worker: without a reachable Redis the page just cannot say more than "queued".
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from tasks.settings import Settings

log = logging.getLogger(__name__)

STALE_S = 6 * 3600
KEY = "songpipe:worker-readiness:{queue}"


def _client(settings: Settings):
    if not settings.redis_url:
        return None
    import redis

    return redis.Redis.from_url(settings.redis_url.replace("redis+socket://", "unix://"), socket_timeout=2,
                                socket_connect_timeout=2)


def report(settings: Settings, queue: str, state: str, what: str) -> None:
    """Record this process's state ('loading' or 'ready') and what it is loading or has loaded."""
    try:
        client = _client(settings)
        if client is None:
            return
        field = f"{socket.gethostname()}:{os.getpid()}"
        client.hset(KEY.format(queue=queue), field, json.dumps({"state": state, "what": what, "at": time.time()}))
        client.expire(KEY.format(queue=queue), STALE_S)
    except Exception as exc:  # noqa: BLE001 - reporting must never stop a worker
        log.warning("could not report worker readiness to Redis: %s", exc)


def states(settings: Settings, queue: str) -> list[dict[str, Any]]:
    try:
        client = _client(settings)
        raw = client.hgetall(KEY.format(queue=queue)) if client is not None else {}
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read worker readiness from Redis: %s", exc)
        return []
    now = time.time()
    entries = [json.loads(value) for value in raw.values()]
    return [entry for entry in entries if now - entry.get("at", 0) < STALE_S]


def describe_wait(queue: str, settings: Settings) -> str:
    """One sentence for a job queued on `queue` that no worker has picked up yet."""
    entries = states(settings, queue)
    label = queue.upper()
    ready = [e for e in entries if e["state"] == "ready"]
    loading = [e for e in entries if e["state"] == "loading"]
    if ready:
        return f"waiting for a free {label} worker ({len(ready)} ready)"
    if loading:
        return f"waiting for a {label} worker: loading {loading[0]['what']}"
    return f"waiting for a {label} worker: none has reported in yet (is `songpipe worker {queue}` running?)"


def warm_up_cpu_process(settings: Settings) -> None:
    """The CPU worker's per-process warm-up: load the tag model (when it is the default backend),
    saying so in Redis before and after. Call it from worker_process_init."""
    if settings.default_tags_backend == "embedding":
        report(settings, "cpu", "loading", "the tag model")
        from tasks.embedding_tagger import warm_up

        seconds = warm_up()
        report(settings, "cpu", "ready", f"the tag model (loaded in {seconds:.0f} s)")
    else:
        report(settings, "cpu", "ready", "no model needed")
