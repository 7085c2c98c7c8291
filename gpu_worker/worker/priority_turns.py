"""A lock whose waiters get their turn by priority: the GPU worker's codec, shared by the songs' decodes.

Beside many songs, windows queue for the codec. A song's first window is its first sound, while a song
already playing has a window's worth of audio buffered, so the codec goes to the lowest window index first
(`codec_turn(priority=w)`); equal priorities keep their arrival order.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from collections.abc import Iterator


class PriorityTurns:
    """One holder at a time; `acquire(p)` waits until no one holds it and no waiter is ahead of it
    (a lower priority number, or the same number sooner)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, arrival)
        self._arrivals = itertools.count()

    def acquire(self, priority: int = 0) -> None:
        with self._cond:
            ticket = (priority, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            while self._held or self._waiting[0] != ticket:
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._held = True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of a turn nobody holds")
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> list[int]:
        """The waiters' priorities, in the order they will get their turns."""
        with self._cond:
            return [p for p, _ in sorted(self._waiting)]

    @contextlib.contextmanager
    def turn(self, priority: int = 0) -> Iterator[None]:
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()
