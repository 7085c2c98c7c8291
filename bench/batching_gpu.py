"""Continuous batching through Celery at the real sizes: N songs at once vs one song alone.

Real-size random checkpoint (as bench/e2e_celery.py), the GPU worker in batching mode
(SONGPIPE_GPU_BATCHING=1: threads pool, one engine per GPU), bf16 codec estimator. Submits one
song alone, then N songs together, and prints the token stage's duration and recorded batch size
per song from SQL.

    python bench/batching_gpu.py --songs 8 --seconds 30
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e_celery import LYRICS, write_real_size_checkpoint  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.worker.batching import DEFAULT_MAX_SONGS  # noqa: E402
from tests.stack_fixtures import database, redis_server, running_stack  # noqa: E402


def token_rows(jobs: list[dict]) -> list[dict]:
    rows = []
    for job in jobs:
        stage = next(s for s in job["stages"] if s["stage"] == "generate_tokens")
        outputs = stage.get("outputs") or {}
        rows.append({"job": job["id"][:8], "status": job["status"], "frames": outputs.get("frames"),
                     "batch_size": outputs.get("batch_size"), "token stage s": stage.get("duration_s"),
                     "ms/frame": 1000 * stage["duration_s"] / outputs["frames"] if outputs.get("frames") else None,
                     "error": stage.get("error_message")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="songpipe-batching-") as tmp:
        work = Path(tmp)
        for what, seconds in write_real_size_checkpoint(work / "ckpt").items():
            print(f"{what}: {seconds:.1f} s", flush=True)
        env = {"SONGPIPE_DEVICE": "cuda", "SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_CODEC_DTYPE": "bfloat16"}
        with redis_server(work / "redis") as redis, database("sqlite", work / "db") as url:
            with running_stack("batching", work / "stack", url, redis.claim_db(), work / "ckpt", extra_env=env,
                               gpu_pool=("threads", DEFAULT_MAX_SONGS),
                               gpu_extra_args=("--include", "gpu_worker.worker.batching")) as stack:
                body = {"lyrics": LYRICS, "tags": "ska,upbeat,brass", "output_format": "wav",
                        "max_audio_length_ms": args.seconds * 1000}
                start = time.perf_counter()
                alone = stack.wait_for_job(stack.submit({**body, "seed": 1})["id"], timeout_s=300)
                print(f"one song alone (cold worker): {alone['status']} in {time.perf_counter() - start:.1f} s")
                start = time.perf_counter()
                alone2 = stack.wait_for_job(stack.submit({**body, "seed": 2})["id"], timeout_s=300)
                print(f"one song alone (warm): {alone2['status']} in {time.perf_counter() - start:.1f} s")
                start = time.perf_counter()
                ids = [stack.submit({**body, "seed": 10 + i})["id"] for i in range(args.songs)]
                jobs = [stack.wait_for_job(job_id, timeout_s=300) for job_id in ids]
                wall = time.perf_counter() - start
                print(f"{args.songs} songs together: {wall:.1f} s wall from first submission to last audio")
                print_table("token stage, one song alone (warm)", token_rows([alone2]))
                print_table(f"token stage, {args.songs} songs submitted together", token_rows(jobs))
                if not all(j["status"] == "succeeded" for j in jobs + [alone, alone2]):
                    print(stack.logs())


if __name__ == "__main__":
    main()
