"""Models loaded once per worker process, lazily on the first task (never at import: CUDA and fork)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

_lock = threading.Lock()
_models: dict[tuple, Any] = {}
load_seconds: dict[str, float] = {}


def get_lm(ckpt_root: Path, device: torch.device, dtype: torch.dtype):
    from gpu_worker.checkpoints.heartmula_checkpoint import load_heartmula

    return _get(("lm", str(ckpt_root), str(device), str(dtype)),
                lambda: load_heartmula(ckpt_root, device=device, dtype=dtype))


def get_codec(ckpt_root: Path, device: torch.device, dtype: torch.dtype):
    from gpu_worker.checkpoints.heartcodec_checkpoint import load_heartcodec

    return _get(("codec", str(ckpt_root), str(device), str(dtype)),
                lambda: load_heartcodec(ckpt_root, device=device, dtype=dtype))


def get_fast_codec(codec_model):
    """The bf16 estimator copy (about 3 GB at the real size), made once per codec."""
    from gpu_worker.codec.fast_codec import FastCodec

    return _get(("fast_codec", str(id(codec_model)), "", "bf16"), lambda: FastCodec(codec_model, precision="bf16"))


_loading: dict[tuple, threading.Lock] = {}  # one lock per model: the codec can load while the LM does


def _get(key: tuple, load) -> Any:
    with _lock:
        if key in _models:
            return _models[key]
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        with _lock:
            if key in _models:
                return _models[key]
        started = time.monotonic()
        model = load()
        with _lock:
            _models[key] = model
            load_seconds[key[0]] = time.monotonic() - started
        return model


def loaded_models() -> list[dict[str, Any]]:
    """What this process holds, for the workers page: kind, checkpoint, device, dtype, checksums."""
    return [{"kind": k[0], "checkpoint": k[1], "device": k[2], "dtype": k[3],
             "checksums": getattr(v, "checksums", {}), "load_s": load_seconds.get(k[0])}
            for k, v in _models.items()]


def clear() -> None:
    with _lock:
        _models.clear()
