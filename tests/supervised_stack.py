"""`songpipe run` as a test (and bench/soak.py) drives it: the default stack as one supervised process.

No REDIS_URL (the embedded Redis), SQLite unless a DATABASE_URL is given; the supervisor's state
file (<data_dir>/supervisor.json) says which pid each program has now and how often it restarted.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.stack_fixtures import REPO_ROOT, free_port, kill_group, wait_until

FAST_ENV = {
    "SONGPIPE_HEARTBEAT_S": "0.25",  # lease 3 s
    "SONGPIPE_LIVENESS_INTERVAL_S": "0.5",
    "SONGPIPE_LIVENESS_FAILURES": "3",
    "SONGPIPE_FAULT_INJECTION": "1",
    "SONGPIPE_SUBMISSIONS_PER_MINUTE": "100000",
    "SONGPIPE_DEFAULT_TAGS_BACKEND": "given",
    "SONGPIPE_DEVICE": "cpu",
}


def default_environment(data_dir: Path, checkpoint: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "HEARTMULA_CKPT") and not k.startswith("SONGPIPE_")}
    env.update(FAST_ENV, SONGPIPE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if checkpoint is not None:
        env["HEARTMULA_CKPT"] = str(checkpoint)
    env.update(extra or {})
    return env


@dataclass
class SupervisedStack:
    process: subprocess.Popen
    data_dir: Path
    env: dict[str, str]
    base_url: str
    log: Path

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / "supervisor.json").read_text())
        except (FileNotFoundError, ValueError):
            return {"pids": {}, "restarts": {}}

    def pid(self, name: str) -> int | None:
        return self.state()["pids"].get(name)

    def restarts(self, name: str) -> int:
        return self.state()["restarts"].get(name, 0)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`songpipe ARGS` from a second shell: the same data dir, no REDIS_URL."""
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def http_json(self, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def web_answers(self) -> bool:
        try:
            return self.http_json(f"/api/jobs/{'0' * 32}")[0] == 404
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def submit(self, body: dict) -> str:
        status, answer = self.http_json("/api/jobs", body)
        assert status == 201, (status, answer)
        return answer["id"]

    def job(self, job_id: str) -> dict:
        status, answer = self.http_json(f"/api/jobs/{job_id}")
        assert status == 200, (status, answer)
        return answer

    def wait_for_job(self, job_id: str, timeout_s: float = 240) -> dict:
        view: dict = {}

        def done() -> bool:
            nonlocal view
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError, AssertionError):
                view = self.job(job_id)
            return view.get("status") in ("succeeded", "failed", "cancelled")

        try:
            wait_until(done, timeout_s, f"job {job_id}", interval_s=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last seen {view.get('status')}\n{self.output()[-8000:]}") from None
        return view

    def wait_for_new_pid(self, name: str, old: int | None, timeout_s: float = 120) -> int:
        wait_until(lambda: self.pid(name) not in (None, old), timeout_s, f"{name} restarted")
        return self.pid(name)  # type: ignore[return-value]

    def stop(self, timeout_s: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(self.process)
        return self.process.returncode


def job_pids_of(pid: int) -> list[int]:
    """A process's children (a Celery worker's pool processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def supervised_stack(workdir: Path, checkpoint: Path | None, extra_env: dict[str, str] | None = None,
                     start_timeout_s: float = 240) -> Iterator[SupervisedStack]:
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "var"
    env = default_environment(data_dir, checkpoint, extra_env)
    port = free_port()
    log = workdir / "songpipe-run.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--port", str(port),
                                    "--procfile", str(REPO_ROOT / "Procfile")], env=env, cwd=REPO_ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    stack = SupervisedStack(process, data_dir, env, f"http://127.0.0.1:{port}", log)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"songpipe run exited with {process.returncode}\n{stack.output()[-6000:]}")
            text = stack.output()
            return stack.web_answers() and all(re.search(rf"{kind}@\S+ ready", text) for kind in ("cpu", "gpu"))

        wait_until(ready, start_timeout_s, "songpipe run", interval_s=0.5)
        yield stack
    finally:
        stack.stop()
