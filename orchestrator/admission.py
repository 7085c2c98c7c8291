"""Admission control for new jobs: a cap on queued work and a per-client submission rate.

Both refusals happen before anything is written, answer with Retry-After, and are checked under
one lock so a burst of concurrent submissions cannot overshoot the cap (one web process; behind
several web processes each keeps its own rate window, and the cap may be exceeded by at most
one in-flight submission per process).
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from typing import Iterator

from db.engine import session_scope
from orchestrator.submission import queued_job_count
from tasks.settings import Settings

WINDOW_S = 60.0
QUEUE_FULL_RETRY_AFTER_S = 30


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


class SlidingWindow:
    """Submissions per client in the last WINDOW_S seconds (timestamps, oldest first)."""

    def __init__(self) -> None:
        self._seen: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def retry_after(self, client: str, limit: int, now: float) -> float | None:
        """Seconds until `client` may submit again, or None if it may submit now."""
        seen = self._seen[client]
        while seen and now - seen[0] >= WINDOW_S:
            seen.popleft()
        if len(seen) < limit:
            return None
        return WINDOW_S - (now - seen[0])

    def record(self, client: str, now: float) -> None:
        self._seen[client].append(now)

    def forget_idle(self, now: float) -> None:
        for client in [c for c, seen in self._seen.items() if not seen or now - seen[-1] >= WINDOW_S]:
            del self._seen[client]


_lock = threading.Lock()
_default_window = SlidingWindow()


def _window() -> SlidingWindow:
    """One window per Flask app (each app, e.g. each test's, counts its own clients)."""
    from flask import current_app, has_app_context

    if not has_app_context():
        return _default_window
    return current_app.extensions.setdefault("songpipe.admission", SlidingWindow())


@contextlib.contextmanager
def admitted(settings: Settings, client_id: str | None) -> Iterator[None]:
    """Raise RateLimited or QueueFull, or hold the admission lock while the caller stores the job."""
    client = client_id or "unknown"
    with _lock:
        now = time.monotonic()
        window = _window()
        window.forget_idle(now)
        wait = window.retry_after(client, settings.submissions_per_minute, now)
        if wait is not None:
            raise RateLimited(f"more than {settings.submissions_per_minute} submissions per minute from {client}; "
                              f"try again in {math.ceil(wait)} s", retry_after_s=max(1, math.ceil(wait)))
        with session_scope(settings.resolved_database_url) as session:
            waiting = queued_job_count(session)
        if waiting >= settings.max_queued_jobs:
            raise QueueFull(f"{waiting} jobs are queued or running (limit {settings.max_queued_jobs}); "
                            "try again later")
        window.record(client, now)
        yield
