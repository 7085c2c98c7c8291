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
its own: gpu_worker/generation/compile_children.py starts several at once, each running `main` here to
compile its share of the kernels (the k-th of every n kernels in the order the step asks for them) into
the worker's Triton cache directory (TRITON_CACHE_DIR, inherited). Each also builds the kernel's launcher
where the CUDA driver library is present (older Tritons compile a C launcher per kernel signature), so
the first frame compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gpu_worker.checkpoints.heartmula_checkpoint import GEN_CONFIG_NAME, find_lm_folder, parse_gen_config, read_lm_config
from gpu_worker.generation.fast_generate import FrameEngine
from gpu_worker.kernels import fused_ops
from gpu_worker.model.heartmula import HeartMuLa, HeartMuLaArgs
from gpu_worker.model.meta_build import meta_modules

WARMUP_TEXT_VOCAB = 16  # the text embedding is read only by prefill, which runs no fused kernel
WARMUP_CACHE_LEN = 512  # one key bucket: strides stay multiples of 16, as at every production length
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


def _share(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compile a share of the frame step's Triton kernels for a card "
                                     "(a child of compile_children.start_children; touches no GPU)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint root (the LM folder inside)")
    parser.add_argument("--dtype", required=True, choices=("bfloat16", "float16"))
    parser.add_argument("--capability", type=int, required=True, help="compute capability, e.g. 90")
    parser.add_argument("--share", type=_share, default=(0, 1), help="k/n: the k-th of every n kernels")
    opts = parser.parse_args(argv)
    counts = {"asked": 0, "compiled": 0, "launchers": 0}
    if fused_ops.triton_available():
        _config, args = read_lm_config(find_lm_folder(opts.checkpoint))
        eos = parse_gen_config(opts.checkpoint / GEN_CONFIG_NAME).audio_eos_id
        with compile_only(opts.capability, opts.share) as counts:
            meta_frame_step(args, getattr(torch, opts.dtype), audio_eos_id=eos)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
