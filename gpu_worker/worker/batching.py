"""The Celery side of continuous batching: the per-process engine registry, the stage's wait loop, and
the threads-pool hooks (gpu_worker/generation/engine.py is the engine itself; docs/batching.md).

`generate_tokens` submits here when batching is on (`SONGPIPE_GPU_BATCHING`, unset: on with CUDA, off
on the CPU; gpu_worker/worker/device.py) and `songpipe worker gpu` runs Celery's threads pool
(`-P threads -c SONGPIPE_GPU_BATCH_SLOTS`), so all token tasks of the process share one engine, one
model copy and one CUDA context. `run_in_engine` waits for a song on the task's thread: it does the
SQL work (progress, checkpoints, cancel), enforces the soft time limit, and reclaims a hung engine.

CUDA poison in threads mode (what changes against prefork): with prefork the poisoned child exits
after recording and billiard forks a fresh one; with the threads pool there is no child - the worker
process itself holds the poisoned context. So this module's task_prerun / task_postrun handlers (the CLI
imports it at worker start with `--include gpu_worker.worker.batching`; they act only when tasks
run in the worker's main process with SONGPIPE_GPU_BATCHING on - a prefork child keeps the existing
handling) make the worker, after the first task that recorded a poison, a stall or another reason to be
replaced, stop consuming and shut down warm: Celery waits for the in-flight tasks (they fail fast on
the broken engine and record their failure), puts reserved messages back (kombu restores unacked
messages on a clean close) and exits with cuda_health.POISON_EXIT_CODE. A watchdog hard-exits if the
warm shutdown does not finish in `POISON_EXIT_GRACE_S`. Nothing restarts the process inside it: the
process supervisor does (`songpipe run`'s supervisor, orchestrator/supervisor.py, or systemd
`Restart=always` in deploy/systemd/).
The same hooks serialise `decode_audio` in threads mode (one codec decode at a time, as with prefork
concurrency 1) and enforce every task's hard time limit by replacing the process; the stage enforces
the soft limit itself while it waits.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import torch

from gpu_worker.generation.engine import BatchedGenerationResult, CheckpointFn, GenerationEngine
from gpu_worker.generation.generate import SamplingParams
from gpu_worker.model.heartmula import HeartMuLa
from gpu_worker.model.prompt import Prompt
from gpu_worker.worker.priority_turns import PriorityTurns
from tasks.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_SONGS: int = Settings.model_fields["gpu_batch_slots"].default  # SONGPIPE_GPU_BATCH_SLOTS
POISON_EXIT_GRACE_S = 300.0


class EngineLost(RuntimeError):
    """This song's engine failed with a device error the song did not raise itself. The message carries
    the original error, so gpu_worker.worker.cuda_health still replaces the process; the song gets one new
    attempt (transient), which continues from its token checkpoint."""

    transient = True


class EngineStalled(RuntimeError):
    """The engine made no frame step for longer than the stall limit while songs were live (hung device
    work or a blocked engine thread): every song of the engine fails with it, is retried once, and the
    process is replaced (gpu_worker.worker.cuda_health)."""

    transient = True  # tasks.recording.is_transient: one new attempt, in a fresh process
    # cuda_health.handle_gpu_failure: the hung engine thread cannot be recovered inside this process
    replaces_process = "the generation engine stopped stepping (hung device work); a fresh process gets a fresh one"


def _is_device_error(exc: BaseException) -> bool:
    from gpu_worker.worker.cuda_health import is_cuda_poison

    return is_cuda_poison(exc)


# ------------------------------------------------------------------------------------ registry

_registry_lock = threading.Lock()
_engines: dict[tuple, GenerationEngine] = {}


def get_engine(model: HeartMuLa, *, max_songs: int = DEFAULT_MAX_SONGS) -> GenerationEngine:
    """The process's engine for `model` (created lazily). A broken engine is replaced (e.g. after an
    out-of-memory error in a frame step) unless its error poisoned the device: then submitting to it
    raises that error again, and the process must be replaced."""
    key = (id(model), str(model.device))
    with _registry_lock:
        engine = _engines.get(key)
        if engine is not None and engine.model is model:
            error = engine.error
            if not engine.closed and (error is None or _is_device_error(error)):
                return engine
            engine.shutdown(wait=False)
        engine = _engines[key] = GenerationEngine(model, max_songs=max_songs,
                                                  name=f"generation-engine-{model.device}")
        return engine


def shutdown_engines(timeout: float | None = 10.0) -> None:
    with _registry_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.shutdown(wait=True, cancel=True, timeout=timeout)


# ------------------------------------------------------------------------------ the stage's side

STAGE_POLL_S = 0.2  # the stage thread's progress and cancel checks (checkpoints and the result wake it)


def _soft_deadline() -> float | None:
    """The Celery task's soft time limit as a monotonic deadline (the threads pool does not enforce it)."""
    try:
        from celery import current_task

        limits = getattr(current_task.request, "timelimit", None) if current_task else None
    except Exception:  # noqa: BLE001 - no Celery task context: no deadline
        return None
    soft = limits[1] if limits and len(limits) > 1 else None
    return time.monotonic() + float(soft) if soft else None


