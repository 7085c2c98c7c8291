"""Seed N jobs (default 100k), each with its five stage rows, by bulk inserts, for dashboard benchmarks.

The rows look like real ones: a status mix with failures in each stage, error types, varied lyrics
and tags (so the text filter has something to search), stage durations, worker hosts and small
environment snapshots, spread over the last 30 days.

    .venv/bin/python -m bench.seed_jobs --data-dir /tmp/songpipe-bench --jobs 100000
    DATABASE_URL=postgresql://... .venv/bin/python -m bench.seed_jobs --jobs 100000
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import time
import uuid

from sqlalchemy import insert

from db.engine import get_engine
from db.models import JOB_TERMINAL, Job, StageRun
from db.schema import upgrade
from tasks.celery_app import queue_for
from tasks.contracts import PIPELINE_NAME, STAGES
from tasks.settings import Settings

WORDS = ("de doo blaa sing you love night city river fire rain summer heart road light dance dream ocean "
         "golden morning shadow train window silver whisper thunder echo garden").split()
TAGS = ("ska pop rock jazz bossa_nova blues folk electronic hip_hop reggae upbeat calm sad happy brass piano "
        "guitar female male energetic").split()
ERRORS = {
    "refine_lyrics": ("tasks.lyrics_refinement.LyricsTooLong", "lyrics need 3120 prompt tokens, budget is 3000"),
    "generate_tags": ("tasks.tags_generation.LlmAnswerInvalid", "LLM answer is not JSON: 'Sure! Here are'"),
    "generate_tokens": ("gpu_worker.generation.generate.GenerationCancelled", "stopped at frame 812"),
    "decode_audio": ("gpu_worker.model.token_validation.InvalidCodesError",
                     "invalid code at frame 0, codebook 3: value 8192 is outside the valid range 0..8191"),
    "encode_audio": ("subprocess.CalledProcessError", "ffmpeg exited with status 1"),
}
STATUS_WEIGHTS = (("succeeded", 84), ("failed", 9), ("queued", 3), ("running", 2), ("cancelled", 2))
STAGE_SECONDS = {"refine_lyrics": 0.05, "generate_tags": 0.3, "generate_tokens": 45.0, "decode_audio": 8.0,
                 "encode_audio": 1.5}


def _lyrics(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(4, 12))]
    return "[verse]\n" + "\n".join(lines)


def make_rows(n: int, seed: int = 0, now: dt.datetime | None = None, days: int = 30):
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    statuses = [s for s, w in STATUS_WEIGHTS for _ in range(w)]
    hosts = [f"gpu-{i}" for i in range(4)] + [f"cpu-{i}" for i in range(4)]
    for _ in range(n):
        created = now - dt.timedelta(seconds=rng.uniform(0, days * 86400))
        status = rng.choice(statuses)
        lyrics, tags = _lyrics(rng), sorted(set(rng.sample(TAGS, rng.randint(1, 4))))
        request = {"lyrics": lyrics, "style": None, "tags": tags, "seed": None, "temperature": 1.0, "top_k": 50,
                   "cfg_scale": 1.5, "max_audio_length_ms": 240000, "output_format": "mp3",
                   "lyrics_backend": "rules", "tags_backend": "given", "allow_fallback": False}
        failed_stage = rng.choice(STAGES) if status == "failed" else None
        stop_at = {"succeeded": len(STAGES), "failed": STAGES.index(failed_stage) if failed_stage else 0,
                   "queued": 0, "running": rng.randint(0, 4), "cancelled": rng.randint(0, 4)}[status]
        job_id = uuid.uuid4().hex
        error_type, error_message = ERRORS[failed_stage] if failed_stage else (None, None)
        clock = created
        runs = []
        for i, stage in enumerate(STAGES):
            run = {"job_id": job_id, "stage": stage, "attempt": 1, "queue": queue_for(stage), "queued_at": created,
                   "status": "queued", "deliveries": 0}
            if i < stop_at or (i == stop_at and status in ("failed", "running", "cancelled")):
                duration = STAGE_SECONDS[stage] * rng.uniform(0.6, 1.8)
                start = clock + dt.timedelta(seconds=rng.uniform(0.01, 2))
                host = rng.choice(hosts[:4] if queue_for(stage) == "gpu" else hosts[4:])
                run.update(started_at=start, worker_hostname=host, worker_pid=rng.randint(1000, 60000),
                           celery_task_id=uuid.uuid4().hex, deliveries=1, heartbeat_at=start,
                           inputs={"stage": stage}, environment={"hostname": host, "queue": run["queue"]})
                if i < stop_at:
                    clock = start + dt.timedelta(seconds=duration)
                    run.update(status="succeeded", finished_at=clock, duration_s=duration, outputs={"ok": True})
                elif status == "failed":
                    clock = start + dt.timedelta(seconds=duration / 3)
                    run.update(status="failed", finished_at=clock, duration_s=duration / 3, error_type=error_type,
                               error_message=error_message, traceback="Traceback (most recent call last):\n  ...")
                elif status == "cancelled":
                    clock = start + dt.timedelta(seconds=duration / 2)
                    run.update(status="cancelled", finished_at=clock, duration_s=duration / 2)
                else:
                    run.update(status="running", progress={"done": 100, "total": 3000, "unit": "frames"})
            elif status in JOB_TERMINAL:  # as the pipeline writes it: a finished job keeps no queued row
                run.update(status="skipped", finished_at=clock)
            runs.append(run)
        finished = clock if status in JOB_TERMINAL else None
        job = {"id": job_id, "created_at": created, "updated_at": finished or created, "finished_at": finished,
               "status": status, "request": request, "seed": rng.randrange(2**31), "seed_source": "drawn",
               "pipeline": PIPELINE_NAME, "code_version": "bench", "source": rng.choice(("api", "form", "cli")),
               "failed_stage": failed_stage, "error_type": error_type, "error_message": error_message,
               "cancel_requested": status == "cancelled", "search_text": "\n".join([lyrics, "", ",".join(tags)]).lower()}
        yield job, runs


def seed(url: str, n: int, *, batch: int = 5000, rng_seed: int = 0) -> float:
    upgrade(url)
    engine = get_engine(url)
    started = time.monotonic()
    jobs, runs = [], []
    job_defaults = {"replay_of": None, "replay_from_stage": None, "replay_overrides": None, "cancel_reason": None,
                    "client_id": None, "cancel_requested_by": None, "cancel_requested_at": None}
    run_keys = [c.key for c in StageRun.__table__.columns if c.key != "id"]

    def flush() -> None:
        with engine.begin() as connection:
            connection.execute(insert(Job.__table__), [{**job_defaults, **j} for j in jobs])
            connection.execute(insert(StageRun.__table__), [{k: r.get(k) for k in run_keys} for r in runs])
        jobs.clear()
        runs.clear()

    for job, job_runs in make_rows(n, rng_seed):
        jobs.append(job)
        runs.extend(job_runs)
        if len(jobs) >= batch:
            flush()
    if jobs:
        flush()
    if url.startswith("sqlite"):
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
    else:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--data-dir", default=None, help="SQLite under this directory (default: Settings)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()
    url = settings.resolved_database_url
    seconds = seed(url, args.jobs, rng_seed=args.seed)
    print(f"seeded {args.jobs} jobs ({args.jobs * len(STAGES)} stage rows) into {url.split('@')[-1]} "
          f"in {seconds:.1f} s")


if __name__ == "__main__":
    main()
