"""A worker's clean stop, as its running stages see it.

On a warm shutdown Celery's main process stops taking messages and waits for its pool, but a pool
child is never told. The main process therefore leaves a marker file named by its pid in the data
directory; a stage's cooperative check (the same one that honours cancel) finds the marker of its
own process or its parent and hands its attempt back instead of running on until it is killed.
"""
from __future__ import annotations

import os
from pathlib import Path

from tasks.settings import Settings

MARKER_DIR = "stopping"


def _marker(settings: Settings, pid: int) -> Path:
    return settings.data_dir / MARKER_DIR / str(pid)


def mark_stopping(settings: Settings, pid: int | None = None) -> None:
    path = _marker(settings, pid or os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def clear_stopping(settings: Settings, pid: int | None = None) -> None:
    _marker(settings, pid or os.getpid()).unlink(missing_ok=True)


def worker_is_stopping(settings: Settings) -> bool:
    """True once this process's worker (itself, or the parent of a pool child) began a clean stop."""
    return any(_marker(settings, pid).exists() for pid in {os.getpid(), os.getppid()})