def run_in_engine(model: HeartMuLa, prompt: Prompt, params: SamplingParams, seed: int, ctx, *,
                  engine: GenerationEngine | None = None, poll_s: float = STAGE_POLL_S,
                  resume: torch.Tensor | None = None, save_checkpoint: CheckpointFn | None = None,
                  checkpoint_every: int = 0, checkpoint_at: tuple[int, ...] = (), pace_s: float = 0.0,
                  stall_s: float | None = None) -> BatchedGenerationResult:
    """Submit one song to the process's engine and wait for it on the calling (task) thread.

    The engine thread only stores the latest progress, the latest checkpoint and reads a cancel flag;
    this thread does the SQL work every `poll_s`: `save_checkpoint(frames, grid)` for a new checkpoint,
    `ctx.progress` (heartbeat, fault hooks, raises JobCancelled on a cancel request) and
    `ctx.should_cancel`. `resume` and `pace_s` go to `GenerationEngine.submit`. When the engine has not
    stepped for `stall_s` while songs are live, EngineStalled abandons the engine (every song fails now;
    the stage's failure handler replaces the process, the retry continues from a checkpoint). Whatever
    stops this thread (cancel, superseded, soft time limit, an injected fault) cancels the song in the engine, so
    its slot is freed; a CUDA-poison error raised here breaks the engine (every song of the process
    fails, as on a real poisoned device). Raises GenerationCancelled when the engine cancelled the
    song; the stage maps it to JobCancelled.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    from gpu_worker.worker.cuda_health import is_cuda_poison

    engine = engine or get_engine(model)
    latest: list[tuple[int, int]] = []
    cancel = threading.Event()

    def remember(done: int, total: int) -> None:
        latest[:] = [(done, total)]

    checkpoints: list[tuple[int, torch.Tensor]] = []
    news = threading.Event()  # a checkpoint or the result: this thread hands it on at once, not at its next poll

    def keep_checkpoint(done: int, grid: torch.Tensor) -> None:
        checkpoints[:] = [(done, grid)]
        news.set()

    future = engine.submit(prompt, params, seed, progress=remember, should_cancel=cancel.is_set, resume=resume,
                           checkpoint=keep_checkpoint if save_checkpoint is not None else None,
                           checkpoint_every=checkpoint_every, checkpoint_at=checkpoint_at, pace_s=pace_s)
    future.add_done_callback(lambda _: news.set())
    deadline = _soft_deadline()
    reported: tuple[int, int] | None = None
    try:
        while True:
            news.wait(poll_s)
            news.clear()
            try:
                if future.done():
                    return future.result()
            except BaseException as exc:
                if not is_cuda_poison(exc):
                    raise
                # a device error this song did not raise on its own thread: it broke the engine the song
                # shared (another song's fault, or a frame step of all of them) - give the song another try
                raise EngineLost(f"the generation engine this song shared failed ({type(exc).__name__}: {exc}); "
                                 "it gets a new attempt in a fresh process") from exc
            if deadline is not None and time.monotonic() > deadline:
                raise SoftTimeLimitExceeded(f"soft time limit exceeded while generating ({params.max_frames} frames)")
            stalled = engine.stalled_s()
            if stall_s is not None and stalled > stall_s:
                raise EngineStalled(f"the generation engine made no frame step for {stalled:.0f} s (limit "
                                    f"{stall_s:.0f} s) while songs were live: hung device work or engine thread")
            if checkpoints and save_checkpoint is not None:
                done, grid = checkpoints.pop()
                save_checkpoint(done, grid)
            current = latest[0] if latest else None
            if current is not None and current != reported:
                reported = current
                ctx.progress(*current, "frames")  # raises JobCancelled when the job was cancelled
            elif ctx.should_cancel():
                cancel.set()
    except BaseException as exc:
        cancel.set()
        engine.cancel(future)
        if is_cuda_poison(exc):
            engine.fail(exc)
        elif isinstance(exc, EngineStalled):
            engine.abandon(exc)
        raise


# ---------------------------------------------------------------------- Celery threads-mode hooks

_hooks_forced = False
_exit_requested = False
_codec_holder = threading.local()
PLAIN_DECODE_PRIORITY = 1  # a whole song's decode (its listener hears nothing until it ends) after first windows
# While a streamed song's first window is being generated, the codec's other work waits: beside many songs the
# codec is busy nearly all the time and slows the engine's frame steps, so a new song's first frames (its first
# sound) would take twice as long (bench/RESULTS.md). A later window waits at most until DUE_MARGIN_S before
# its listener needs it, and nothing waits longer than MAX_HOLD_S.
FIRST_SOUND_GRACE_S = 1.0  # a first window's checkpoint reaches its decode through SQL within this
MAX_HOLD_S = 10.0
DUE_MARGIN_S = 10.0


def first_sounds_pending() -> bool:
    """An engine of this process generates a streamed song that has no first window yet."""
    with _registry_lock:
        engines = list(_engines.values())
    return any(not e.closed and e.first_checkpoints_pending(FIRST_SOUND_GRACE_S) for e in engines)


def held_until(now: float, due: float | None) -> float:
    """How long codec work that is not a first window may be held back for first sounds: until `DUE_MARGIN_S`
    before `due` (when its listener needs it; None: nobody is listening yet), `MAX_HOLD_S` at most."""
    latest = now + MAX_HOLD_S
    return latest if due is None else min(latest, due - DUE_MARGIN_S)


_codec_lock = PriorityTurns(first_sounds_pending)  # a plain decode holds it for its song, a follower for a window


def install_threads_mode_hooks() -> None:
    """Force the threads-pool process handling on (tests); normally `_threads_mode()` decides."""
    global _hooks_forced
    _hooks_forced = True


def _threads_mode() -> bool:
    """Tasks run in the worker's main process (threads or solo pool) with batching on: a prefork
    child keeps the existing handling (cuda_health ends the child, billiard forks a new one)."""
    if _hooks_forced:
        return True
    from billiard.process import current_process

    from gpu_worker.worker.device import gpu_batching_enabled
    from tasks.settings import get_settings

    return current_process().name == "MainProcess" and gpu_batching_enabled(get_settings())


def request_worker_exit(reason: str, exit_code: int | None = None, grace_s: float = POISON_EXIT_GRACE_S) -> None:
    """Stop consuming and shut the Celery worker down warm (in-flight tasks finish and record), then
    exit with `exit_code`; a watchdog hard-exits after `grace_s`."""
    global _exit_requested
    from celery.worker import state as worker_state

    from gpu_worker.worker.cuda_health import POISON_EXIT_CODE

    if _exit_requested:
        return
    _exit_requested = True
    code = POISON_EXIT_CODE if exit_code is None else exit_code
    log.critical("threads-mode GPU worker (pid %s) must be replaced (%s): no more tasks are consumed; exiting "
                 "with %s once the in-flight tasks have recorded their results - the supervisor restarts it",
                 os.getpid(), reason, code)
    worker_state.should_stop = code  # the consumer loop raises WorkerShutdown(code): a warm shutdown
    _start_watchdog(code, grace_s)


def _start_watchdog(code: int, grace_s: float) -> None:
    def watchdog() -> None:
        time.sleep(grace_s)
        log.critical("warm shutdown did not finish in %.0f s: hard exit %s", grace_s, code)
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=watchdog, name="poison-exit-watchdog", daemon=True).start()


# Hard time limits in threads mode. Celery enforces them only by killing a pool child, and the threads pool
# has none, so a task past its hard limit (a hung decode holding the codec lock, a hung engine) would run
# forever while its heartbeat thread kept its lease. The watchdog below replaces the process instead: the
# hung attempt stops heartbeating once the process is gone, and the reconciler records it.
HARD_LIMIT_EXIT_GRACE_S = 30.0  # the other in-flight tasks get this long; the overdue one never finishes
TIME_LIMIT_CHECK_S = 1.0
_running: dict[str, tuple[str, float, float]] = {}  # task id -> (task name, started, hard limit s)
_running_lock = threading.Lock()
_time_limit_watchdog: threading.Thread | None = None


def _hard_limit(task) -> float | None:
    limits = getattr(getattr(task, "request", None), "timelimit", None) or ()
    hard = limits[0] if limits else None
    return float(hard) if hard else None


def overdue_tasks(now: float | None = None) -> list[tuple[str, float]]:
    """(task name, hard limit) of the tasks of this process running past their hard time limit."""
    now = time.monotonic() if now is None else now
    with _running_lock:
        return [(name, hard) for name, started, hard in _running.values() if now - started > hard]


def check_time_limits(now: float | None = None) -> bool:
    """Replace this process when a task ran past its hard time limit; True when it did."""
    overdue = overdue_tasks(now)
    if not overdue:
        return False
    from gpu_worker.worker import cuda_health
    name, hard = overdue[0]
    reason = f"{name} ran past its hard time limit of {hard:.0f} s (the threads pool cannot kill one task)"
    cuda_health.mark_for_replacement(reason)
    request_worker_exit(reason, grace_s=HARD_LIMIT_EXIT_GRACE_S)
    return True


def _watch_time_limits() -> None:
    while not check_time_limits():
        time.sleep(TIME_LIMIT_CHECK_S)


@contextlib.contextmanager
def codec_turn(priority: int = 0, due: float | None = None) -> Iterator[None]:
    """The codec for one window (a decode that follows its token stage) or one song (a plain decode).

    In a threads-mode process the decodes take turns (a plain decode already holds the turn from its task's
    start; a follower waits with its window's index as `priority`, so first windows go first; any other
    window is held back while a first sound is being made, see `held_until`, `due` being the monotonic time
    its listener reaches it) and run on their own CUDA stream, so the engine's frame steps are not queued
    behind a window's kernels; the stream is synchronised at the end, so the samples are ready for the caller."""
    if not _threads_mode():
        yield
        return
    with contextlib.ExitStack() as turn:
        if not getattr(_codec_holder, "held", False):
            hold = held_until(time.monotonic(), due) if priority > 0 else None
            turn.enter_context(_codec_lock.turn(priority, hold))
        stream = _codec_stream()
        if stream is None:
            yield
            return
        # memory the turn's tensors were given may have just been freed by work still queued on the default
        # stream (the engine's): the codec stream starts after it; at the end the turn's results are ready
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()


