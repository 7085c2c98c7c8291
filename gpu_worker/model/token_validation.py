"""The one check that stands between a token grid and the codec's embedding lookup.

A code outside 0..codebook_size-1 reaching the codec is what turned an empty-tags bug into a
poisoned CUDA context (shared/seed-story.md). This runs on the host, before any transfer to a
device, in the token stage (on its own output) and again in the codec stage (on whatever it is
given). It never clamps and never drops frames.
"""
from __future__ import annotations

import numpy as np
import torch

NUM_QUANTIZERS = 8
CODEBOOK_SIZE = 8192


class InvalidCodesError(ValueError):
    """A token grid the codec must not see; names the first bad frame, codebook and value."""

    def __init__(self, message: str, *, frame: int | None = None, codebook: int | None = None,
                 value: int | None = None, count: int = 0):
        super().__init__(message)
        self.frame = frame
        self.codebook = codebook
        self.value = value
        self.count = count


def validate_codes(codes: torch.Tensor | np.ndarray, *, num_quantizers: int = NUM_QUANTIZERS,
                   codebook_size: int = CODEBOOK_SIZE) -> None:
    """Raise InvalidCodesError unless `codes` is an integer [num_quantizers, T>=1] grid in range."""
    array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidCodesError(f"codes must be integers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] != num_quantizers:
        raise InvalidCodesError(
            f"codes must have shape [{num_quantizers}, T], got {list(array.shape)}")
    if array.shape[1] < 1:
        raise InvalidCodesError("codes must hold at least one frame (T >= 1), got T = 0")
    bad = (array < 0) | (array >= codebook_size)
    count = int(bad.sum())
    if count:
        # time order: the first frame that holds a bad value, then its lowest codebook
        frames = np.nonzero(bad.any(axis=0))[0]
        frame = int(frames[0])
        codebook = int(np.nonzero(bad[:, frame])[0][0])
        value = int(array[codebook, frame])
        raise InvalidCodesError(
            f"invalid code at frame {frame}, codebook {codebook}: value {value} is outside the valid "
            f"range 0..{codebook_size - 1} ({count} invalid entr{'y' if count == 1 else 'ies'} in "
            f"{array.shape[1]} frames); refusing to decode",
            frame=frame, codebook=codebook, value=value, count=count)
