"""Soak: the default `songpipe run` stack under chaos, with no person involved (issue 11).

Runs `songpipe run` (embedded Redis; SQLite, or PostgreSQL with --postgres), submits --jobs songs
spread over --duration-s while a chaos loop kill -9s random processes (web, CPU/GPU worker main
processes and pool children, reconciler, embedded Redis), restarts Redis empty once, holds it down
once for --redis-down-s (a supervisor hold file), and restarts PostgreSQL once (--postgres). Then it
waits up to --settle-s for every job to end and prints: submitted, succeeded, failed (by reason),
cancelled, lost, stuck, duplicate successful attempts, restarts by process.

    python bench/soak.py                          # the full run: 100 jobs, 20 min, Redis down 10 min
    python bench/soak.py --duration-s 180 --jobs 20 --redis-down-s 30 --settle-s 180   # smoke
    python bench/soak.py --postgres               # the same on PostgreSQL (pg_ctlcluster restart)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.status import JOB_TERMINAL
from tests import stack_fixtures
from tests.reliability_fixtures import song
from tests.supervised_stack import SupervisedStack, job_pids_of, supervised_stack

KILL_TARGETS = ("web", "cpu", "cpu-child", "gpu", "gpu-child", "reconcile", "redis")


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak | {line}", flush=True)


class Chaos:
    def __init__(self, stack: SupervisedStack, args: argparse.Namespace, postgres_cluster: tuple[str, str] | None):
        self.stack, self.args, self.cluster = stack, args, postgres_cluster
        self.done = threading.Event()
        self.actions: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(args.seed)

    def kill(self, target: str) -> None:
        name = target.removesuffix("-child")
        pid = self.stack.pid(name)
        if pid is None:
            return
        if target.endswith("-child"):
            children = job_pids_of(pid)
            if not children:
                return
            pid = self.rng.choice(children)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.actions[f"kill -9 {target}"] += 1
        log(f"chaos: kill -9 {target} (pid {pid})")

    def redis_restart_empty(self) -> None:
        redis_dir = self.stack.data_dir / "redis"
        hold = self.stack.data_dir / "hold" / "redis"
        hold.parent.mkdir(exist_ok=True)
        hold.touch()  # keep the supervisor from starting it before the data is gone
        self.kill("redis")
        time.sleep(1)
        for path in redis_dir.iterdir():
            if path.name.startswith("appendonly") or path.suffix == ".rdb":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        hold.unlink()
        self.actions["redis restarted empty"] += 1
        log("chaos: redis restarted empty")

    def redis_down(self, seconds: float) -> None:
        hold = self.stack.data_dir / "hold" / "redis"
        hold.parent.mkdir(exist_ok=True)
        hold.touch()
        self.kill("redis")
        log(f"chaos: redis held down for {seconds:g} s")
        self.done.wait(seconds)
        hold.unlink()
        self.actions[f"redis down {seconds:g} s"] += 1
        log("chaos: redis released")

    def postgres_restart(self) -> None:
        assert self.cluster is not None
        version, name = self.cluster
        subprocess.run(["pg_ctlcluster", version, name, "restart"], check=False, timeout=120)
        self.actions["postgresql restarted"] += 1
        log("chaos: postgresql restarted")

    def run(self, duration_s: float) -> None:
        start = time.monotonic()
        once = {"redis-empty": duration_s * 0.25, "redis-down": duration_s * 0.45}
        if self.cluster:
            once["postgres"] = duration_s * 0.7
        while not self.done.is_set() and time.monotonic() - start < duration_s:
            elapsed = time.monotonic() - start
            for event, at in list(once.items()):
                if elapsed >= at:
                    del once[event]
                    if event == "redis-empty":
                        self.redis_restart_empty()
                    elif event == "redis-down":
                        self.redis_down(min(self.args.redis_down_s, max(1.0, duration_s - elapsed)))
                    else:
                        self.postgres_restart()
            self.kill(self.rng.choice(KILL_TARGETS))
            self.done.wait(self.rng.uniform(0.5, 1.5) * self.args.chaos_interval_s)


def submit_all(stack: SupervisedStack, count: int, duration_s: float, ids: list[str], refused: collections.Counter) -> None:
    """Spread `count` submissions over `duration_s`; a submission the web tier cannot take is retried."""
    for index in range(count):
        due = index * duration_s / count
        body = song("slow-20", max_audio_length_ms=1600 + 800 * (index % 4))
        while True:
            try:
                status, answer = stack.http_json("/api/jobs", body)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                refused[type(exc).__name__] += 1
                time.sleep(1)
                continue
            if status == 201:
                ids.append(answer["id"])
                break
            refused[f"HTTP {status}"] += 1
            time.sleep(1)
        time.sleep(max(0.0, due - (time.time() - submit_all.started)))  # type: ignore[attr-defined]


def outcome(database_url: str, ids: list[str]) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        jobs = {row.id: row for row in conn.execute(text("SELECT id, status, failed_stage, error_type FROM jobs"))}
        duplicates = conn.execute(text(
            "SELECT COUNT(*) FROM (SELECT job_id, stage FROM stage_runs WHERE status = 'succeeded' "
            "GROUP BY job_id, stage HAVING COUNT(*) > 1) d")).scalar()
    engine.dispose()
    counts: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    for job_id in ids:
        row = jobs.get(job_id)
        if row is None:
            counts["lost"] += 1
        elif row.status in JOB_TERMINAL:
            counts[row.status] += 1
            if row.status == "failed":
                failed[f"{row.failed_stage}: {row.error_type}"] += 1
        else:
            counts["stuck"] += 1
    return {"counts": counts, "failed": failed, "duplicates": duplicates}


def wait_settled(stack: SupervisedStack, database_url: str, ids: list[str], settle_s: float) -> None:
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if outcome(database_url, ids)["counts"]["stuck"] == 0:
                return
        time.sleep(2)


def postgres_database(workdir: Path) -> contextlib.AbstractContextManager[str]:
    return stack_fixtures.database("postgresql", workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1200, help="submission and chaos window")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--chaos-interval-s", type=float, default=20, help="mean seconds between kills")
    parser.add_argument("--redis-down-s", type=float, default=600, help="the one long broker outage")
    parser.add_argument("--settle-s", type=float, default=300, help="after chaos: how long jobs may take to end")
    parser.add_argument("--postgres", action="store_true", help="DATABASE_URL on the local PostgreSQL (restarted once)")
    parser.add_argument("--postgres-cluster", default="15/main", help="pg_ctlcluster VERSION/NAME")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    checkpoint = stack_fixtures.tiny_checkpoint(workdir / "checkpoint")
    with contextlib.ExitStack() as exits:
        extra = {"SONGPIPE_MAX_QUEUED_JOBS": str(max(200, args.jobs * 2)), "SONGPIPE_LIVENESS_INTERVAL_S": "2"}
        cluster = None
        if args.postgres:
            extra["DATABASE_URL"] = exits.enter_context(postgres_database(workdir / "pg"))
            cluster = tuple(args.postgres_cluster.split("/", 1))  # type: ignore[assignment]
        stack = exits.enter_context(supervised_stack(workdir / "stack", checkpoint, extra))
        database_url = extra.get("DATABASE_URL", f"sqlite:///{stack.data_dir / 'songpipe.db'}")
        log(f"stack up at {stack.base_url}; workdir {workdir}; database {database_url}")
        ids: list[str] = []
        refused: collections.Counter[str] = collections.Counter()
        chaos = Chaos(stack, args, cluster)  # type: ignore[arg-type]
        submit_all.started = time.time()  # type: ignore[attr-defined]
        submitter = threading.Thread(target=submit_all, args=(stack, args.jobs, args.duration_s, ids, refused), daemon=True)
        submitter.start()
        chaos.run(args.duration_s)
        submitter.join()
        log(f"chaos over; {len(ids)} jobs submitted; waiting up to {args.settle_s:g} s for them to end")
        wait_settled(stack, database_url, ids, args.settle_s)
        result = outcome(database_url, ids)
        restarts = stack.state().get("restarts", {})
    counts = result["counts"]
    print("\n| measure | value |\n|---|---|")
    rows = [("submitted", len(ids)), ("succeeded", counts["succeeded"]), ("failed", counts["failed"])]
    rows += [(f"  failed: {reason}", n) for reason, n in sorted(result["failed"].items())]
    rows += [("cancelled", counts["cancelled"]), ("lost", counts["lost"]),
             (f"stuck (non-terminal {args.settle_s:g} s after chaos)", counts["stuck"]),
             ("duplicate successful attempts", result["duplicates"])]
    rows += [(f"restarts: {name}", n) for name, n in sorted(restarts.items())]
    rows += [(f"chaos: {action}", n) for action, n in sorted(chaos.actions.items())]
    rows += [(f"submissions retried: {why}", n) for why, n in sorted(refused.items())]
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if counts["lost"] == counts["stuck"] == result["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
