"""Fault injection for the GPU stages: off by default, refused in production, triggered per job.

The switch: `SONGPIPE_FAULT_INJECTION=1` (Settings.fault_injection) on the GPU worker. With
`SONGPIPE_MODE=production` the switch is refused: faults are never honoured and the worker logs why.

The trigger: a job asks for a fault with a tag `songpipe-fault-<kind>` in its request (tags are
validated and stored verbatim with the job, so the fault is on record; with the switch off such a
tag is just an unknown tag). Kinds:

- `cuda-assert`        token stage: a REAL device-side assert on a CUDA device (an out-of-range
                       index into a CUDA tensor through an embedding lookup, synchronised - the
                       seed story's failure); on CPU a SimulatedCudaPoison, after which this process
                       refuses every GPU task until it is replaced.
- `cuda-assert-decode` the same in the codec stage.
- `oom-once`           token stage, attempt 1 only: torch.OutOfMemoryError (transient: one retry).
- `oom-always`         token stage, every attempt: the retry fails too and the job fails.
- `hang-once`          token stage, attempt 1 only: the work stops making progress while the process
                       lives. In the batching engine the engine thread blocks after its next frame
                       step, as on a hung kernel (every song of the engine stalls); elsewhere the
                       stage blocks in its progress report. The heartbeat keeps beating.
- `slow-<ms>`          GPU stages take <ms> extra per frame (per codec window in decoding), in
                       slices that honour cancellation: long stages for crash and cancel tests.
                       In the batching engine the engine itself waits <ms> after each frame step
                       while the song is live (`frame_pace_s`), so frames really come that slowly.

Registration: the GPU worker imports this module (gpu_worker/worker/celery_worker.py). Faults fire at the
stage's first progress report, i.e. inside the model loop, after the stage's
inputs are recorded and the model is loaded - where a real fault would strike.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gpu_worker.worker import cuda_health
from tasks.contracts import GPU_STAGES
from tasks.recording import JobCancelled, StageContext, add_stage_hook
from tasks.settings import Settings

log = logging.getLogger(__name__)

TAG_PREFIX = "songpipe-fault-"
KINDS = ("cuda-assert", "cuda-assert-decode", "oom-once", "oom-always", "hang-once", "slow")
HANG_S = 24 * 3600.0  # "forever" for a test: far past every stall and time limit
SLEEP_SLICE_S = 0.2


class FaultInjectionRefused(SystemExit):
    """Raised at start by every entry point (web, workers) in production mode with the switch on.

    A SystemExit, so it ends the process with its message and status 1 wherever it is raised,
    including inside Celery's signal handlers, which swallow ordinary exceptions.
    """


@dataclass(frozen=True)
class Fault:
    kind: str
    stage: str
    ms_per_step: int = 0


def switch_on(settings: Settings) -> bool:
    """Whether this process honours fault tags; production mode refuses the switch."""
    if not settings.fault_injection:
        return False
    if settings.mode == "production":
        log.error("SONGPIPE_FAULT_INJECTION is set but SONGPIPE_MODE=production: fault injection refused")
        return False
    return True


def check_allowed(settings: Settings) -> None:
    """Every entry point calls this at start: production mode with the switch on refuses to run."""
    refusal = settings.fault_injection_refusal()
    if refusal is not None:
        raise FaultInjectionRefused(f"songpipe: {refusal}")


def faults_in(tags: list[str] | None) -> list[Fault]:
    """The faults a request asks for, from its tags (unknown fault kinds are ignored)."""
    found: list[Fault] = []
    for tag in tags or []:
        if not tag.startswith(TAG_PREFIX):
            continue
        spec = tag[len(TAG_PREFIX):]
        if spec == "cuda-assert":
            found.append(Fault("cuda-assert", "generate_tokens"))
        elif spec == "cuda-assert-decode":
            found.append(Fault("cuda-assert", "decode_audio"))
        elif spec in ("oom-once", "oom-always", "hang-once"):
            found.append(Fault(spec, "generate_tokens"))
        elif spec.startswith("slow-") and spec[5:].isdigit():
            ms = int(spec[5:])
            found.extend([Fault("slow", "generate_tokens", ms), Fault("slow", "decode_audio", ms)])
    return found


def trigger_device_assert(device) -> None:
    """A real device-side assert: an embedding lookup past the table's end, then a synchronise."""
    import torch

    table = torch.zeros(8192, 4, device=device)  # one codebook's rows, like the codec's
    bad = torch.tensor([8192], device=device)  # the id of the seed story: one past the last row
    torch.nn.functional.embedding(bad, table).sum().item()
    torch.cuda.synchronize(device)
    raise RuntimeError("the out-of-range lookup did not assert (is the device really CUDA?)")


