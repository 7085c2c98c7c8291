"""The batching engine's decisions, as pure code (no torch): whom to admit, when to read back, how far to step.

The engine (gpu_worker/generation/engine.py) owns the device work and the locks; it asks this module
what to do between frame steps. Everything here works on plain records, so the policy is tested
without a model (tests/test_scheduler.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Protocol, TypeVar


class Song(Protocol):
    """What the scheduler reads of a song: its slot-buffer key, prompt length, frames wanted, steps so far."""

    @property
    def key(self) -> Hashable: ...

    @property
    def prompt_length(self) -> int: ...

    @property
    def total(self) -> int: ...

    steps: int
    slot: int


S = TypeVar("S", bound=Song)


def pick_admissions(waiting: deque[S], slots: list[S | None], live: Sequence[S]) -> list[S]:
    """Strict FIFO: take songs from the head of `waiting` into the lowest free slots while they share the
    slot buffers' key (the live songs' key, else the head's). Sets each admitted song's `slot` and
    fills `slots`; a head with another key waits until the live songs have retired."""
    admitted: list[S] = []
    free = [i for i, occupant in enumerate(slots) if occupant is None]
    key = live[0].key if live else (waiting[0].key if waiting else None)
    while waiting and free and waiting[0].key == key:
        song = waiting.popleft()
        song.slot = free.pop(0)
        slots[song.slot] = song
        admitted.append(song)
    return admitted


def must_read_back(live: Sequence[Song], *, admitted: bool, since_sync: int, sync_every: int) -> bool:
    """Read the device flags back before the next step: after an admission, every `sync_every` steps,
    and whenever a song may have reached its last frame (so it retires at once)."""
    return admitted or since_sync >= sync_every or any(song.steps >= song.total - 1 for song in live)


def step_bound(live: Sequence[Song]) -> int:
    """The highest position any live song writes in the next step (after its `steps` was advanced):
    what sets the step's key-length bucket."""
    return max(min(song.prompt_length - 1 + song.steps, song.prompt_length + song.total - 1) for song in live)
