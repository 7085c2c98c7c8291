"""The two parts of a GPU worker's cold start before its first frame: loading the LM and compiling the kernels.

    python bench/lm_load.py --checkpoint ROOT      # a published-layout checkpoint (bench/e2e_celery.py writes one)

Each row is a fresh process (same page cache: the files were just written or read):
* `load`: the LM's weight files to bf16 on the GPU, per tensor through safetensors with the cast on the host
  (the loader before) and memory-mapped with the cast on the GPU at 1, 4 and 8 threads
  (`WeightFiles.load_many`, the loader now); seconds, and GB/s of file bytes.
* `kernels`: the kernel warm-up (`compile_children.start_children`, children that touch no GPU) alone
  into an empty Triton cache at 1 and 10 children, with the shipped kernel manifest (no torch in the
  children) and without one (each child traces the frame step on the meta device), then the batching
  engine's first frame (CUDA graphs, the worker's slot count, a one-layer zero model of the checkpoint's
  dimensions) in a fresh process, on the caches the 10-child warm-ups left and on an empty one: seconds
  and how many kernels that frame still compiled itself (new cache entries).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_lm import AUDIO_EOS_ID  # noqa: E402


def child(mode: str, checkpoint: Path, threads: int) -> dict:
    import torch

    from gpu_worker.checkpoints.checkpoint_files import WeightFiles
    from gpu_worker.checkpoints.heartmula_checkpoint import find_lm_folder

    device = torch.device("cuda")
    torch.zeros(1, device=device)
    folder = find_lm_folder(checkpoint)
    if mode.startswith("profile-"):
        return _profiled(mode.removeprefix("profile-"), checkpoint, device)
    if mode in ("warm-up", "warm-up-trace"):  # `threads`: the number of children
        from gpu_worker.generation.compile_children import cuda_capability, start_children

        with tempfile.TemporaryDirectory(prefix="songpipe-no-manifest-") as empty:  # no manifest in it: trace
            manifests = Path(empty) if mode == "warm-up-trace" else None
            report = start_children(checkpoint, "bfloat16", cuda_capability(0), children=threads,
                                    manifests=manifests).wait()
        return {"seconds": report.seconds, "kernels": report.compiled, "launchers": report.launchers,
                "found by": report.source}
    if mode == "first-frame":
        return _first_frame(folder, device)
    if mode == "kernel-times":
        return _kernel_times(checkpoint)
    files = WeightFiles(folder)
    names = list(files.tensors)
    size = sum(p.stat().st_size for p in files.files)
    started = time.perf_counter()
    if mode == "per-tensor":
        state = {name: files.load(name, device=device, dtype=torch.bfloat16) for name in names}
    else:
        state = files.load_many(names, device=device, dtype=torch.bfloat16, threads=threads)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "file GB/s": size / seconds / 1e9, "file GB": size / 1e9, "tensors": len(state)}


def _cache_entries() -> set[str]:
    return {p.name for p in Path(os.environ["TRITON_CACHE_DIR"]).glob("*") if p.is_dir()}


def _first_frame(folder: Path, device) -> dict:
    """The batching engine's first 1-frame song on a one-layer zero model of the checkpoint's dimensions:
    seconds, and the Triton cache entries it added (kernels it compiled itself, launchers included)."""
    import torch

    from bench.bench_lm import random_prompt
    from gpu_worker.checkpoints.heartmula_checkpoint import read_lm_config
    from gpu_worker.generation.generate import SamplingParams
    from gpu_worker.generation.kernel_warmup import warmup_args
    from gpu_worker.model.heartmula import HeartMuLa
    from gpu_worker.model.meta_build import meta_modules
    from gpu_worker.worker.batching import get_engine
    from tasks.settings import get_settings

    _config, args = read_lm_config(folder)
    with meta_modules():
        model = HeartMuLa(warmup_args(args)).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    before = _cache_entries()
    started = time.perf_counter()
    engine = get_engine(model, max_songs=get_settings().gpu_batch_slots)
    params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=80)
    engine.submit(random_prompt(model.args, 300, seed=0), params, 0).result()
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "new cache entries": len(_cache_entries() - before)}


def _kernel_times(checkpoint: Path) -> dict:
    """What one warm-up child does, in this process (CUDA already started, so torch's import is not in it),
    timed by phase, and each kernel's compile and launcher build; printed, with the totals returned."""
    import torch
    from triton.backends.nvidia import driver as nvidia_driver
    from triton.runtime.jit import JITFunction

    from gpu_worker.checkpoints.heartmula_checkpoint import find_lm_folder, read_lm_config
    from gpu_worker.generation import card_compile, kernel_warmup

    major, minor = torch.cuda.get_device_capability()
    _config, args = read_lm_config(find_lm_folder(checkpoint))
    compiles: list[tuple[str, float]] = []
    launchers: list[float] = []
    real_run, real_launcher = JITFunction.run, nvidia_driver.CudaLauncher.__init__

    def timed_run(self, *a, **k):
        started = time.perf_counter()
        try:
            return real_run(self, *a, **k)
        finally:
            compiles.append((self.fn.__name__, time.perf_counter() - started))

    def timed_launcher(self, *a, **k):
        started = time.perf_counter()
        try:
            return real_launcher(self, *a, **k)
        finally:
            launchers.append(time.perf_counter() - started)

    JITFunction.run = timed_run
    nvidia_driver.CudaLauncher.__init__ = timed_launcher
    started = time.perf_counter()
    with card_compile.compile_only(major * 10 + minor) as counts:
        kernel_warmup.meta_frame_step(args, torch.bfloat16, audio_eos_id=AUDIO_EOS_ID)
    total = time.perf_counter() - started
    for name, seconds in compiles:
        if seconds > 0.01:
            print(f"kernel {name}: {seconds:.3f} s (launcher builds are inside the step, not here)")
    print(f"launcher builds: {len(launchers)}, {sum(launchers):.3f} s: {[round(s, 3) for s in launchers]}")
    return {"seconds": total, "compile s": sum(s for _n, s in compiles), "launcher s": sum(launchers), **counts}


def _profiled(what: str, checkpoint: Path, device) -> dict:
    """cProfile of the worker's LM load (checksum cache in TRITON_CACHE_DIR's parent) or of the kernel
    warm-up; the top functions by cumulative time are printed."""
    import cProfile
    import io
    import pstats

    import torch

    from gpu_worker.checkpoints import file_checksums
    from gpu_worker.checkpoints.heartmula_checkpoint import find_lm_folder, read_lm_config
    from gpu_worker.generation.card_compile import compile_only
    from gpu_worker.generation.kernel_warmup import meta_frame_step
    from gpu_worker.worker import model_cache

    data = Path(os.environ["TRITON_CACHE_DIR"]).parent
    file_checksums.use_cache_file(data / "checksums.json")
    _config, args = read_lm_config(find_lm_folder(checkpoint))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    if what == "load":
        model_cache.get_lm(checkpoint, device, torch.bfloat16)
    else:  # what one warm-up child does
        major, minor = torch.cuda.get_device_capability(device)
        with compile_only(major * 10 + minor):
            meta_frame_step(args, torch.bfloat16, audio_eos_id=AUDIO_EOS_ID)
    torch.cuda.synchronize()
    profiler.disable()
    seconds = time.perf_counter() - started
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(22)
    print(f"--- profile of {what} ({seconds:.2f} s)")
    print("\n".join(line[:150] for line in text.getvalue().splitlines()[6:40]))
    return {"seconds": seconds}


def run(mode: str, checkpoint: Path, threads: int = 1, cache: Path | None = None, echo: bool = False) -> dict:
    """One child run; its RESULT line parsed (`echo`: its other output printed too)."""
    env = dict(os.environ)
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint),
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=False)
    if echo:
        print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("RESULT ")))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{mode} child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--only", default="load,kernels")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    if opts.child:
        print("RESULT " + json.dumps(child(opts.child, opts.checkpoint, opts.threads)), flush=True)
        return
    from bench.table import print_table

    only = set(opts.only.split(","))
    if "load" in only:
        rows = [{"loader": "per tensor, cast on the host (before)", **run("per-tensor", opts.checkpoint)}]
        for threads in (1, 4, 8):
            rows.append({"loader": f"mapped, cast on the GPU, {threads} threads",
                         **run("mapped", opts.checkpoint, threads)})
            print(json.dumps(rows[-1]), flush=True)
        print_table("the LM's weights to bf16 on the GPU (fresh process each, warm page cache)", rows)
    if "profile" in only:
        with tempfile.TemporaryDirectory(prefix="songpipe-prof-") as tmp:
            profile_cache = Path(tmp) / "triton"
            profile_cache.mkdir()
            for mode in ("profile-load", "profile-load", "profile-kernels", "profile-kernels"):
                run(mode, opts.checkpoint, cache=profile_cache, echo=True)
    if "kernel-times" in only:
        with tempfile.TemporaryDirectory(prefix="songpipe-triton-") as tmp:
            for run_name in ("empty cache", "the cache the run before left"):
                print(f"--- one warm-up child's work in a CUDA process, {run_name}", flush=True)
                print(json.dumps(run("kernel-times", opts.checkpoint, cache=Path(tmp), echo=True)), flush=True)
    if "kernels" in only:
        rows = []
        for children, mode in ((1, "warm-up-trace"), (1, "warm-up"), (10, "warm-up-trace"), (10, "warm-up")):
            with tempfile.TemporaryDirectory(prefix="songpipe-triton-") as tmp:
                rows.append({"run": f"kernel warm-up, {children} children, empty cache",
                             **run(mode, opts.checkpoint, threads=children, cache=Path(tmp))})
                print(json.dumps(rows[-1]), flush=True)
                if children == 10:
                    rows.append({"run": f"engine's first frame on the cache that warm-up ({mode}) left",
                                 **run("first-frame", opts.checkpoint, cache=Path(tmp))})
        with tempfile.TemporaryDirectory(prefix="songpipe-triton-") as tmp:
            rows.append({"run": "engine's first frame on an empty cache",
                         **run("first-frame", opts.checkpoint, cache=Path(tmp))})
        print_table("the frame step's kernels: the warm-up alone, then the engine's first frame (fresh process "
                    "each)", rows)


if __name__ == "__main__":
    main()
