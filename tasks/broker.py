"""Where the broker is, and small questions asked of it: one home for every process and command.

Resolution order (`resolve_broker_url`): REDIS_URL when set, else the address that a running
`songpipe run` recorded in the data directory (`<data_dir>/broker_url`) when it started its embedded
Redis. There is no third choice: Celery's own default (amqp://guest@localhost//) is never used, so a
command on a machine that also runs RabbitMQ cannot publish there by accident.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.virtual import Channel as VirtualChannel
from kombu.transport.virtual import Transport as VirtualTransport

from tasks.settings import Settings

HOW_TO_SET = ("start the stack with `songpipe run` (it starts an embedded Redis and records its address) "
              "or set REDIS_URL=redis://host:6379/0")
# The address an app gets when no broker is known: its transport refuses every connection.
UNCONFIGURED_URL = "songpipe-unconfigured://"
# kombu's Redis transport keeps priority levels in extra lists named queue + "\x06\x16" + level
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class BrokerNotConfigured(RuntimeError):
    """No REDIS_URL and no recorded embedded broker."""


class BrokerUnreachable(RuntimeError):
    """A broker address is known but nothing answers there."""


# -- the recorded embedded broker --------------------------------------------------------------

def recorded_broker_file(settings: Settings) -> Path:
    return settings.data_dir / "broker_url"


def record_embedded_broker(settings: Settings, url: str) -> None:
    """Written by `songpipe run` once its embedded Redis answers (atomically: readers never see half)."""
    path = recorded_broker_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(url + "\n")
    tmp.replace(path)


def forget_embedded_broker(settings: Settings, url: str) -> None:
    """Removed on a clean stop, only if it still names our broker (another run may have replaced it)."""
    path = recorded_broker_file(settings)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() == url:
            path.unlink()


def recorded_broker_url(settings: Settings) -> str | None:
    try:
        return recorded_broker_file(settings).read_text().strip() or None
    except FileNotFoundError:
        return None


def resolve_broker_url(settings: Settings) -> str:
    """REDIS_URL, else the embedded broker recorded by `songpipe run`; raises BrokerNotConfigured."""
    if settings.redis_url:
        return settings.redis_url
    recorded = recorded_broker_url(settings)
    if recorded:
        return recorded
    raise BrokerNotConfigured(f"no broker: REDIS_URL is not set and no `songpipe run` recorded one in "
                              f"{recorded_broker_file(settings)}; {HOW_TO_SET}")


# -- talking to Redis --------------------------------------------------------------------------

def redis_py_url(url: str) -> str:
    """kombu's redis+socket:///path is redis-py's unix:///path."""
    return url.replace("redis+socket://", "unix://", 1) if url.startswith("redis+socket://") else url


@contextlib.contextmanager
def redis_client(url: str, timeout_s: float = 2.0) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_py_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        yield client
    finally:
        client.close()


def broker_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        with redis_client(url, timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def require_reachable(url: str) -> None:
    if not broker_answers(url, timeout_s=2.0):
        raise BrokerUnreachable(f"cannot reach the broker at {url}; {HOW_TO_SET}")


def queue_lengths(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (all priority levels), on redis:// and redis+socket:// alike."""
    names = list(queues)
    with redis_client(url) as client, client.pipeline() as pipe:
        for queue in names:
            for suffix in PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        values = pipe.execute()
    n = len(PRIORITY_SUFFIXES)
    return {queue: sum(values[i * n:(i + 1) * n]) for i, queue in enumerate(names)}


# -- the transport of an app with no broker ----------------------------------------------------

class _RefusingChannel(VirtualChannel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise BrokerNotConfigured(f"this Celery app has no broker; {HOW_TO_SET}")


class UnconfiguredTransport(VirtualTransport):
    """What `UNCONFIGURED_URL` resolves to: every connection attempt raises BrokerNotConfigured."""

    Channel = _RefusingChannel
    driver_type = driver_name = "songpipe-unconfigured"

    def establish_connection(self) -> Any:
        raise BrokerNotConfigured(f"this Celery app has no broker; {HOW_TO_SET}")


TRANSPORT_ALIASES.setdefault("songpipe-unconfigured", "tasks.broker:UnconfiguredTransport")
