"""Which device and dtypes a GPU worker uses; CUDA is touched only when a stage first needs it."""
from __future__ import annotations

import torch

from tasks.settings import Settings


def resolve_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SONGPIPE_DEVICE={settings.device} but CUDA is not available on this host")
    return device


def gpu_batching_enabled(settings: Settings) -> bool:
    """Continuous batching: as set, else on for a CUDA device (the default) and off on the CPU."""
    if settings.gpu_batching is not None:
        return settings.gpu_batching
    return resolve_device(settings).type == "cuda"


def lm_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.lm_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.lm_dtype)


def codec_dtype(settings: Settings) -> torch.dtype:
    return getattr(torch, settings.codec_dtype)
