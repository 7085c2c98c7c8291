"""kombu's Redis transport with one fix: a closed connection's channel fails as a connection error.

The crash (celery/kombu 5.7.0, redis-py 8.1.0; issue 11): when Redis goes away while a task runs,
Celery's consumer (`on_connection_error_after_connected`) first `collect()`s the broken connection,
which detaches its transport (`transport.client = None`), then `close()`s it. Closing the default
channel restores the unacknowledged messages (`restore_unacked_once`), which needs a Redis client;
the pool is gone, so kombu builds a new one from `self.connection.client.hostname` - on None - and
raises AttributeError. `ignore_errors` swallows only connection errors, so the AttributeError
reaches the worker's blueprint as "Unrecoverable error" and the worker exits.

Here `_connparams` on a detached transport raises redis' ConnectionError instead, which every
caller on that path already treats as "the broker is gone": the close completes, the consumer
reconnects, and the message is recovered as for any broker loss (visibility timeout; the SQL
reconciler). Registered for the `redis` scheme (redis:// and redis+socket://) by tasks.celery_app.
tests/test_broker_outage_stack.py reproduces the crash without this class.
"""
from __future__ import annotations

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed (transport detached)")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> None:
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
