"""The frame step's Triton kernels compiled before the LM has loaded, by processes that never touch the GPU.

On a new machine every fused kernel of the frame step (gpu_worker/kernels/fused_ops.py) is compiled at
the first frame, one after another, after the LM has loaded. The kernels depend on the model's
dimensions only (head size, head counts, widths, vocabulary), never on its weights or its depth, and
Triton keys a compiled kernel by its source, its constants, how its arguments specialise (dtype,
alignment, divisibility by 16, the value 1) and the target (CUDA, compute capability, warp size). So one
frame step of a one-layer model with the checkpoint's dimensions asks for exactly the kernels the real
engine will ask for, and it can run while the real weights are still being read: the engine's first
frame then finds them in Triton's on-disk cache (docs/streaming.md, "Cold start").

That step runs on PyTorch's meta device (shapes only, nothing computed, no memory) with Triton told the
card's target and asked to compile each kernel instead of launching it (`compile_only`). A compiling
process therefore needs no CUDA context and no device memory, and can start before the worker has made
its own: `compile_in_processes` starts several at once, each compiling its share of the kernels (the
k-th of every n kernels in the order the step asks for them), into the worker's Triton cache directory
(TRITON_CACHE_DIR, inherited). Each also builds the kernel's launcher where the CUDA driver library is
present (older Tritons compile a C launcher per kernel signature), so the first frame compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gpu_worker.generation.fast_generate import FrameEngine, fused_kernels_for
from gpu_worker.model.heartmula import HeartMuLa, HeartMuLaArgs, TransformerArgs
from gpu_worker.model.meta_build import meta_modules

WARMUP_TEXT_VOCAB = 16  # the text embedding is read only by prefill, which runs no fused kernel
WARMUP_CACHE_LEN = 512  # one key bucket: strides stay multiples of 16, as at every production length
MAX_CHILDREN = 8  # a frame step asks for about ten kernels; more processes would mostly import torch
CHILD_TIMEOUT_S = 300.0
WARP_SIZE = 32


def warmup_args(args: HeartMuLaArgs) -> HeartMuLaArgs:
    """`args` with one layer per stack and a token text vocabulary: the same kernels, a smaller model."""
    return dataclasses.replace(args, text_vocab_size=WARMUP_TEXT_VOCAB,
                               backbone=dataclasses.replace(args.backbone, num_layers=1),
                               decoder=dataclasses.replace(args.decoder, num_layers=1))


def meta_frame_step(args: HeartMuLaArgs, dtype: torch.dtype, *, audio_eos_id: int) -> None:
    """One eager frame step of a one-layer model of `args` on the meta device, with the fused kernels:
    every kernel the engine's frame step launches is asked for, and nothing is computed."""
    with meta_modules():
        model = HeartMuLa(warmup_args(args)).to(dtype)
    with torch.inference_mode():
        engine = FrameEngine(model, num_songs=1, rows=2, cache_len=min(WARMUP_CACHE_LEN, args.backbone.max_seq_len),
                             max_frames=2, audio_eos_id=audio_eos_id, use_graphs=False, fused_kernels=True)
        engine.done.fill_(False)
        engine.limit.fill_(1)
        engine.step(0)


class _CompileOnlyDriver:
    """Triton's view of the card while compiling only: the target given, device 0, stream 0. Whatever else
    is asked of it (a launcher's helpers) comes from the real CUDA driver, where its library loads."""

    def __init__(self, target: Any):
        self.target = target
        self._real: Any = None

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def __getattr__(self, name: str) -> Any:
        if self._real is None:
            from triton.backends.nvidia.driver import CudaDriver

            self._real = CudaDriver()  # loads libcuda; no context, no device memory
        return getattr(self._real, name)


