"""Admission control for new jobs: a cap on queued work and a per-client submission rate.

Both refusals happen before anything is written and answer with Retry-After. Nothing is held
while the job is committed or its chain is published: a slow broker delays only the submission
that is waiting on it (code-review H1). The price is that concurrent submissions may overshoot
`max_queued_jobs` by the number in flight at once (bounded by the web server's threads), which a
soft back-pressure cap tolerates.

The rate window lives in the stack's Redis (the `limits` library that Flask-Limiter is built on,
with its moving-window strategy), so every web process and host shares one count per client.
Without a broker configured (in-process tests, a development shell) it falls back to memory;
production mode refuses that, since each process would then count on its own.
"""
from __future__ import annotations

import logging
import math
import time

from flask import Flask, current_app
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from db.engine import session_scope
from orchestrator.submission import queued_job_count
from tasks.metrics import count_broker_error
from tasks.settings import Settings

log = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 30
EXTENSION = "songpipe.admission"


class QueueFull(Exception):
    """Too much work is already queued or running: 503, try again later."""

    status = 503
    field = "body"

    def __init__(self, message: str, retry_after_s: int = QUEUE_FULL_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(QueueFull):
    """This client submitted too often: 429 with the seconds until its window frees a slot."""

    status = 429
    field = "client"


class RateStorageRequired(RuntimeError):
    pass


def limits_storage_uri(redis_url: str) -> str:
    """The broker URL as a `limits` storage URI (the embedded Redis' socket form is redis+unix)."""
    if redis_url.startswith("redis+socket://"):
        return "redis+unix://" + redis_url.removeprefix("redis+socket://")
    if redis_url.startswith("unix://"):
        return "redis+unix://" + redis_url.removeprefix("unix://")
    return redis_url


def rate_storage(settings: Settings) -> Storage:
    """Redis when a broker is configured; memory only outside production."""
    if settings.redis_url:
        storage = storage_from_string(limits_storage_uri(settings.redis_url))
        assert isinstance(storage, Storage)  # a synchronous scheme (redis://, redis+unix://)
        return storage
    if settings.mode == "production":
        raise RateStorageRequired("production mode needs REDIS_URL: the per-client submission limit is kept in "
                                  "Redis so that every web process shares it")
    return MemoryStorage()


class Admission:
    """The per-app admission state: the rate limiter over its storage, and the configured limits."""

    def __init__(self, settings: Settings, storage: Storage, key_prefix: str):
        self.settings = settings
        self.limiter = MovingWindowRateLimiter(storage)
        self.rate = RateLimitItemPerMinute(settings.submissions_per_minute, namespace=f"{key_prefix}:submit")

    def check_queue(self) -> None:
        """Raise QueueFull when the cap is reached (a count, no lock held)."""
        settings = self.settings
        with session_scope(settings.resolved_database_url) as session:
            waiting = queued_job_count(session)
        if waiting >= settings.max_queued_jobs:
            raise QueueFull(f"{waiting} jobs are queued or running (limit {settings.max_queued_jobs}); "
                            "try again later")

    def take_slot(self, client: str) -> None:
        """Count one submission for `client` atomically in the storage, or raise RateLimited."""
        try:
            if self.limiter.hit(self.rate, client):
                return
        except (RedisError, OSError) as exc:
            # the job is stored in SQL and the reconciler sends it once the broker is back: a broker
            # outage must not refuse submissions, so the per-client limit is not enforced meanwhile
            log.warning("submission rate storage unreachable (%s); admitting %s without a rate check", exc, client)
            count_broker_error("rate_limit")
            return
        reset_at, _remaining = self.limiter.get_window_stats(self.rate, client)
        wait = max(1, math.ceil(reset_at - time.time()))
        raise RateLimited(f"more than {self.settings.submissions_per_minute} submissions per minute from {client}; "
                          f"try again in {wait} s", retry_after_s=wait)


def init_admission(app: Flask, settings: Settings) -> Admission:
    # one key prefix per database: stacks sharing one Redis (tests) do not share client windows
    admission = Admission(settings, rate_storage(settings), key_prefix=f"songpipe:{_database_tag(settings)}")
    app.extensions[EXTENSION] = admission
    return admission


def _database_tag(settings: Settings) -> str:
    import hashlib

    return hashlib.sha256(settings.resolved_database_url.encode()).hexdigest()[:12]


def admit(client_id: str | None) -> None:
    """Raise QueueFull or RateLimited, or return with the client's slot taken. Nothing stays held."""
    admission: Admission = current_app.extensions[EXTENSION]
    admission.check_queue()  # first: a full queue does not use up the client's rate
    admission.take_slot(client_id or "unknown")
