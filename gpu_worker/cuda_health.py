"""Recovery from a poisoned CUDA context: record the failure, then replace this worker process.

After a device-side assert every later CUDA call in the process fails, so the only cure is a new
process. The stage wrapper records the error first; then this module marks the process poisoned
and the `task_postrun` handler ends the prefork child, so the pool starts a fresh one for the
next task. The task message was already acknowledged as failed, so it is not re-run.
"""
from __future__ import annotations

import logging
import os

from celery.signals import task_postrun

log = logging.getLogger(__name__)

CUDA_ERROR_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
                      "cuDNN error", "an illegal instruction", "unspecified launch failure")
POISON_EXIT_CODE = 70
_poisoned = False


class SimulatedCudaPoison(RuntimeError):
    """Stands in for a poisoned context on CPU-only hosts (fault injection)."""


def is_cuda_poison(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCudaPoison):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name in ("AcceleratorError", "CudaError") or any(marker in text for marker in CUDA_ERROR_MARKERS)


def handle_gpu_failure(exc: BaseException, ctx) -> None:
    global _poisoned
    if is_cuda_poison(exc):
        log.error("job %s stage %s: CUDA context is poisoned (%s); this worker process will be replaced",
                  ctx.job_id, ctx.stage, exc)
        _poisoned = True


def process_is_poisoned() -> bool:
    return _poisoned


@task_postrun.connect
def _exit_if_poisoned(**_kwargs) -> None:
    if _poisoned:
        logging.shutdown()
        os._exit(POISON_EXIT_CODE)
