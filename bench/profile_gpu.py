"""Where the GPU time goes: kernel-time breakdown of one fast-path frame and of one codec window.

    python bench/profile_gpu.py                  # 3B LM frame (1 song, CFG) + published codec window
    python bench/profile_gpu.py --only lm --position 3000
    python bench/profile_gpu.py --only kernels   # the sampling kernels alone, per call

Prints, per workload, the kernels grouped by kind (GEMM, attention, norm, elementwise, ...) with their
count and total device time, and the top kernels by time. Use it before and after a speed change.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.bench_fast import _params, _random_codec_and_song, _setup  # noqa: E402
from bench.bench_lm import random_model, random_prompt  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.codec.fast_codec import FastCodec  # noqa: E402
from gpu_worker.generation.fast_generate import generate_fast, release_engines  # noqa: E402

KINDS = (  # first match wins; names as the CUDA kernels call themselves
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")),
    ("attention", ("fmha", "flash", "attention", "efficient")),
    ("conv", ("conv", "cudnn", "implicit")),
    ("topk/sort", ("topk", "sort", "radix", "gather_topk")),
    ("reduce", ("reduce", "softmax", "argmax", "norm")),
    ("triton (fused)", ("triton",)),
    ("index/copy", ("index", "copy", "cat", "scatter", "gather", "embedding")),
)


def _kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(key in low for key in keys):
            return kind
    return "elementwise/other"


def kernel_table(run: Callable[[], None], repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Profile `run` `repeats` times; (rows by kind, top-12 kernels), times per repeat in microseconds."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        kind = _kind(event.name)
        by_kind[kind][0] += 1
        by_kind[kind][1] += us
        by_name[event.name][0] += 1
        by_name[event.name][1] += us
    total = sum(v[1] for v in by_kind.values()) or 1.0
    kinds = [{"kind": k, "kernels": c / repeats, "us": t / repeats, "share": t / total}
             for k, (c, t) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])]
    kinds.append({"kind": "all", "kernels": sum(v[0] for v in by_kind.values()) / repeats,
                  "us": total / repeats, "share": 1.0})
    top = [{"kernel": n[:90], "count": c / repeats, "us": t / repeats}
           for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]]
    return kinds, top


def profile_lm(position: int, frames: int, fused: bool | None) -> None:
    dev = torch.device("cuda")
    args, dtype = _setup(dev, False)
    model = random_model(args, dev, dtype)
    prompt = random_prompt(args, position, seed=0)

    def song() -> None:
        generate_fast(model, [prompt], _params(1.5, frames), sync_every=frames,
                      seeds=[0],
                      **({} if fused is None else {"fused_kernels": fused}))

    song()  # engine, warm-up, capture
    start = time.perf_counter()
    song()
    wall = (time.perf_counter() - start) * 1e3 / frames
    kinds, top = kernel_table(song, 1)
    for row in kinds:
        row["us"] /= frames
        row["kernels"] /= frames
    for row in top:
        row["us"] /= frames
        row["count"] /= frames
    label = f"LM fast frame, 1 song CFG, position ~{position}, fused={fused} (wall {wall:.2f} ms/frame incl. prefill)"
    print_table(label + ": per frame by kind", kinds)
    print_table(label + ": top kernels per frame", top)
    release_engines()


def profile_codec(precision: str, compiled: bool) -> None:
    dev = torch.device("cuda")
    codec, codes = _random_codec_and_song(dev, False)
    fast = FastCodec(codec, precision=precision, **({"compile": True} if compiled else {}))
    window = codes[:, :372]
    gen = lambda: torch.Generator(device=dev).manual_seed(0)  # noqa: E731
    start = time.perf_counter()
    fast.decode(window, generator=gen())
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    fast.decode(window, generator=gen())
    torch.cuda.synchronize()
    again = time.perf_counter() - start
    kinds, top = kernel_table(lambda: fast.decode(window, generator=gen()), 1)
    label = f"codec window, {precision}, compiled={compiled} (first call {first:.2f} s, then {again:.3f} s)"
    print_table(label + ": by kind", kinds)
    print_table(label + ": top kernels", top)


def time_kernels(songs: int = 1) -> None:
    """Per-call microseconds of the sampling kernels against torch.topk (CUDA events, 200 calls)."""
    from gpu_worker.kernels import fused_ops
    dev = torch.device("cuda")
    z = torch.randn(songs, 8197, device=dev)
    noise = torch.empty(songs, 8197, device=dev).exponential_()

    def per_call(fn) -> float:
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / 200

    rows = [{"kernel": "torch.topk(z, 50)", "us/call": per_call(lambda: torch.topk(z, 50, dim=-1))}]
    top_k = torch.full((z.shape[0],), 50, device=z.device)
    for warps in (4, 8, 16, 32):
        rows.append({"kernel": f"topk_race_sample, {warps} warps", "us/call": per_call(
            lambda warps=warps: fused_ops.topk_race_sample(z, noise, top_k=top_k, rows=2, row_offset=0,
                                                           num_warps=warps))})
    print_table(f"sampling kernels, {songs} song(s)", rows)


def check_determinism(songs: int = 3, frames: int = 60) -> None:
    """Same seeds, same batch: is each fast-path variant repeatable, and do graph and eager agree?"""
    dev = torch.device("cuda")
    args, dtype = _setup(dev, False)
    model = random_model(args, dev, dtype)
    prompts = [random_prompt(args, 300 - 7 * i, seed=i) for i in range(songs)]

    def tokens(graphs: bool, fused: bool) -> list[torch.Tensor]:
        out = generate_fast(model, prompts, _params(1.5, frames), use_graphs=graphs, fused_kernels=fused,
                            seeds=list(range(songs)))
        release_engines()
        return [r.frames for r in out]

    def first_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
        return [int((~(x == y).all(0)).nonzero()[0]) if not torch.equal(x, y) else x.shape[1] for x, y in zip(a, b)]

    rows = []
    for fused in (False, True):
        eager1, eager2 = tokens(False, fused), tokens(False, fused)
        graph1, graph2 = tokens(True, fused), tokens(True, fused)
        rows.append({"variant": f"fused kernels {fused}", "eager vs eager": str(first_diff(eager1, eager2)),
                     "graph vs graph": str(first_diff(graph1, graph2)), "graph vs eager": str(first_diff(graph1, eager1))})
    print_table(f"first differing frame per song ({songs} songs, {frames} frames; {frames} = none)", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["lm", "codec", "kernels", "determinism"], action="append")
    parser.add_argument("--position", type=int, action="append", help="prompt length (KV fill) for the LM")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--fused", choices=["on", "off", "both", "default"], default="both")
    parser.add_argument("--codec-compile", choices=["on", "off", "both"], default="off")
    options = parser.parse_args()
    only = options.only or ["lm", "codec"]
    if "determinism" in only:
        check_determinism()
    if "kernels" in only:
        time_kernels(1)
        time_kernels(8)
    if "lm" in only:
        fused = {"on": [True], "off": [False], "both": [False, True], "default": [None]}[options.fused]
        for position in options.position or [300]:
            for flag in fused:
                profile_lm(position, options.frames, flag)
    if "codec" in only:
        for compiled in {"on": [True], "off": [False], "both": [False, True]}[options.codec_compile]:
            profile_codec("bf16", compiled)


if __name__ == "__main__":
    main()
