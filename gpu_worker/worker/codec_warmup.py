"""The codec made ready in the background when a GPU worker starts, so its first window is not a compile.

The compiled bf16 codec (SONGPIPE_CODEC_DTYPE=bfloat16) compiles at its first window, tens of seconds on a
new machine (bench/RESULTS.md). A threads-mode GPU worker on CUDA therefore loads the codec and decodes one
window of silence-codes on a background thread as soon as it is ready, while the first song's LM loads
and its first frames are generated. The window goes through `codec_turn`, so a real decode that comes
first simply waits for it, as it would have waited for its own compile. The drawn audio is discarded;
nothing of it reaches a record. docs/streaming.md, "Cold start".
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
    """Start `warm_codec` on a daemon thread where `should_warm` says so; a failure is logged, never raised:
    the first real decode then pays for the load and the compile itself."""
    from gpu_worker.worker.batching import _threads_mode
    from gpu_worker.worker.device import codec_dtype, resolve_device

    if not should_warm(resolve_device(settings), codec_dtype(settings), _threads_mode(), settings.codec_warmup):
        return None

    def run() -> None:
        try:
            log.info("codec warmed up in the background: %s", warm_codec(settings))
        except Exception:  # noqa: BLE001 - an optimisation: the first decode does the same work if this fails
            log.exception("background codec warm-up failed; the first decode loads and compiles it")

    thread = threading.Thread(target=run, name="codec-warmup", daemon=True)
    thread.start()
    return thread


def _on_worker_ready(**_kwargs) -> None:
    from tasks.settings import get_settings

    start_background_warmup(get_settings())


def connect() -> None:
    from celery.signals import worker_ready

    worker_ready.connect(_on_worker_ready, weak=False)
