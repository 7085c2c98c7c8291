"""CUDA graph captures and compiles of one process, kept apart.

A graph capture claims the process's default CUDA generator while it runs. torch.compile, on another
thread, draws from that generator as it builds its pattern tables, and then fails with "Offset increment
outside graph capture encountered unexpectedly": the GPU worker's codec compiled at its first window while
the engine captured a frame-step graph, and it ran eager, twice as slow, for the rest of the process
(bench/RESULTS.md, "First sound"). So:
* the codec compiles and captures inside `exclusive()`, which waits for a capture in flight;
* the engine captures inside `capture_unless_busy()`: while a compile holds it, the engine runs that step
  eagerly (the same numbers: graph and eager frame steps are bit-identical, bench/RESULTS.md) and captures
  the graph at a later step. The engine never waits for a compile.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_exclusive = threading.RLock()  # re-entrant: a compile's warm-up call nests inside the codec's capture


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Compile or capture with no other thread capturing meanwhile."""
    with _exclusive:
        yield


@contextlib.contextmanager
def capture_unless_busy() -> Iterator[bool]:
    """True: capture now (no other thread compiles or captures until the block ends); False: don't."""
    if not _exclusive.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        _exclusive.release()
