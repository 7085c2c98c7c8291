"""What a GPU worker makes ready on background threads at start, so its first song waits on no compile.

1. The frame step's Triton kernels (gpu_worker/generation/kernel_warmup.py), compiled by child processes
   that never touch the GPU (a one-layer model of the checkpoint's dimensions on the meta device) while the
   first song's LM is still loading: on a new machine they are otherwise compiled one by one at the first
   frame, after the load.
2. The codec: the compiled bf16 codec (SONGPIPE_CODEC_DTYPE=bfloat16) compiles at its first window, seconds
   to tens of seconds on a new machine (bench/RESULTS.md). The warm-up loads it and decodes one window of
   silence-codes. It waits until the first song has been admitted (or `FIRST_SONG_WAIT_S` without one),
   because a codec load and compile beside the LM load slow the first frame. The window goes through
   `codec_turn`, so a real decode that comes first simply waits for it, as it would have waited for its
   own compile. The drawn audio is discarded; nothing of it reaches a record.
docs/streaming.md, "Cold start".
"""
from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)

warmup_seconds: dict[str, float] = {}  # what the last warm-up took, for the record and the bench


def should_warm(device: torch.device, codec_dtype: torch.dtype, threads_mode: bool, enabled: bool) -> bool:
    """Only where it pays: the compiled codec on CUDA, in a process that runs its tasks itself (threads mode;
    a prefork parent must not touch CUDA before it forks)."""
    return enabled and threads_mode and device.type == "cuda" and codec_dtype == torch.bfloat16


FIRST_SONG_WAIT_S = 30.0  # an idle worker warms its codec after this long anyway


def warm_frame_kernels(settings) -> dict[str, float]:
    """Wait for the frame step's kernel warm-up children (started as the worker imported its entry module,
    or here); what they did."""
    from gpu_worker.generation import compile_children

    children = compile_children.start_for_worker(settings)
    if children is None:
        return {}
    report = children.wait()
    warmup_seconds["frame_kernels"] = round(report.seconds, 3)
    return {"frame_kernels": warmup_seconds["frame_kernels"], "kernels": report.compiled,
            "children": report.children}


def warm_codec(settings) -> dict[str, float]:
    """Load the codec (and its fast copy) and decode one window; returns seconds per phase."""
    from gpu_worker.checkpoints.tiny_checkpoint import ensure_tiny_checkpoint
    from gpu_worker.model.heartcodec import WindowByWindow
    from gpu_worker.worker import model_cache
    from gpu_worker.worker.batching import codec_turn
    from gpu_worker.worker.device import codec_dtype, resolve_device

    started = time.monotonic()
    root = settings.resolved_checkpoint_dir
    if settings.uses_tiny_checkpoint:
        ensure_tiny_checkpoint(root)
    device, dtype = resolve_device(settings), codec_dtype(settings)
    codec = model_cache.get_codec(root, device, torch.float32)
    decoder = model_cache.get_fast_codec(codec.model) if dtype == torch.bfloat16 else codec.model
    loaded = time.monotonic()
    geometry = codec.model.config.windows
    if decoder is codec.model:
        solve, decode_latents = codec.model.solve_window, codec.model.scalar_model.decode_batch
    else:
        solve, decode_latents = decoder.solve_window, decoder.decode_latents
    with torch.inference_mode(), codec_turn():
        song = WindowByWindow(geometry, torch.Generator(device=device).manual_seed(0), geometry.window_frames,
                              device=device, solve_window=solve, decode_latents=decode_latents)
        song.add(torch.zeros(codec.model.config.num_quantizers, geometry.window_frames, dtype=torch.long,
                             device=device), last=True)
        del song
    warmup_seconds.update(load=round(loaded - started, 3), first_window=round(time.monotonic() - loaded, 3))
    return dict(warmup_seconds)


def start_background_warmup(settings) -> threading.Thread | None:
    """Start the frame kernels' warm-up and the codec's (once the first song is in) on daemon threads, each
    where it pays; the thread returned ends when both have. A failure is logged, never raised: the first
    frame or decode then does the same work itself."""
    from gpu_worker.generation import compile_children
    from gpu_worker.generation.engine import FIRST_SONG_ADMITTED
    from gpu_worker.worker.batching import _threads_mode
    from gpu_worker.worker.device import codec_dtype, resolve_device

    device, threads = resolve_device(settings), _threads_mode()
    kernels = threads and compile_children.should_compile(settings)
    codec = should_warm(device, codec_dtype(settings), threads, settings.codec_warmup)
    if not (kernels or codec):
        return None

    def compile_kernels() -> None:
        try:
            log.info("frame kernels compiled by the warm-up children: %s", warm_frame_kernels(settings))
        except Exception:  # noqa: BLE001 - an optimisation: the first frame compiles them if this fails
            log.exception("background kernel warm-up failed; the first frame compiles the kernels")

    def run() -> None:
        # the kernels' children collected on a thread of their own: the codec's warm-up does not wait for them
        compiling = threading.Thread(target=compile_kernels, name="kernel-warmup", daemon=True) if kernels else None
        if compiling is not None:
            compiling.start()
        if codec:
            FIRST_SONG_ADMITTED.wait(FIRST_SONG_WAIT_S)
            try:
                log.info("codec warmed up in the background: %s", warm_codec(settings))
            except Exception:  # noqa: BLE001 - an optimisation: the first decode does the same work if this fails
                log.exception("background codec warm-up failed; the first decode loads and compiles it")
        if compiling is not None:
            compiling.join()

    thread = threading.Thread(target=run, name="startup-warmup", daemon=True)
    thread.start()
    return thread


def _on_worker_ready(**_kwargs) -> None:
    from tasks.settings import get_settings

    start_background_warmup(get_settings())


def connect() -> None:
    from celery.signals import worker_ready

    worker_ready.connect(_on_worker_ready, weak=False)
