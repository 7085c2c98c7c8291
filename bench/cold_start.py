"""GPU worker cold start to the first frame, as on a new machine: a fresh process, empty Triton cache.

    python bench/cold_start.py            # writes a random 3B checkpoint (fp32 safetensors) first
    python bench/cold_start.py --checkpoint ROOT

Three runs, each a fresh process loading the LM the worker's way (model_cache.get_lm), report from the
process start: imports and CUDA context, the LM loaded (bf16 on the GPU, files hashed for the record),
the first frame (engine, prefill, frame 0: the fused Triton kernels compile here) and the second
(graph capture). The first run has an empty TRITON_CACHE_DIR (a new machine); the second reuses what
the first compiled (a worker restarted on its machine) and the model checksums the first stored in
the checksum cache; the third is that restart without the checksum cache, so every file is hashed
again beside the load. The page cache is warm for all (the checkpoint was just written).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(checkpoint: Path) -> None:
    import torch

    from bench.bench_lm import random_prompt
    from gpu_worker.checkpoints import file_checksums
    from gpu_worker.generation.fast_generate import generate_fast
    from gpu_worker.generation.generate import SamplingParams
    from gpu_worker.worker import model_cache

    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    if os.environ.get("SONGPIPE_BENCH_CHECKSUM_CACHE"):  # as the GPU stage does with its data directory
        file_checksums.use_cache_file(os.environ["SONGPIPE_BENCH_CHECKSUM_CACHE"])
    marks = {"imports + CUDA context": time.perf_counter() - STARTED}
    lm = model_cache.get_lm(checkpoint, dev, torch.bfloat16)
    torch.cuda.synchronize()
    marks["LM loaded"] = time.perf_counter() - STARTED
    prompt = random_prompt(lm.model.args, 300, seed=0)
    for frames, name in ((1, "first frame"), (2, "second frame")):
        params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=frames * 80)
        generate_fast(lm.model, prompt, params, seeds=[0])
        torch.cuda.synchronize()
        marks[name] = time.perf_counter() - STARTED
    print("RESULT " + json.dumps(marks), flush=True)


def run_child(checkpoint: Path, cache_root: Path, checksum_cache: Path | None) -> dict[str, float]:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_root / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor")}
    if checksum_cache is not None:
        env["SONGPIPE_BENCH_CHECKSUM_CACHE"] = str(checksum_cache)
    out = subprocess.run([sys.executable, __file__, "--child", str(checkpoint)],
                         env=env, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"cold-start child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from bench.table import print_table

    with tempfile.TemporaryDirectory(prefix="songpipe-cold-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from bench.bench_fast import REAL_CONFIG
            from bench.bench_lm import REAL_GEN_CONFIG, random_model, write_published_layout
            from gpu_worker.model.heartmula import PRESETS

            checkpoint = work / "ckpt"
            model = random_model(PRESETS["3B"], torch.device("cuda"), torch.bfloat16)
            write_published_layout(model, checkpoint, REAL_CONFIG, REAL_GEN_CONFIG)
            del model
            torch.cuda.empty_cache()
        rows = []
        checksums = work / "checksums.json"
        for run, cache in (("new machine: empty Triton and checksum caches", checksums),
                           ("worker restart: both caches of the run above", checksums),
                           ("worker restart without the checksum cache (files hashed again)", None)):
            marks = run_child(checkpoint, work, cache)
            row = {"run": run}
            row.update({f"{name} s": seconds for name, seconds in marks.items()})
            rows.append(row)
        print_table("GPU worker cold start to the first frame (seconds from process start)", rows)


if __name__ == "__main__":
    main()