_codec_streams: dict[int, torch.cuda.Stream] = {}


def _codec_stream() -> torch.cuda.Stream | None:
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    if device not in _codec_streams:
        _codec_streams[device] = torch.cuda.Stream(device)
    return _codec_streams[device]


def _task_prerun(task=None, kwargs=None, **_kwargs) -> None:
    global _time_limit_watchdog
    if not _threads_mode():
        return
    if getattr(task, "name", "") == "songpipe.decode_audio" and not (kwargs or {}).get("continue_chain"):
        # one codec decode at a time, as with prefork concurrency 1
        _codec_lock.acquire(PLAIN_DECODE_PRIORITY, held_until(time.monotonic(), None))
        _codec_holder.held = True
    hard = _hard_limit(task)
    task_id = getattr(getattr(task, "request", None), "id", None)
    if hard is not None and task_id is not None:
        with _running_lock:
            _running[task_id] = (getattr(task, "name", "?"), time.monotonic(), hard)
            if _time_limit_watchdog is None:
                _time_limit_watchdog = threading.Thread(target=_watch_time_limits, name="hard-time-limits",
                                                        daemon=True)
                _time_limit_watchdog.start()


# ------------------------------------------------------------- admission of token tasks (threads mode)

_admitted: set[str] = set()  # token task executions holding a seat in this process
_admitted_lock = threading.Lock()


