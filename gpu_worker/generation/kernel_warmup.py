"""The frame step's Triton kernels compiled before the LM has loaded (a new machine's first frame).

On a new machine every fused kernel of the frame step (gpu_worker/kernels/fused_ops.py) is compiled at
the first frame, one after another, after the LM has loaded. The kernels depend on the model's
dimensions only (head size, head counts, widths, vocabulary), never on its weights or its depth, and
Triton keys a compiled kernel by its source, its constants and how its arguments specialise (dtype,
alignment, divisibility by 16, the value 1). So one frame step of a one-layer model with the
checkpoint's dimensions and zero weights compiles exactly the kernels the real engine will ask for,
and it can run while the real weights are still being read: the engine's first frame then finds them
in Triton's in-process and on-disk caches (docs/streaming.md, "Cold start").

Compiling is host work that holds the interpreter lock most of the time, so `compile_in_processes`
runs it in a few child processes, each compiling the kernels of some of the fused ops (the others
replaced by stubs that only return tensors of the right shapes), all at once and beside the parent's
LM load. They share the parent's Triton cache directory (TRITON_CACHE_DIR, set by the worker).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gpu_worker.generation.fast_generate import FrameEngine, fused_kernels_for
from gpu_worker.kernels import fused_ops
from gpu_worker.model.heartmula import HeartMuLa, HeartMuLaArgs, TransformerArgs
from gpu_worker.model.meta_build import meta_modules

WARMUP_TEXT_VOCAB = 16  # the text embedding is read only by prefill, which runs no fused kernel
WARMUP_CACHE_LEN = 512  # one key bucket: strides stay multiples of 16, as at every production length


def warmup_args(args: HeartMuLaArgs) -> HeartMuLaArgs:
    """`args` with one layer per stack and a token text vocabulary: the same kernels, little memory."""
    return dataclasses.replace(args, text_vocab_size=WARMUP_TEXT_VOCAB,
                               backbone=dataclasses.replace(args.backbone, num_layers=1),
                               decoder=dataclasses.replace(args.decoder, num_layers=1))


# the fused ops of a frame step, in groups of about the same compile time (one child process each)
OP_GROUPS: tuple[tuple[str, ...], ...] = (("decode_attention",), ("rope_to_cache", "rms_norm", "silu_mul"),
                                          ("guided_logits", "topk_race_sample"))
CHILD_TIMEOUT_S = 300.0
CHILD_OVERHEAD_BYTES = 1 << 30  # a child's CUDA context and allocator slack, beside its one-layer model
HEADROOM_BYTES = 2 << 30  # left free for the parent beyond its LM's weights


def _shape_stub(name: str) -> Callable[..., Any]:
    """A stand-in for fused op `name` that launches nothing and returns outputs of the right shapes."""
    def rms_norm(x, scale, eps, out=None):
        return torch.empty_like(x) if out is None else out

    def rope_to_cache(qkv, cos, sin, base, k_cache, v_cache, *, heads, kv_heads, head_dim, cache_rows=None):
        return qkv.new_empty(qkv.shape[0], heads, qkv.shape[1], head_dim)

    def decode_attention(q, *args, **kwargs):
        return torch.empty_like(q)

    def silu_mul(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    def guided_logits(logits, forbidden, *, rows, cfg_scale, temperature):
        return logits.new_zeros(logits.shape[0] // rows, logits.shape[1], dtype=torch.float32)

    def topk_race_sample(z, noise, *, top_k, rows, row_offset, num_warps=None, hashed=None):
        songs = z.shape[0]
        return (torch.zeros(songs, dtype=torch.int32, device=z.device),
                torch.zeros(songs * rows, dtype=torch.int64, device=z.device))
    return locals()[name]


@contextlib.contextmanager
def _only_ops(ops: Sequence[str] | None) -> Iterator[None]:
    """Every fused op not in `ops` replaced by its shape stub (None: all real). For a child process."""
    if ops is None:
        yield
        return
    unknown = set(ops) - {name for group in OP_GROUPS for name in group}
    if unknown:
        raise ValueError(f"unknown fused ops {sorted(unknown)}")
    saved = {name: getattr(fused_ops, name) for group in OP_GROUPS for name in group if name not in ops}
    for name in saved:
        setattr(fused_ops, name, _shape_stub(name))
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(fused_ops, name, real)


def compile_frame_kernels(args: HeartMuLaArgs, device: torch.device, dtype: torch.dtype, *,
                          audio_eos_id: int, fused: bool | None = None, ops: Sequence[str] | None = None) -> float:
    """Run one eager frame step of a zero-weight one-layer model of `args` on `device`; returns seconds.

    Only where the engine itself uses the fused kernels (CUDA, Triton, a half dtype; `fused` forces it, for
    Triton's CPU interpreter in tests); elsewhere it returns 0.0 at once. On CUDA it runs on a side stream
    of its own, so it never joins another thread's graph capture. `ops`: compile only these fused ops'
    kernels (the others are stubbed: a child process's share of `compile_in_processes`).
    """
    if not (fused_kernels_for(device, dtype) if fused is None else fused):
        return 0.0
    started = time.monotonic()
    with meta_modules():
        model = HeartMuLa(warmup_args(args)).to(dtype)
    model = model.to_empty(device=device)
    side = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
    with side, torch.inference_mode(), _only_ops(ops):
        for param in model.parameters():
            param.zero_()
        engine = FrameEngine(model, num_songs=1, rows=2, cache_len=min(WARMUP_CACHE_LEN, args.backbone.max_seq_len),
                             max_frames=2,
                             audio_eos_id=audio_eos_id, use_graphs=False, fused_kernels=True)
        engine.done.fill_(False)
        engine.limit.fill_(1)
        engine.step(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del engine, model
    return time.monotonic() - started


def parameter_bytes(args: HeartMuLaArgs, dtype: torch.dtype) -> int:
    with meta_modules():
        model = HeartMuLa(args)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def plan_children(free_bytes: int, child_bytes: int, reserve_bytes: int,
                  groups: Sequence[Sequence[str]] = OP_GROUPS) -> list[tuple[str, ...]]:
    """The op groups merged into as many children as the free device memory holds beside `reserve_bytes`
    (what the parent still needs); an empty plan when not one fits."""
    fit = max(0, (free_bytes - reserve_bytes) // max(child_bytes, 1))
    count = min(len(groups), fit)
    if count == 0:
        return []
    merged: list[list[str]] = [[] for _ in range(count)]
    for index, group in enumerate(groups):
        merged[index % count].extend(group)
    return [tuple(ops) for ops in merged]


def compile_in_processes(args: HeartMuLaArgs, device: torch.device, dtype: torch.dtype, *,
                         audio_eos_id: int) -> float:
    """`compile_frame_kernels` split over child processes (one per op group), all at once; returns seconds.

    As many children start as the device's free memory holds beside the LM still to load (their groups
    merged otherwise; none when not one fits: the first frame then compiles). The children fill the
    Triton cache directory this process uses (its environment is inherited). Children that fail raise
    here; the first frame then compiles what is missing itself.
    """
    if not fused_kernels_for(device, dtype):
        return 0.0
    free, _total = torch.cuda.mem_get_info(device)
    groups = plan_children(free, parameter_bytes(warmup_args(args), dtype) + CHILD_OVERHEAD_BYTES,
                           parameter_bytes(args, dtype) + HEADROOM_BYTES)
    started = time.monotonic()
    spec = json.dumps(dataclasses.asdict(args))
    children = [subprocess.Popen(
        [sys.executable, "-m", "gpu_worker.generation.kernel_warmup", "--args", spec, "--eos", str(audio_eos_id),
         "--device", str(device), "--dtype", str(dtype).removeprefix("torch."), "--ops", ",".join(group)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for group in groups]
    failures = []
    for child, group in zip(children, groups):
        try:
            _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        if child.returncode:
            failures.append(f"{','.join(group)}: exit {child.returncode}: {err.strip()[-500:]}")
    if failures:
        raise RuntimeError("kernel warm-up children failed: " + "; ".join(failures))
    return time.monotonic() - started


def _args_from_json(text: str) -> HeartMuLaArgs:
    spec = json.loads(text)
    return HeartMuLaArgs(backbone=TransformerArgs(**spec.pop("backbone")),
                         decoder=TransformerArgs(**spec.pop("decoder")), **spec)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compile some of the frame step's Triton kernels (a child of "
                                     "compile_in_processes)")
    parser.add_argument("--args", required=True, help="HeartMuLaArgs as JSON")
    parser.add_argument("--eos", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--ops", required=True, help="comma-separated fused op names")
    opts = parser.parse_args(argv)
    compile_frame_kernels(_args_from_json(opts.args), torch.device(opts.device), getattr(torch, opts.dtype),
                          audio_eos_id=opts.eos, ops=opts.ops.split(","))


if __name__ == "__main__":
    main()
