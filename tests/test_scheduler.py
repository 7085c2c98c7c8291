"""The batching engine's scheduling policy (gpu_worker/generation/scheduler.py), without torch or a model."""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gpu_worker.generation import scheduler


@dataclass(eq=False)
class Song:
    key: int = 1
    prompt_length: int = 10
    total: int = 100
    steps: int = 0
    slot: int = -1


def test_admission_is_strict_fifo_into_the_lowest_free_slots():
    first, second, third = Song(), Song(), Song()
    occupied = Song(slot=1)
    slots: list[Song | None] = [None, occupied, None]
    waiting = deque([first, second, third])
    assert scheduler.pick_admissions(waiting, slots, [occupied]) == [first, second]
    assert (first.slot, second.slot) == (0, 2) and slots == [first, occupied, second]
    assert list(waiting) == [third]  # no free slot left: it waits, still first in line
    assert scheduler.pick_admissions(waiting, slots, [first, occupied, second]) == []


def test_a_song_for_other_slot_buffers_waits_until_the_live_songs_retire_and_nobody_overtakes_it():
    live = Song(key=1, slot=0)
    other, same = Song(key=2), Song(key=1)
    slots: list[Song | None] = [live, None, None]
    waiting = deque([other, same])
    assert scheduler.pick_admissions(waiting, slots, [live]) == []  # FIFO: `same` does not jump the queue
    slots[0] = None
    assert scheduler.pick_admissions(waiting, slots, []) == [other]  # the head's key rebuilds the buffers
    assert list(waiting) == [same]


def test_read_backs_come_after_admissions_every_sync_interval_and_when_a_song_may_end():
    running = [Song(total=100, steps=10), Song(total=50, steps=20)]
    assert not scheduler.must_read_back(running, admitted=False, since_sync=3, sync_every=25)
    assert scheduler.must_read_back(running, admitted=True, since_sync=0, sync_every=25)
    assert scheduler.must_read_back(running, admitted=False, since_sync=25, sync_every=25)
    running[1].steps = 49  # its last frame may be out: retire it at once, not up to 24 steps later
    assert scheduler.must_read_back(running, admitted=False, since_sync=1, sync_every=25)


def test_the_step_bound_is_the_furthest_position_written_capped_at_each_songs_last():
    songs = [Song(prompt_length=300, total=100, steps=5), Song(prompt_length=40, total=20, steps=90)]
    assert scheduler.step_bound(songs) == 304  # the second song is capped at 40 + 20 - 1 = 59
    songs[0].steps = 500
    assert scheduler.step_bound(songs) == 399


def test_the_scheduler_imports_no_torch():
    source = Path(scheduler.__file__).read_text()
    modules = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] in ("torch", "numpy", "triton") for name in modules), modules
