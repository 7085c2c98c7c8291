"""Orchestration overhead: what Celery + the SQL record add around each stage.

Starts a real stack (Redis, SQLite or PostgreSQL, CPU and GPU worker processes, web server) with
the tiny checkpoint on the CPU, submits N short jobs over HTTP, waits for all of them, and prints
per stage, p50 / p95 of:
  queue wait  - from the moment the stage could start (job created, or upstream stage finished)
                until a worker claimed it;
  run         - the stage's own duration, recording excluded;
  recording   - time spent writing the stage's SQL record (claim, inputs, outputs, artifacts).

    python bench/overhead.py --jobs 20 [--database sqlite|postgresql]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select  # noqa: E402

from bench.table import print_table  # noqa: E402
from db.engine import session_scope  # noqa: E402
from db.models import Job, StageRun  # noqa: E402
from tasks.contracts import STAGES  # noqa: E402
from tests.stack_fixtures import database, redis_server, running_stack, tiny_checkpoint  # noqa: E402

SONG = {"lyrics": "de doo doo doo\nde blaa blaa blaa\nis all i want to sing to you", "tags": "ska",
        "max_audio_length_ms": 2000}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def stage_timings(database_url: str, job_ids: list[str]) -> list[dict]:
    waits: dict[str, list[float]] = {s: [] for s in STAGES}
    runs: dict[str, list[float]] = {s: [] for s in STAGES}
    records: dict[str, list[float]] = {s: [] for s in STAGES}
    with session_scope(database_url) as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        rows = session.scalars(select(StageRun).where(StageRun.job_id.in_(job_ids))).all()
        by_job: dict[str, dict[str, StageRun]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, {})[row.stage] = row
        for job_id, stages in by_job.items():
            ready_at = jobs[job_id].created_at
            for stage in STAGES:
                row = stages[stage]
                waits[stage].append((row.started_at - ready_at).total_seconds() * 1000)
                recording = row.recording_s or 0.0
                runs[stage].append((row.duration_s - recording) * 1000)
                records[stage].append(recording * 1000)
                ready_at = row.finished_at
    table = []
    for stage in STAGES:
        table.append({"stage": stage, "n": len(runs[stage]),
                      "queue wait p50 ms": percentile(waits[stage], .5), "queue wait p95 ms": percentile(waits[stage], .95),
                      "run p50 ms": percentile(runs[stage], .5), "run p95 ms": percentile(runs[stage], .95),
                      "recording p50 ms": percentile(records[stage], .5),
                      "recording p95 ms": percentile(records[stage], .95)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="songpipe-overhead-") as tmp:
        work = Path(tmp)
        checkpoint = tiny_checkpoint(work / "ckpt")
        with redis_server(work / "redis") as redis, database(args.database, work / "db") as url:
            with running_stack("overhead", work / "stack", url, redis.claim_db(), checkpoint) as stack:
                started = time.monotonic()
                ids = [stack.submit(SONG)["id"] for _ in range(args.jobs)]
                jobs = [stack.wait_for_job(job_id, timeout_s=600) for job_id in ids]
                wall = time.monotonic() - started
                failed = [j["id"] for j in jobs if j["status"] != "succeeded"]
                if failed:
                    raise SystemExit(f"{len(failed)} jobs did not succeed: {failed}\n{stack.logs()}")
                print(f"{args.jobs} jobs on {args.database}, tiny checkpoint on CPU, 2000 ms songs: "
                      f"{wall:.1f} s wall, {args.jobs / wall:.2f} jobs/s")
                print_table("Per-stage orchestration overhead", stage_timings(url, ids))


if __name__ == "__main__":
    main()