@contextlib.contextmanager
def compile_only(capability: int, share: tuple[int, int] = (0, 1)) -> Iterator[dict[str, int]]:
    """Inside, a Triton kernel asked for is compiled for a CUDA card of `capability` (90: sm_90) into the
    Triton cache, and never launched. `share` (k, n): only the k-th of every n distinct kernels (in the
    order first asked for) is compiled; the others are skipped. Yields counts: kernels asked for, compiled,
    launchers built."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    index, count = share
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count}")
    fake = _CompileOnlyDriver(GPUTarget("cuda", capability, WARP_SIZE))
    seen: dict[tuple[str, str], int] = {}
    done: set[int] = set()
    counts = {"asked": 0, "compiled": 0, "launchers": 0}
    real_run = JITFunction.run

    def skip_others(*, key: Any, fn: Any, **_kwargs: Any) -> bool:
        ordinal = seen.setdefault((fn.name, str(key)), len(seen))
        return ordinal % count != index  # True: not compiled here

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        counts["asked"] = len(seen)
        if kernel is not None and id(kernel) not in done:
            done.add(id(kernel))
            counts["compiled"] += 1
            with contextlib.suppress(Exception):  # no CUDA driver library (a CPU host): the kernel is enough
                fake.launcher_cls(kernel.src, kernel.metadata)
                counts["launchers"] += 1
        return kernel

    saved_hook, saved_driver = knobs.runtime.jit_cache_hook, getattr(driver, "_active", None)
    driver.set_active(fake)
    knobs.runtime.jit_cache_hook = skip_others
    JITFunction.run = compile_instead  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        JITFunction.run = real_run  # type: ignore[method-assign]
        knobs.runtime.jit_cache_hook = saved_hook
        driver.set_active(saved_driver)  # not reset_active(): that makes a real driver, which a CPU host lacks


def cuda_capability(ordinal: int) -> int:
    """Compute capability of CUDA device `ordinal` (90 for sm_90) from the driver library alone: no context
    is made, so it costs nothing of the device and can come before the worker's own CUDA start."""
    lib = ctypes.CDLL("libcuda.so.1")
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    for call in (lambda: lib.cuInit(0), lambda: lib.cuDeviceGet(ctypes.byref(device), ordinal),
                 lambda: lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device),  # ..._COMPUTE_CAPABILITY_MAJOR
                 lambda: lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)):  # ..._MINOR
        status = call()
        if status:
            raise RuntimeError(f"CUDA driver error {status} reading the capability of device {ordinal}")
    return major.value * 10 + minor.value


def child_count(cpus: int | None = None) -> int:
    """Compiling processes to start: one core left to the worker itself, at most `MAX_CHILDREN`."""
    available = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(MAX_CHILDREN, available - 1))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    seconds: float
    children: int
    asked: int  # distinct kernels the frame step asked for (each child sees them all)
    compiled: int  # kernels the children compiled or found in the cache, together
    launchers: int


NOTHING_TO_COMPILE = CompileReport(0.0, 0, 0, 0, 0)


def compile_in_processes(args: HeartMuLaArgs, device: torch.device, dtype: torch.dtype, *, audio_eos_id: int,
                         capability: int | None = None, children: int | None = None) -> CompileReport:
    """The frame step's kernels compiled by `children` processes at once (default `child_count()`), for
    `device` (its capability read from the driver unless given).

    Only where the engine uses the fused kernels (CUDA, Triton, a half dtype); elsewhere nothing at once. The
    children fill the Triton cache directory this process uses (its environment is inherited, less
    TRITON_INTERPRET: they compile for the card). Children that fail raise here; the first frame then
    compiles what is missing itself.
    """
    if not fused_kernels_for(device, dtype):
        return NOTHING_TO_COMPILE
    capability = cuda_capability(device.index or 0) if capability is None else capability
    count = child_count() if children is None else children
    started = time.monotonic()
    spec = json.dumps(dataclasses.asdict(args))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gpu_worker.generation.kernel_warmup", "--args", spec, "--eos", str(audio_eos_id),
         "--dtype", str(dtype).removeprefix("torch."), "--capability", str(capability), "--share", f"{k}/{count}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(count)]
    failures, reports = [], []
    for k, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode:
            failures.append(f"share {k}/{count}: exit {proc.returncode}: {err.strip()[-500:]}")
        else:
            reports.append(json.loads(out.strip().splitlines()[-1]))
    if failures:
        raise RuntimeError("kernel warm-up children failed: " + "; ".join(failures))
    return CompileReport(seconds=time.monotonic() - started, children=count,
                         asked=max(r["asked"] for r in reports), compiled=sum(r["compiled"] for r in reports),
                         launchers=sum(r["launchers"] for r in reports))


def _args_from_json(text: str) -> HeartMuLaArgs:
    spec = json.loads(text)
    return HeartMuLaArgs(backbone=TransformerArgs(**spec.pop("backbone")),
                         decoder=TransformerArgs(**spec.pop("decoder")), **spec)


def _share(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compile a share of the frame step's Triton kernels for a card "
                                     "(a child of compile_in_processes; touches no GPU)")
    parser.add_argument("--args", required=True, help="HeartMuLaArgs as JSON")
    parser.add_argument("--eos", type=int, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--capability", type=int, required=True, help="compute capability, e.g. 90")
    parser.add_argument("--share", type=_share, default=(0, 1), help="k/n: the k-th of every n kernels")
    opts = parser.parse_args(argv)
    with compile_only(opts.capability, opts.share) as counts:
        meta_frame_step(_args_from_json(opts.args), getattr(torch, opts.dtype), audio_eos_id=opts.eos)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
