"""Shared fixtures: real Redis, SQLite and PostgreSQL, a tiny checkpoint, and running stacks.

Fixtures (see tests/stack_fixtures.py for the machinery):
- `tiny_checkpoint_dir` (session): a tiny random checkpoint, made once.
- `redis_service` (session): the Redis that stacks claim DB numbers from.
- `database_url` (module, parametrised "sqlite" / "postgresql"): an empty migrated database.
- `stack` (parametrised "sqlite" / "postgresql") and `sqlite_stack`: running workers + web server;
  one stack per backend per session, shared by every test that asks for it, so tests must look at
  their own job ids only. Worker logs are appended to a failing test's report.
- `app_settings(database_url, tmp_path)`: Settings for an in-process Flask app (test client).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Without an NVIDIA GPU, Triton kernels (gpu_worker/kernels/fused_ops.py) can only run through Triton's
# interpreter; it is chosen when triton is first imported, so it is set before any test imports it.
if not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tasks.settings import Settings
from tests import stack_fixtures

DATABASE_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _skip_if_no_postgres(kind: str) -> None:
    if kind == "postgresql" and not stack_fixtures.postgres_reachable():
        message = f"PostgreSQL is not reachable at {stack_fixtures.POSTGRES_ADMIN_URL}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the PostgreSQL half of the suite (.ci/run starts the server)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stack_fixtures.tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_fixtures.RedisServer]:
    with stack_fixtures.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _skip_if_no_postgres(request.param)
    with stack_fixtures.database(request.param, tmp_path_factory.mktemp(f"db-{request.param}")) as url:
        yield url


@pytest.fixture
def app_settings(database_url: str, tiny_checkpoint_dir: Path, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, checkpoint_dir=tiny_checkpoint_dir)


class _StackPool:
    """At most one running stack per database kind for the whole session, started on first use."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, redis: stack_fixtures.RedisServer,
                 checkpoint: Path):
        self._tmp, self._redis, self._checkpoint = tmp_path_factory, redis, checkpoint
        self._stacks: dict[str, stack_fixtures.Stack] = {}
        self._exits: list = []

    def get(self, kind: str) -> stack_fixtures.Stack:
        _skip_if_no_postgres(kind)
        if kind not in self._stacks:
            workdir = self._tmp.mktemp(f"stack-{kind}")
            database = stack_fixtures.database(kind, workdir / "db")
            url = database.__enter__()
            self._exits.append(database)
            running = stack_fixtures.running_stack(kind, workdir, url, self._redis.claim_db(), self._checkpoint)
            self._stacks[kind] = running.__enter__()
            self._exits.append(running)
        return self._stacks[kind]

    def close(self) -> None:
        for context in reversed(self._exits):
            context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def stack_pool(tmp_path_factory, redis_service, tiny_checkpoint_dir) -> Iterator[_StackPool]:
    pool = _StackPool(tmp_path_factory, redis_service, tiny_checkpoint_dir)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=DATABASE_KINDS)
def stack(request: pytest.FixtureRequest, stack_pool: _StackPool) -> stack_fixtures.Stack:
    return stack_pool.get(request.param)


@pytest.fixture
def sqlite_stack(stack_pool: _StackPool) -> stack_fixtures.Stack:
    return stack_pool.get("sqlite")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test that used a stack gets the worker and web logs in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("stack", "sqlite_stack"):
            running = getattr(item, "funcargs", {}).get(name)
            if isinstance(running, stack_fixtures.Stack):
                report.sections.append((f"{running.name} stack logs", running.logs()))
