"""The frame step's Triton kernels compiled before the LM has loaded (a new machine's first frame).

On a new machine every fused kernel of the frame step (gpu_worker/kernels/fused_ops.py) is compiled at
the first frame, one after another, after the LM has loaded. The kernels depend on the model's
dimensions only (head size, head counts, widths, vocabulary), never on its weights or its depth, and
Triton keys a compiled kernel by its source, its constants and how its arguments specialise (dtype,
alignment, divisibility by 16, the value 1). So one frame step of a one-layer model with the
checkpoint's dimensions and zero weights compiles exactly the kernels the real engine will ask for,
and it can run while the real weights are still being read: the engine's first frame then finds them
in Triton's in-process and on-disk caches (docs/streaming.md, "Cold start").
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from gpu_worker.generation.fast_generate import FrameEngine, fused_kernels_for
from gpu_worker.model.heartmula import HeartMuLa, HeartMuLaArgs
from gpu_worker.model.meta_build import meta_modules

WARMUP_TEXT_VOCAB = 16  # the text embedding is read only by prefill, which runs no fused kernel
WARMUP_CACHE_LEN = 512  # one key bucket: strides stay multiples of 16, as at every production length


def warmup_args(args: HeartMuLaArgs) -> HeartMuLaArgs:
    """`args` with one layer per stack and a token text vocabulary: the same kernels, little memory."""
    return dataclasses.replace(args, text_vocab_size=WARMUP_TEXT_VOCAB,
                               backbone=dataclasses.replace(args.backbone, num_layers=1),
                               decoder=dataclasses.replace(args.decoder, num_layers=1))


def compile_frame_kernels(args: HeartMuLaArgs, device: torch.device, dtype: torch.dtype, *,
                          audio_eos_id: int, fused: bool | None = None) -> float:
    """Run one eager frame step of a zero-weight one-layer model of `args` on `device`; returns seconds.

    Only where the engine itself uses the fused kernels (CUDA, Triton, a half dtype; `fused` forces it, for
    Triton's CPU interpreter in tests); elsewhere it returns 0.0 at once. On CUDA it runs on a side stream
    of its own, so it never joins another thread's graph capture.
    """
    if not (fused_kernels_for(device, dtype) if fused is None else fused):
        return 0.0
    started = time.monotonic()
    with meta_modules():
        model = HeartMuLa(warmup_args(args)).to(dtype)
    model = model.to_empty(device=device)
    side = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
    with side, torch.inference_mode():
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
