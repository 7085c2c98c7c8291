"""A lock whose waiters get their turn by priority: the GPU worker's codec, shared by the songs' decodes.

Beside many songs, windows queue for the codec. A song's first window is its first sound, while a song
already playing has a window's worth of audio buffered, so the codec goes to the lowest window index first
(`codec_turn(priority=w)`); equal priorities keep their arrival order.

A waiter may also be held back until a deadline while the lock's `holding()` says so: a later window waits
while another song's first sound is still being made, so the codec does not slow that song's frames
(batching.codec_turn says when, and for how long at most).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

_Ticket = tuple[int, int, float | None]  # (priority, arrival, held back until this monotonic time or None)


class PriorityTurns:
    """One holder at a time; `acquire(p)` waits until no one holds it and no waiter is ahead of it
    (a lower priority number, or the same number sooner) other than waiters that are held back."""

    def __init__(self, holding: Callable[[], bool] | None = None, poll_s: float = 0.1) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._waiting: list[_Ticket] = []
        self._arrivals = itertools.count()
        self._holding = holding
        self._poll_s = poll_s  # how often held-back waiters look at `holding()` again

    def acquire(self, priority: int = 0, held_until: float | None = None) -> None:
        """Wait for the turn. With `held_until`, the waiter also lets others go first, and does not take the
        turn itself, while `holding()` is true, until that monotonic time."""
        with self._cond:
            ticket = (priority, next(self._arrivals), held_until)
            self._waiting.append(ticket)
            while self._held or self._next() != ticket:
                self._cond.wait(self._poll_s if self._may_hold() else None)
            self._waiting.remove(ticket)
            self._held = True
            self._cond.notify_all()  # the order of the others may have changed

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of a turn nobody holds")
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> list[int]:
        """The waiters' priorities, in the order they would get their turns if none were held back."""
        with self._cond:
            return [p for p, _, _ in sorted(self._waiting)]

    @contextlib.contextmanager
    def turn(self, priority: int = 0, held_until: float | None = None) -> Iterator[None]:
        self.acquire(priority, held_until)
        try:
            yield
        finally:
            self.release()

    def _may_hold(self) -> bool:
        return self._holding is not None and any(until is not None for _, _, until in self._waiting)

    def _next(self) -> _Ticket | None:
        """The waiter whose turn it is: the first in order that is not held back."""
        now = time.monotonic()
        in_order = sorted(self._waiting)
        if any(until is not None and now < until for _, _, until in in_order) \
                and self._holding is not None and self._holding():
            in_order = [t for t in in_order if t[2] is None or now >= t[2]]
        return in_order[0] if in_order else None
