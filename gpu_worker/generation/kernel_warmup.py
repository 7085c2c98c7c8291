"""The frame step's Triton kernels compiled before the LM has loaded, by processes that never touch the GPU.

On a new machine every fused kernel of the frame step (gpu_worker/kernels/fused_ops.py) is compiled at
the first frame, one after another, after the LM has loaded. The kernels depend on the model's
dimensions only (head size, head counts, widths, vocabulary), never on its weights or its depth, and
Triton keys a compiled kernel by its source, its constants, how its arguments specialise (dtype,
alignment, divisibility by 16, the value 1) and the target (CUDA, compute capability, warp size). So one
frame step of a one-layer model with the checkpoint's dimensions asks for exactly the kernels the real
engine will ask for, and it can run while the real weights are still being read: the engine's first
frame then finds them in Triton's on-disk cache (docs/streaming.md, "Cold start").

That step runs on PyTorch's meta device (shapes only, nothing computed, no memory), under
gpu_worker/generation/card_compile.py's `compile_only` (Triton told the card's target, each kernel
compiled instead of launched), so a compiling process needs no CUDA context and no device memory and can
start before the worker has made its own. The children of gpu_worker/generation/compile_children.py run
it (gpu_worker/generation/compile_child.py) where no recorded manifest of the step's kernel calls matches
the checkpoint (gpu_worker/generation/kernel_manifest.py), and it is what records those manifests.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpu_worker.checkpoints.heartmula_checkpoint import GEN_CONFIG_NAME, find_lm_folder, parse_gen_config, read_lm_config
from gpu_worker.generation.fast_generate import FrameEngine
from gpu_worker.model.heartmula import HeartMuLa, HeartMuLaArgs
from gpu_worker.model.meta_build import meta_modules

WARMUP_TEXT_VOCAB = 16  # the text embedding is read only by prefill, which runs no fused kernel
WARMUP_CACHE_LEN = 512  # one key bucket: strides stay multiples of 16, as at every production length


def warmup_args(args: HeartMuLaArgs) -> HeartMuLaArgs:
    """`args` with one layer per stack and a token text vocabulary: the same kernels, a smaller model."""
    return dataclasses.replace(args, text_vocab_size=WARMUP_TEXT_VOCAB,
                               backbone=dataclasses.replace(args.backbone, num_layers=1),
                               decoder=dataclasses.replace(args.decoder, num_layers=1))


def meta_frame_step(args: HeartMuLaArgs, dtype: torch.dtype, *, audio_eos_id: int, slots: int = 1) -> None:
    """One eager frame step of a one-layer model of `args` on the meta device, with the fused kernels:
    every kernel the engine's frame step launches is asked for, and nothing is computed. The kernels are
    the same for every slot count (tests/test_cold_start_parts.py), so one slot stands for all."""
    with meta_modules():
        model = HeartMuLa(warmup_args(args)).to(dtype)
    with torch.inference_mode():
        engine = FrameEngine(model, num_songs=slots, rows=2, cache_len=min(WARMUP_CACHE_LEN, args.backbone.max_seq_len),
                             max_frames=2, audio_eos_id=audio_eos_id, use_graphs=False, fused_kernels=True)
        engine.done.fill_(False)
        engine.limit.fill_(1)
        engine.step(0)


def trace_frame_step(checkpoint_root: Path, dtype: str) -> None:
    """`meta_frame_step` for the LM under `checkpoint_root` in `dtype` (a torch dtype's name)."""
    _config, args = read_lm_config(find_lm_folder(Path(checkpoint_root)))
    eos = parse_gen_config(Path(checkpoint_root) / GEN_CONFIG_NAME).audio_eos_id
    meta_frame_step(args, getattr(torch, dtype), audio_eos_id=eos)
