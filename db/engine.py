"""Engines and sessions: SQLite (WAL, busy timeout) as the embedded default, PostgreSQL in production."""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the web tier read while workers write; the busy timeout absorbs short write locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_known_urls: set[str] = set()

POOL_SIZE_ENV = "SONGPIPE_DB_POOL_SIZE"
DEFAULT_THREADS = 8  # a batching GPU worker's task threads (gpu_worker.worker.batching.DEFAULT_MAX_SONGS)
_configured_threads: int | None = None


def pool_size_for(concurrency: int) -> int:
    """Connections a worker of `concurrency` task threads needs at once (M10): each task thread and
    its heartbeat thread hold one each, plus two for progress/cancel checks and the process itself."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return 2 * concurrency + 2


def configure_pool(concurrency: int) -> None:
    """Size the PostgreSQL pool for this process's concurrency (call before the first query; a worker's
    start hook passes its --concurrency). Engines made earlier are dropped so the next one is resized."""
    global _configured_threads
    pool_size_for(concurrency)  # validates
    _configured_threads = concurrency
    dispose_engines()


def pool_size() -> int:
    """SONGPIPE_DB_POOL_SIZE if set, else sized from the configured concurrency (default 8 threads)."""
    raw = os.environ.get(POOL_SIZE_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{POOL_SIZE_ENV} must be a positive whole number, got {raw!r}")
        return int(raw)
    return pool_size_for(_configured_threads or DEFAULT_THREADS)


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    _known_urls.add(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_postgresql_engine(url)


def create_postgresql_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # overflow as large again: a burst (web threads) waits less, and idle overflow connections are closed
    size = pool_size()
    return create_engine(url, pool_pre_ping=True, pool_size=size, max_overflow=size)


@functools.lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error."""
    session = _session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Drop pooled connections (after fork: a child must not reuse the parent's sockets)."""
    if get_engine.cache_info().currsize:
        for url in list(_known_urls):
            get_engine(url).dispose(close=False)
    get_engine.cache_clear()
    _session_factory.cache_clear()


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE matched: Session.execute is typed to return a Result, but DML hands back a CursorResult."""
    return cast(CursorResult[Any], result).rowcount
