"""Build a model's modules on the meta device without running their weight initialisers.

Loading a checkpoint builds the model on the meta device (shapes only) and then assigns the stored
tensors. PyTorch's modules still call their initialisers at construction (`nn.Linear` draws a uniform,
`nn.Embedding` a normal), and on a meta tensor those go through PyTorch's Python reference kernels,
whose first use imports TorchDynamo (and sympy): seconds of a GPU worker's cold start for values that
do not exist (bench/RESULTS.md). Inside `meta_modules()` the initialisers return a meta tensor as it is;
on any other tensor they do what they always do, so a thread building a real module meanwhile is not
affected.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")
_lock = threading.Lock()
_depth = 0
_originals: dict[str, Callable[..., Any]] = {}


def _skipping_meta(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return original(tensor, *args, **kwargs)
    return initialise


@contextlib.contextmanager
def meta_modules() -> Iterator[None]:
    """`with torch.device("meta")`, with the weight initialisers skipped for meta tensors."""
    global _depth
    with _lock:
        if _depth == 0:
            for name in _INITIALISERS:
                _originals[name] = getattr(nn.init, name)
                setattr(nn.init, name, _skipping_meta(_originals[name]))
        _depth += 1
    try:
        with torch.device("meta"):
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, original in _originals.items():
                    setattr(nn.init, name, original)
                _originals.clear()
