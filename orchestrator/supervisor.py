"""A small process supervisor for `songpipe run`: restart what dies or hangs, never stop the others.

Why our own and not honcho (stops everything when one process exits, by design) or supervisord (an
extra daemon with its own config file and no notion of a Celery ping): see docs/supervision.md.

- Each child runs in its own session (process group) so that a kill of a hung worker takes its pool
  children with it, and so that Ctrl-C in the terminal reaches only us.
- A child that exits is started again after an exponential back-off (0.5 s doubling to 30 s; reset
  after 60 s of good running), with a log line; a child that exits with REFUSED_EXIT (an old schema,
  no broker) is not restarted: it would refuse again.
- Liveness beyond "the process exists": a child with a probe (a Celery ping for workers, an HTTP
  request for the web server, a Redis PING for the embedded broker) that fails `failures` probes in a
  row is killed (SIGKILL of its group) and restarted. A worker is not judged while the broker is down:
  no worker can answer then.
- Hold: while a file named after a program exists in `hold_dir`, that program is not (re)started
  (maintenance, and bench/soak.py's long broker outage).
- Stop (SIGTERM, Ctrl-C): SIGTERM to each child's main process only (Celery's warm shutdown: the
  main process lets its pool children finish the stage in hand), then SIGKILL of the group after
  `stop_timeout_s`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

Probe = Callable[[], bool | None]  # True alive, False not answering, None cannot judge now
REFUSED_EXIT = 3
BACKOFF_START_S, BACKOFF_MAX_S, STABLE_AFTER_S = 0.5, 30.0, 60.0


@dataclass
class Program:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    probe: Probe | None = None
    # the first probes only start after the child answered once or after this long (model loading)
    start_grace_s: float = 120.0
    restart_on_refusal: bool = False
    stop_last: bool = False  # the broker: the others still acknowledge and record while they stop


@dataclass
class _Child:
    program: Program
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    backoff_s: float = BACKOFF_START_S
    failed_probes: int = 0
    answered_once: bool = False
    restarts: int = 0
    kills_for_liveness: int = 0
    gave_up: bool = False


@dataclass
class Supervisor:
    programs: list[Program]
    echo: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    probe_interval_s: float = 5.0
    probe_failures: int = 3
    stop_timeout_s: float = 60.0
    log_stream: TextIO | None = None  # children's output, each line prefixed by its name
    hold_dir: Path | None = None

    def __post_init__(self) -> None:
        self._children = {p.name: _Child(p) for p in self.programs}
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._width = max((len(p.name) for p in self.programs), default=4)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, name: str) -> None:
        child = self._children[name]
        program = child.program
        process = subprocess.Popen(program.argv, env=program.env, cwd=program.cwd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            child.process, child.started_at = process, time.monotonic()
            child.failed_probes, child.answered_once = 0, False
        threading.Thread(target=self._copy_output, args=(name, process), daemon=True,
                         name=f"supervisor-log-{name}").start()
        self.echo(f"supervisor: started {name} (pid {process.pid})")

    def held(self, name: str) -> bool:
        return self.hold_dir is not None and (self.hold_dir / name).exists()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {name: child.restarts for name, child in self._children.items()}

    def pids(self) -> dict[str, int | None]:
        with self._lock:
            return {name: (c.process.pid if c.process and c.process.poll() is None else None)
                    for name, c in self._children.items()}

    def run(self, *, on_tick: Callable[[], None] | None = None) -> None:
        """Start every program and supervise until request_stop(); then stop them all."""
        for name, child in self._children.items():
            if child.process is None:
                self.start(name)
        probes = threading.Thread(target=self._probe_loop, daemon=True, name="supervisor-probes")
        probes.start()
        try:
            while not self._stop.wait(0.2):
                self._reap_and_restart()
                if on_tick is not None:
                    on_tick()
        finally:
            self.stop_all()

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for name, child in self._children.items():
            with self._lock:
                process = child.process
                if process is not None and process.poll() is not None:
                    ran_s = now - child.started_at
                    code = process.returncode
                    child.process = None
                    if ran_s >= STABLE_AFTER_S:
                        child.backoff_s = BACKOFF_START_S
                    if code == REFUSED_EXIT and not child.program.restart_on_refusal:
                        child.gave_up = True
                        self.echo(f"supervisor: {name} refused to start (exit {code}); not restarting it - "
                                  f"see its message above")
                        continue
                    child.next_start = now + child.backoff_s
                    self.echo(f"supervisor: {name} exited with {code} after {ran_s:.1f} s; "
                              f"restarting in {child.backoff_s:g} s")
                    child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
                    child.restarts += 1
                elif process is None and not child.gave_up and now >= child.next_start and not self.held(name):
                    self.start(name)

    # -- liveness -------------------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            for name, child in list(self._children.items()):
                if self._stop.is_set():
                    return
                if child.program.probe is None or child.process is None or child.process.poll() is not None:
                    continue
                try:
                    verdict = child.program.probe()
                except Exception:  # noqa: BLE001 - a probe that breaks judges nothing
                    verdict = None
                self._judge(name, child, verdict)

    def _judge(self, name: str, child: _Child, verdict: bool | None) -> None:
        with self._lock:
            if verdict is None:
                return
            if verdict:
                child.failed_probes, child.answered_once = 0, True
                return
            in_grace = not child.answered_once and time.monotonic() - child.started_at < child.program.start_grace_s
            if in_grace:
                return
            child.failed_probes += 1
            if child.failed_probes < self.probe_failures or child.process is None:
                return
            pid = child.process.pid
            child.kills_for_liveness += 1
        self.echo(f"supervisor: {name} (pid {pid}) did not answer {self.probe_failures} liveness probes in a row; "
                  "killing its process group")
        _kill_group(pid, signal.SIGKILL)

    # -- stopping -------------------------------------------------------------------------------

    def stop_all(self) -> None:
        self._stop.set()
        for last in (False, True):
            with self._lock:
                running = [(n, c.process) for n, c in self._children.items()
                           if c.program.stop_last == last and c.process and c.process.poll() is None]
            self._stop_group(running)

    def _stop_group(self, running: list[tuple[str, subprocess.Popen]]) -> None:
        for name, process in running:
            self.echo(f"supervisor: stopping {name} (SIGTERM to pid {process.pid})")
            # the main process only: Celery's warm shutdown lets its pool children finish the stage
            _signal(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for name, process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.echo(f"supervisor: {name} did not stop within {self.stop_timeout_s:g} s; killing it")
            _kill_group(process.pid, signal.SIGKILL)  # leftovers of the group (pool children), if any
            process.wait()
            self.echo(f"supervisor: {name} stopped ({process.returncode})")

    def _copy_output(self, name: str, process: subprocess.Popen) -> None:
        stream = self.log_stream or sys.stdout
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            stream.write(f"{time.strftime('%H:%M:%S')} {name:<{self._width}} | {line}\n")
            stream.flush()
        process.stdout.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
