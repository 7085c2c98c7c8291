"""The codec's turns: one holder, waiters served lowest priority number first, ties in arrival order."""
from __future__ import annotations

import threading
import time

import pytest

from gpu_worker.worker import batching
from gpu_worker.worker.priority_turns import PriorityTurns
from tests.stack_fixtures import wait_until


def _queue_waiters(turns: PriorityTurns, priorities: list[int], enter) -> tuple[list[threading.Thread], list[str]]:
    """One thread per priority, started one after another (so arrival order is the list's order); each records
    its label when it gets its turn."""
    order: list[str] = []
    threads = []
    for i, priority in enumerate(priorities):
        label = f"p{priority}#{i}"

        def waiter(priority: int = priority, label: str = label) -> None:
            with enter(priority):
                order.append(label)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(lambda n=i + 1: len(turns.waiting()) == n, 10, f"waiter {i} queued", interval_s=0.005)
    return threads, order


def test_waiters_get_their_turns_lowest_priority_first_and_ties_in_arrival_order():
    turns = PriorityTurns()
    turns.acquire(5)
    threads, order = _queue_waiters(turns, [3, 0, 1, 0], turns.turn)
    assert turns.waiting() == [0, 0, 1, 3]
    turns.release()
    for thread in threads:
        thread.join(10)
    assert order == ["p0#1", "p0#3", "p1#2", "p3#0"]
    assert not turns.locked()


def test_a_turn_nobody_holds_cannot_be_released():
    with pytest.raises(RuntimeError, match="nobody holds"):
        PriorityTurns().release()


def test_a_followers_first_window_goes_before_later_windows_waiting_for_the_codec(monkeypatch):
    """batching.codec_turn in a threads-mode process: the window index is the priority."""
    monkeypatch.setattr(batching, "_hooks_forced", True)
    monkeypatch.setattr(batching, "_codec_lock", PriorityTurns())
    batching._codec_lock.acquire(batching.PLAIN_DECODE_PRIORITY)  # a plain decode holds the codec
    threads, order = _queue_waiters(batching._codec_lock, [2, 1, 0], batching.codec_turn)
    batching._codec_lock.release()
    for thread in threads:
        thread.join(10)
    assert order == ["p0#2", "p1#1", "p2#0"]


def test_a_held_back_waiter_lets_the_others_go_first_until_holding_ends():
    holding = threading.Event()
    holding.set()
    turns = PriorityTurns(holding.is_set, poll_s=0.005)
    turns.acquire(0)
    far = time.monotonic() + 60

    threads, order = _queue_waiters(turns, [1, 2], lambda p: turns.turn(p, far if p == 1 else None))
    turns.release()
    wait_until(lambda: order == ["p2#1"], 10, "the waiter that is not held back went first", interval_s=0.005)
    time.sleep(0.05)
    assert order == ["p2#1"] and turns.waiting() == [1]  # the held-back one still waits
    holding.clear()
    for thread in threads:
        thread.join(10)
    assert order == ["p2#1", "p1#0"]


def test_a_held_back_waiter_takes_its_turn_at_its_deadline_although_holding_goes_on():
    turns = PriorityTurns(lambda: True, poll_s=0.005)
    start = time.monotonic()
    with turns.turn(3, start + 0.3):
        waited = time.monotonic() - start
    assert 0.3 <= waited < 5


def test_holding_lasts_until_due_less_the_margin_and_never_longer_than_the_cap():
    assert batching.held_until(100.0, None) == 100.0 + batching.MAX_HOLD_S
    assert batching.held_until(100.0, 100.0 + batching.DUE_MARGIN_S + 2) == 102.0
    assert batching.held_until(100.0, 1e9) == 100.0 + batching.MAX_HOLD_S
    assert batching.held_until(100.0, 101.0) < 100.0  # due soon: not held at all


def test_a_later_window_is_due_when_a_listener_from_the_first_window_reaches_its_first_sample():
    from gpu_worker.worker.streaming_decode import window_due

    assert window_due(None, 0) is None
    assert window_due(50.0, 48_000 * 27) == 77.0