def _execution_key(request) -> str:
    return f"{getattr(request, 'id', None)}:{getattr(request, 'retries', 0)}"


def admit_token_task(request, slots: int) -> bool:
    """A token task runs here only while this process has fewer token tasks than engine slots.

    Otherwise it would wait inside the process for a slot, holding a pool thread that a streaming decode
    needs, while another GPU worker may have free slots: it goes back to the broker instead (the task
    retries itself, before claiming its row, so the record does not change). Prefork workers run one task
    per child and always admit."""
    if not _threads_mode():
        return True
    with _admitted_lock:
        if len(_admitted) >= slots:
            return False
        _admitted.add(_execution_key(request))
        return True


def _task_postrun(task=None, **_kwargs) -> None:
    task_id = getattr(getattr(task, "request", None), "id", None)
    if task_id is not None:
        with _running_lock:
            _running.pop(task_id, None)
        with _admitted_lock:
            _admitted.discard(_execution_key(task.request))
    if getattr(_codec_holder, "held", False):
        _codec_holder.held = False
        _codec_lock.release()
    if not _threads_mode():
        return
    from gpu_worker.worker import cuda_health
    if cuda_health.process_is_poisoned():
        # this task has recorded its failure; the others finish (on a real poison they fail fast)
        request_worker_exit(cuda_health._replace_reason or "GPU failure")


def _connect_signals() -> None:
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(_task_prerun, weak=False)
    task_postrun.connect(_task_postrun, weak=False)


_connect_signals()