def _inject(fault: Fault, ctx: StageContext, info: dict) -> None:
    import torch

    from gpu_worker.worker.device import resolve_device

    if fault.kind == "cuda-assert":
        device = resolve_device(ctx.settings)
        if device.type == "cuda":
            trigger_device_assert(device)
        reason = f"injected fault {TAG_PREFIX}cuda-assert in {ctx.stage} of job {ctx.job_id}"
        cuda_health.mark_simulated_poison(reason)
        raise cuda_health.SimulatedCudaPoison(
            f"CUDA error: device-side assert triggered (simulated on {device.type}: {reason}; "
            "index 8192 is out of bounds for a codebook of 8192 rows)")
    if fault.kind == "oom-once" and ctx.attempt == 1 or fault.kind == "oom-always":
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected fault {TAG_PREFIX}{fault.kind}, "
            f"attempt {ctx.attempt})")


def _wait(ctx: StageContext, seconds: float) -> None:
    """Sleep in slices that honour a cancel request."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(SLEEP_SLICE_S, max(deadline - time.monotonic(), 0)))
        if ctx.should_cancel():
            raise JobCancelled(f"job {ctx.job_id} cancelled during {ctx.stage}")


def _slow_down(fault: Fault, ctx: StageContext, info: dict, state: dict) -> None:
    done = int(info.get("done") or 0)
    steps = max(done - state.get("done", 0), 0)
    state["done"] = done
    _wait(ctx, steps * fault.ms_per_step / 1000)


def _engine_paced(ctx: StageContext) -> bool:
    """The batching engine runs this song: it paces (or hangs) the frames itself (`frame_pace_s`)."""
    return ctx.environment_extra.get("generation_path") == "batched"


def frame_pace_s(ctx: StageContext) -> float:
    """Seconds the batching engine waits after each frame step for this job's `slow-<ms>` fault (0: none)."""
    if not switch_on(ctx.settings):
        return 0.0
    faults = [f for f in faults_in(ctx.job_request.get("tags")) if f.stage == ctx.stage]
    if faults:  # on record now: a hung engine may never report progress, where stage_hook records them
        ctx.environment_extra["injected_faults"] = [f.kind for f in faults]
    if any(f.kind == "hang-once" for f in faults) and ctx.attempt == 1:
        return HANG_S
    return max((f.ms_per_step for f in faults if f.kind == "slow"), default=0) / 1000


def stage_hook(ctx: StageContext, event: str, info: dict) -> None:
    """Registered with the stage wrapper: fires the faults a job asks for, when the switch is on."""
    if ctx.stage not in GPU_STAGES or event != "progress" or not switch_on(ctx.settings):
        return
    faults = [f for f in faults_in(ctx.job_request.get("tags")) if f.stage == ctx.stage]
    if not faults:
        return
    ctx.environment_extra["injected_faults"] = [f.kind for f in faults]  # on record with the attempt
    state = ctx.__dict__.setdefault("_fault_state", {})
    for fault in faults:
        if fault.kind in ("slow", "hang-once") and _engine_paced(ctx):
            continue  # the batching engine does it (frame_pace_s)
        if fault.kind == "slow":
            _slow_down(fault, ctx, info, state)
        elif fault.kind == "hang-once":
            if ctx.attempt == 1:
                _wait(ctx, HANG_S)
        elif not state.get("fired"):
            state["fired"] = fault.kind
            _inject(fault, ctx, info)


add_stage_hook(stage_hook)
