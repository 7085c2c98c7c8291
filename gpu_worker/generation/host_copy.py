"""Device-to-host copies that do not stall the process's other CUDA threads.

A plain `tensor.cpu()` of a CUDA tensor is a synchronous copy into pageable memory. While it waits for the
work queued before it on its stream (the engine queues many frame steps ahead), the driver keeps the other
host threads of the process from launching: a codec window decoded beside the engine slept in its kernel
launches (bench/RESULTS.md, "First sound"). Here the copy goes into pinned memory without blocking, and the
thread waits on an event recorded after it, which holds nothing the other threads need.
"""
from __future__ import annotations

import torch


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU, once the work queued before it on the current stream is done."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copied.synchronize()
    return host
