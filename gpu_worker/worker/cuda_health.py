"""Recovery from a poisoned CUDA context: record the failure, then replace this worker process.

After a device-side assert every later CUDA call in the process fails, so the only cure is a new
process. The stage wrapper (tasks/recording.py) calls `handle_gpu_failure` and then records the
error with the stage's inputs; the `task_postrun` handler then ends the prefork child and billiard
starts a fresh one for the next task. The parent sees the child vanish (WorkerLostError) and, with
reject_on_worker_lost, puts the message back once; the re-delivery finds its attempt recorded as
failed and backs off at the claim, so nothing is computed twice and the failure is not retried.

A transient out-of-memory error (fragmentation) also ends a prefork child: its one retry (a new
attempt, sent by the stage wrapper) must start on a clean allocator. In the batching worker (threads
pool, one process for every song of the GPU) an OOM ends only that song's attempt: the engine empties
the allocator's cache, frees the slot, and the retry joins the running batch.
"""
from __future__ import annotations

import logging
import os

from celery.signals import task_postrun

from tasks.contracts import GPU_STAGES
from tasks.recording import JobCancelled, add_stage_hook, is_out_of_memory

log = logging.getLogger(__name__)

CUDA_ERROR_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
                      "cuDNN error", "an illegal instruction", "unspecified launch failure")
POISON_EXIT_CODE = 70
_replace_reason: str | None = None
_simulated_poison: str | None = None


class SimulatedCudaPoison(RuntimeError):
    """Stands in for a poisoned context on CPU-only hosts (fault injection)."""


def is_cuda_poison(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCudaPoison):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name in ("AcceleratorError", "CudaError") or any(marker in text for marker in CUDA_ERROR_MARKERS)


def handle_gpu_failure(exc: BaseException, ctx) -> None:
    """Decide whether this process must be replaced; the decision is recorded with the failure."""
    global _replace_reason, _simulated_poison
    if is_cuda_poison(exc):
        _replace_reason = f"CUDA context poisoned ({type(exc).__name__})"
        if isinstance(exc, SimulatedCudaPoison):
            _simulated_poison = str(exc)
        log.error("job %s stage %s: CUDA context is poisoned (%s); this worker process will be replaced",
                  ctx.job_id, ctx.stage, exc)
    elif is_out_of_memory(exc) and _is_pool_child():
        _replace_reason = "out of device memory (a retry gets a fresh process and allocator)"
    elif getattr(exc, "replaces_process", None):  # an error that says this process cannot go on (a hung engine)
        _replace_reason = str(exc.replaces_process)  # type: ignore[attr-defined]
        log.error("job %s stage %s: %s; this worker process will be replaced", ctx.job_id, ctx.stage, exc)
    if _replace_reason is not None:
        ctx.environment_extra["worker_process"] = {"pid": os.getpid(), "replaced_after_this_failure": True,
                                                   "reason": _replace_reason}


def mark_for_replacement(reason: str) -> None:
    """This process must be replaced (e.g. a task overran its hard time limit in the threads pool)."""
    global _replace_reason
    if _replace_reason is None:
        _replace_reason = reason


def mark_simulated_poison(reason: str) -> None:
    """Fault injection on CPU: from now on this process refuses GPU work, as a poisoned one would."""
    global _simulated_poison
    _simulated_poison = reason


def refuse_if_poisoned() -> None:
    """A process whose (simulated) context is poisoned must not take more GPU work; raise if so."""
    if _simulated_poison is not None:
        raise SimulatedCudaPoison(f"this worker process (pid {os.getpid()}) has a poisoned CUDA context from an "
                                  f"earlier failure ({_simulated_poison}) and was not replaced")


def _guard(ctx, event: str, _info: dict) -> None:
    if event != "start" or ctx.stage not in GPU_STAGES:
        return
    if _replace_reason is not None and not _is_pool_child():
        # threads / solo pool: this whole process is on its way out (a warm shutdown, then the supervisor
        # starts a fresh one). A stage that reaches it now (e.g. a failed song's retry, published before
        # the consumer stopped) is handed back, as on a clean stop, instead of failing here.
        ctx._stopping = True
        raise JobCancelled(f"GPU worker process {os.getpid()} is being replaced ({_replace_reason}): handed back")
    refuse_if_poisoned()


add_stage_hook(_guard)


def process_is_poisoned() -> bool:
    return _replace_reason is not None


def _is_pool_child() -> bool:
    from billiard.process import current_process

    return current_process().name != "MainProcess"


@task_postrun.connect
def _exit_if_poisoned(**_kwargs) -> None:
    if _replace_reason is None:
        return
    if not _is_pool_child():
        # solo/threads pool: exiting would end the whole worker; keep refusing GPU work instead
        log.critical("worker process must be replaced (%s) but is not a prefork child: restart this worker",
                     _replace_reason)
        mark_simulated_poison(_replace_reason)
        return
    log.error("ending worker process %s (%s); the pool starts a fresh one", os.getpid(), _replace_reason)
    logging.shutdown()
    os._exit(POISON_EXIT_CODE)
