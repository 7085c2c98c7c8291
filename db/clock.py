"""The database's clock: one time source for leases, whichever host writes or reads them (M9).

`db_now()` is a SQL expression for "now" evaluated by the database server, used for every time a
lease is judged by (heartbeat_at, started_at, finished_at, queued_at of stage rows). Workers on
several hosts and the reconciler then compare times from one clock, so host clock skew cannot make
a live worker look lost (or a dead one alive).

- PostgreSQL: `statement_timestamp()` (not `now()`, which is frozen at the transaction's start).
- SQLite: `CURRENT_TIMESTAMP` has whole seconds only, so `strftime('%Y-%m-%d %H:%M:%f', 'now')` gives
  UTC with milliseconds, padded to the text form SQLAlchemy stores (microseconds), so stored times
  compare correctly as text and read back as datetimes.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement):  # noqa: N801 - reads as a function in queries, like func.now()
    """The database server's current UTC time (sub-second), as a SQL expression."""

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "db_now"


@compiles(db_now)
def _default(element, compiler, **kw) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "postgresql")
def _postgresql(element, compiler, **kw) -> str:
    return "statement_timestamp()"


@compiles(db_now, "sqlite")
def _sqlite(element, compiler, **kw) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def database_now(session: Session) -> dt.datetime:
    """Read the database's clock once (the reconciler's `now` for one pass)."""
    now = as_utc(session.scalar(select(db_now())))
    if now is None:
        raise RuntimeError("the database returned no current time")
    return now
