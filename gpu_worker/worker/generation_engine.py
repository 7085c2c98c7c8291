"""Continuous batching for the GPU worker: one engine per model and device serves every song of the process.

Why: on an H100 the fast path's frame costs 8.99 ms for one song with CFG and 9.77 ms for eight songs
together (bench/RESULTS.md), but with one Celery task per song each song ran alone. The engine keeps a
FrameEngine (gpu_worker/generation/fast_generate.py) of `max_songs` fixed slots busy: between frames it admits
waiting songs into free slots (prefill + frame 0 for the new slots only) and retires finished ones
(EOS, max length, cancel, error). It is the default on CUDA (`SONGPIPE_GPU_BATCHING`, unset: on with
CUDA, off on the CPU; gpu_worker/worker/device.py): `generate_tokens` submits here and `songpipe worker gpu`
runs Celery's threads pool (`-P threads -c SONGPIPE_GPU_BATCH_SLOTS`), so all token tasks of the process
share this engine, one model copy and one CUDA context. docs/batching.md is the overview.

API:
    engine = GenerationEngine(model, max_songs=8)
    future = engine.submit(prompt, params, seed, progress=None, should_cancel=None)
    result = future.result()   # BatchedGenerationResult (a GenerationResult with batch_size, slots, ...)
    engine.cancel(future); engine.shutdown()
`get_engine(model)` is the per-process registry the stage uses.

Reproducibility: a song's draws are a function of its seed and frame index (gpu_worker/generation/sampling_noise.py)
and every op of a frame is row-wise, so its tokens do not depend on its batch mates: on the CPU in fp32
they are identical to `generate_fast` alone with the same seed (tests/test_generation_engine.py). On CUDA
in bf16 the GEMM shapes (always `max_songs` slots) are fixed, but kernels may still reduce in another
order than a solo run; the result's `batch_size` (the most songs that were live in the engine at once
while this one ran, itself included) goes into the stage output, and the stage records `engine_slots`.

Sharing: temperature, top-k and CFG scale are per-slot tensors of the FrameEngine and every slot has
two rows (a scale-1 song ignores its second), so songs with any settings share a frame step and no
song causes a graph capture beyond the key-length buckets. Requests are admitted in strict FIFO order
whenever a slot is free; only a prompt with another audio EOS id (another model configuration) waits
until the live songs have retired.

Out of memory: an OOM while admitting a song (its prefill) fails that song only (the stage retries it
once) and the allocator's cache is emptied; the other songs keep stepping.

Callbacks: `progress(done, total)` and `should_cancel()` run on the engine thread at the read-back
points (every `sync_every` frames, when a song is admitted, and when one must have finished), so they
must be cheap - the stage passes callbacks that only touch local variables and does its SQL work on
its own thread. A cancel (callback or `cancel(future)`) frees the slot at the next read-back and
resolves the future with GenerationCancelled.

Errors: a song-level error (EmptySongError, ContextLimitError, bad prompt ids, "no eligible id",
a callback that raises) fails only that song's future. Anything raised by the device work itself
(prefill, frame step, read-back - e.g. a CUDA error) is engine-level: every in-flight and waiting
future fails with that exception, the engine is marked broken and refuses new submissions
(EngineBroken, chained to and naming the original error so gpu_worker.worker.cuda_health classifies it).
The stage records the failure and the process-level handling below replaces the process.

CUDA poison in threads mode (what changes against prefork): with prefork the poisoned child exits
after recording and billiard forks a fresh one; with the threads pool there is no child - the worker
process itself holds the poisoned context. So this module's task_prerun / task_postrun handlers (the CLI
imports it at worker start with `--include gpu_worker.worker.generation_engine`; they act only when tasks
run in the worker's main process with SONGPIPE_GPU_BATCHING on - a prefork child keeps the existing
handling) make the worker, after the first task that recorded a poison / OOM
failure, stop consuming and shut down warm: Celery waits for the in-flight tasks (they fail fast on
the broken engine and record their failure), puts reserved messages back (kombu restores unacked
messages on a clean close) and exits with cuda_health.POISON_EXIT_CODE. A watchdog hard-exits if the
warm shutdown does not finish in `POISON_EXIT_GRACE_S`. Nothing restarts the process inside it: the
process supervisor does (`songpipe run`'s supervisor, orchestrator/supervisor.py, or systemd
`Restart=always` in deploy/systemd/).
The same hooks serialise `decode_audio` in threads mode (one codec decode at a time, as with prefork
concurrency 1) while token songs share the engine; Celery time limits are not enforced by the threads
pool, so the stage enforces the soft limit itself while it waits.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gpu_worker.generation.fast_generate import CancelFn, FastLogitsHook, FrameEngine, ProgressFn
from gpu_worker.generation.generate import (
    ContextLimitError,
    EmptySongError,
    GenerationCancelled,
    GenerationResult,
    SamplingParams,
    check_prompt,
    check_seed,
)
from gpu_worker.model.heartmula import HeartMuLa
from gpu_worker.model.prompt import Prompt
from gpu_worker.model.token_validation import CODEBOOK_SIZE, validate_codes
from tasks.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_SONGS: int = Settings.model_fields["gpu_batch_slots"].default  # SONGPIPE_GPU_BATCH_SLOTS
DEFAULT_SYNC_EVERY = 25
POISON_EXIT_GRACE_S = 300.0


class EngineBroken(RuntimeError):
    """The engine hit an engine-level error (e.g. a CUDA error) and takes no more songs."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


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


@dataclass
class BatchedGenerationResult(GenerationResult):
    batch_size: int = 1  # most songs live in the engine at once while this one ran (itself included)
    slots: int = 1  # the engine's slot count (GEMM shapes): part of what a bit-identical replay needs
    queued_s: float = 0.0  # waited for a slot / for the parameter set to come round
    generation_s: float = 0.0  # from admission to retirement
    resumed_from: int = 0  # frames taken from a token checkpoint instead of generated (0: from the start)
    resume_s: float = 0.0  # the replay of those frames through the backbone (prefill excluded)


# checkpoint(frames so far, grid [8, frames] int32 on the host); runs on the engine thread: keep it cheap
CheckpointFn = Callable[[int, torch.Tensor], None]


@dataclass(eq=False)
class _Request:
    prompt: Prompt
    params: SamplingParams
    seed: int
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    future: Future
    resume: torch.Tensor | None = None  # [8, k] frames to continue from
    checkpoint: CheckpointFn | None = None
    checkpoint_every: int = 0  # frames between checkpoints (0: none)
    checkpointed: int = 0  # frames in the last checkpoint handed out
    pace_s: float = 0.0
    resumed_from: int = 0
    resume_s: float = 0.0
    submitted: float = field(default_factory=time.monotonic)
    cancel_requested: bool = False
    slot: int = -1  # its FrameEngine slot once admitted (-1: waiting)
    steps: int = 0  # frame steps since frame 0 (host-side upper bound of the song's position)
    batch_size: int = 1
    admitted: float = 0.0

    @property
    def key(self) -> int:
        """What the slot buffers bake in: songs with another audio EOS id cannot share them."""
        return self.prompt.audio_eos_id

    @property
    def total(self) -> int:
        return self.params.max_frames


class GenerationEngine:
    """Continuous batching over a FrameEngine of `max_songs` slots, driven by one background thread."""

    def __init__(self, model: HeartMuLa, *, max_songs: int = DEFAULT_MAX_SONGS,
                 sync_every: int = DEFAULT_SYNC_EVERY, bucket: int | None = None, cache_len: int | None = None,
                 use_graphs: bool | None = None, complex_rope: bool = True,
                 logits_hook: FastLogitsHook | None = None, name: str = "generation-engine"):
        if max_songs < 1:
            raise ValueError(f"max_songs must be >= 1, got {max_songs}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.device = model.device
        self.max_songs = max_songs
        self.sync_every = sync_every
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.bucket = bucket or (512 if self.use_graphs else 64)
        limit = model.args.backbone.max_seq_len
        self.cache_len = min(limit, cache_len or limit)
        self.cache_len = min(limit, math.ceil(self.cache_len / self.bucket) * self.bucket)
        self.complex_rope = complex_rope
        self.logits_hook = logits_hook
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._slots: list[_Request | None] = [None] * max_songs
        self._closing = False
        self._cancel_on_close = False
        self._error: BaseException | None = None
        self._frames: FrameEngine | None = None
        self._frames_key: int | None = None  # the audio EOS id of the slot buffers
        self._last_step = time.monotonic()  # the engine thread's last sign of progress
        self.stats = {"frames_stepped": 0, "songs_done": 0, "max_live": 0, "buffer_rebuilds": 0,
                      "songs_out_of_memory": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ public API

    @property
    def broken(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def closed(self) -> bool:
        return self._closing

    def submit(self, prompt: Prompt, params: SamplingParams, seed: int,
               progress: ProgressFn | None = None, should_cancel: CancelFn | None = None, *,
               resume: torch.Tensor | None = None, checkpoint: CheckpointFn | None = None,
               checkpoint_every: int = 0, pace_s: float = 0.0) -> Future:
        """Queue one song; its future resolves to a BatchedGenerationResult or the song's error.

        `resume [8, k]`: the song's first k frames from an earlier attempt (a token checkpoint of this
        engine's shape); the song continues from frame k and ends with the tokens of an uninterrupted
        run. `checkpoint(frames, grid)` receives the frames so far about every `checkpoint_every` frames.
        `pace_s`: the engine waits this long after every frame step while the song is live (fault
        injection's slow songs, so crash tests can strike mid-song).
        Raises EngineBroken / EngineClosed when the engine takes no more songs; song-level validation
        errors (context limit, prompt ids, seed, a bad resume grid) come back through the future.
        """
        future: Future = Future()
        future.set_running_or_notify_cancel()
        request = _Request(prompt, params, seed, progress, should_cancel, future, resume=resume,
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every, pace_s=pace_s)
        try:
            self._validate(request)
        except Exception as exc:  # noqa: BLE001 - song-level: it goes through the future
            future.set_exception(exc)
            return future
        with self._cond:
            self._raise_if_unavailable()
            self._waiting.append(request)
            self._cond.notify_all()
        return future

    def cancel(self, future: Future) -> bool:
        """Ask for `future`'s song to stop; it resolves with GenerationCancelled within a read-back."""
        with self._cond:
            for request in [*self._waiting, *(r for r in self._slots if r is not None)]:
                if request.future is future:
                    request.cancel_requested = True
                    self._cond.notify_all()
                    return True
        return False

    def fail(self, exc: BaseException) -> None:
        """Break the engine from outside (e.g. the process's CUDA context was poisoned elsewhere)."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def abandon(self, exc: BaseException) -> None:
        """Break the engine and fail every song now, without waiting for the engine thread (it is hung)."""
        self.fail(exc)
        self._break(exc)

    def stalled_s(self) -> float:
        """Seconds since the engine thread last stepped, admitted or retired, while songs are live (else 0)."""
        with self._cond:
            if not any(r is not None for r in self._slots):
                return 0.0
            return time.monotonic() - self._last_step

    def shutdown(self, *, wait: bool = True, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop taking songs; `cancel` resolves waiting and live songs with GenerationCancelled
        (at the next read-back), otherwise they finish first. Joins the thread when `wait`."""
        with self._cond:
            self._closing = True
            self._cancel_on_close = self._cancel_on_close or cancel
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def live_count(self) -> int:
        with self._cond:
            return sum(r is not None for r in self._slots)

    def waiting_count(self) -> int:
        with self._cond:
            return len(self._waiting)

    # ------------------------------------------------------------------------------ internals

    def _raise_if_unavailable(self) -> None:
        if self._error is not None:
            err = self._error
            raise EngineBroken(f"generation engine is broken after {type(err).__name__}: {err}") from err
        if self._closing:
            raise EngineClosed("generation engine is shut down")

    def _validate(self, request: _Request) -> None:
        """The fast path's checks, in the caller's thread."""
        model, prompt, params = self.model, request.prompt, request.params
        limit = model.args.backbone.max_seq_len
        if prompt.length + request.total > limit:
            raise ContextLimitError(
                f"prompt length L={prompt.length} + max frames N={request.total} = {prompt.length + request.total} "
                f"exceeds the context limit {limit} (max_seq_len); shorten the lyrics or max_audio_length_ms")
        if prompt.length + request.total > self.cache_len:
            raise ContextLimitError(
                f"prompt length L={prompt.length} + max frames N={request.total} exceeds this engine's cache of "
                f"{self.cache_len} positions")
        if params.top_k > model.args.audio_vocab_size:
            raise ValueError(f"top_k must be in 1..{model.args.audio_vocab_size}, got {params.top_k}")
        check_seed(request.seed)
        check_prompt(model, prompt)
        if request.resume is not None:
            grid = request.resume
            codebooks = model.args.audio_num_codebooks
            if grid.dim() != 2 or grid.shape[0] != codebooks or not 1 <= grid.shape[1] < request.total:
                raise ValueError(f"resume grid must be [{codebooks}, k] with 1 <= k < {request.total} frames, "
                                 f"got {list(grid.shape)}")
            validate_codes(grid, num_quantizers=codebooks, codebook_size=CODEBOOK_SIZE)

    def _frame_engine(self, eos: int) -> FrameEngine:
        """Slot buffers (two rows a slot, for CFG) for prompts ending with `eos`; called only while no song
        is live. Built once per engine in practice: every prompt of a checkpoint has the same EOS id."""
        fe = self._frames
        if fe is None or self._frames_key != eos:
            self._frames = None
            if fe is not None:
                self.stats["buffer_rebuilds"] += 1
                if self.device.type == "cuda":
                    del fe
                    torch.cuda.empty_cache()
            fe = FrameEngine(self.model, num_songs=self.max_songs, rows=2, cache_len=self.cache_len,
                             max_frames=self.cache_len, audio_eos_id=eos, bucket=self.bucket,
                             use_graphs=self.use_graphs, logits_hook=self.logits_hook,
                             complex_rope=self.complex_rope)
            self._frames, self._frames_key = fe, eos
        return fe

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # engine-level: every song fails with it
            log.exception("generation engine failed; failing every in-flight song")
            self._break(exc)

    def _break(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            failed = [*self._waiting, *(r for r in self._slots if r is not None)]
            self._waiting.clear()
            self._slots = [None] * self.max_songs
        for request in failed:
            _resolve(request.future, exc=self._error)

    def _loop(self) -> None:
        since_sync = 0
        while True:
            with self._cond:
                while True:
                    if self._error is not None:
                        raise self._error  # broken from outside: fail everything with that error
                    live = [r for r in self._slots if r is not None]
                    if self._closing and (self._cancel_on_close or not (live or self._waiting)):
                        break
                    if live or self._waiting:
                        break
                    self._cond.wait()
                if self._closing and self._cancel_on_close:
                    leftover = [*self._waiting, *live]
                    self._waiting.clear()
                    self._slots = [None] * self.max_songs
                    closing = True
                elif self._closing and not (live or self._waiting):
                    return
                else:
                    closing = False
                    dropped = [r for r in self._waiting if r.cancel_requested]
                    for request in dropped:
                        self._waiting.remove(request)
                    admit = self._pick_admissions(live)
            if closing:
                if self._frames is not None:
                    self._frames.done.fill_(True)
                for request in leftover:
                    _resolve(request.future, exc=GenerationCancelled("generation engine shut down"))
                return
            for request in dropped:
                _resolve(request.future, exc=GenerationCancelled("cancelled before it started"))

            fe = self._frames
            self._last_step = time.monotonic()
            if admit:
                fe = self._frame_engine(admit[0].key) if not live else fe
                assert fe is not None  # live songs run on self._frames
                live = live + self._admit(fe, admit)
            if not live:
                continue
            assert fe is not None  # live songs run on self._frames
            must_finish = any(r.steps >= r.total - 1 for r in live)
            if admit or must_finish or since_sync >= self.sync_every:
                since_sync = 0
                live = self._read_back(fe, live)
                if not live:
                    continue
            for request in live:
                request.steps += 1
                request.batch_size = max(request.batch_size, len(live))
            max_position = max(min(r.prompt.length - 1 + r.steps, r.prompt.length + r.total - 1) for r in live)
            fe.step(max_position)
            self._last_step = time.monotonic()
            self.stats["frames_stepped"] += 1
            since_sync += 1
            pace = max(r.pace_s for r in live)
            if pace > 0:
                time.sleep(pace)

    def _pick_admissions(self, live: list[_Request]) -> list[_Request]:
        """Strict FIFO: admit from the head while slots are free and it fits the slot buffers."""
        admit = []
        free = [i for i, r in enumerate(self._slots) if r is None]
        key = live[0].key if live else (self._waiting[0].key if self._waiting else None)
        while self._waiting and free and self._waiting[0].key == key:
            request = self._waiting.popleft()
            request.slot = free.pop(0)
            self._slots[request.slot] = request
            admit.append(request)
        return admit

    def _admit(self, fe: FrameEngine, admit: list[_Request]) -> list[_Request]:
        """Prefill and frame 0 for the new slots only; the live slots' state is untouched. Returns the
        songs admitted; one whose prefill ran out of device memory fails alone and frees its slot."""
        mask = torch.zeros(self.max_songs, dtype=torch.bool)
        now = time.monotonic()
        admitted = []
        for request in admit:
            request.admitted = now
            request.steps = 0
            try:
                fe.prefill(request.slot, request.prompt, request.params, request.seed)
                if request.resume is not None:
                    self._resume(fe, request)
            except torch.OutOfMemoryError as exc:
                self._drop_out_of_memory(fe, request, exc)
                continue
            mask[request.slot] = request.resume is None  # a resumed song samples its next frame in the step
            admitted.append(request)
        if not admitted:
            return []
        if bool(mask.any()):
            fe.first_frame(mask.to(self.device))
        live = sum(r is not None for r in self._slots)
        self.stats["max_live"] = max(self.stats["max_live"], live)
        for occupant in self._slots:
            if occupant is not None:
                occupant.batch_size = max(occupant.batch_size, live)
        return admitted

    def _resume(self, fe: FrameEngine, request: _Request) -> None:
        assert request.resume is not None
        started = time.monotonic()
        frames = request.resume.T.contiguous()
        fe.resume(request.slot, frames)
        k = int(frames.shape[0])
        request.steps = k - 1  # the next step feeds frame k - 1, as the uninterrupted run's step k did
        request.resumed_from = request.checkpointed = k
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        request.resume_s = time.monotonic() - started

    def _drop_out_of_memory(self, fe: FrameEngine, request: _Request, exc: torch.OutOfMemoryError) -> None:
        log.warning("song in slot %d ran out of device memory at admission; failing that song only: %s",
                    request.slot, exc)
        fe.reset_slot(request.slot)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with self._cond:
            self._slots[request.slot] = None
            self.stats["songs_out_of_memory"] += 1
        _resolve(request.future, exc=exc)

    def _read_back(self, fe: FrameEngine, live: list[_Request]) -> list[_Request]:
        """The one host sync: retire finished / cancelled songs, report progress; returns the still-live."""
        state = fe.read_state()
        still: list[_Request] = []
        finished: list[tuple[_Request, BatchedGenerationResult | None, BaseException | None]] = []
        for request in live:
            slot = request.slot
            done = state["count"][slot]
            if state["done"][slot]:
                result, exc = self._finish(fe, request, state)
                finished.append((request, result, exc))
                continue
            try:
                cancel = request.cancel_requested or (
                    request.steps > 0 and request.should_cancel is not None and request.should_cancel())
                if self._closing and self._cancel_on_close:
                    cancel = True
                if cancel:
                    raise GenerationCancelled(f"cancelled after {done} of {request.total} frames")
                if request.steps > 0 and request.progress is not None:
                    request.progress(done, request.total)
                if request.checkpoint is not None and request.checkpoint_every > 0 \
                        and done - request.checkpointed >= request.checkpoint_every:
                    request.checkpointed = done
                    request.checkpoint(done, fe.frames[slot, :done].T.contiguous().cpu())
            except Exception as exc:  # noqa: BLE001 - a cancel, or a callback that raised: this song only
                fe.done[slot] = True
                finished.append((request, None, exc))
                continue
            still.append(request)
        # waiting songs may be cancelled too (their callbacks run here as well)
        with self._cond:
            waiting = list(self._waiting)
        for request in waiting:
            try:
                if not request.cancel_requested and request.should_cancel is not None and request.should_cancel():
                    request.cancel_requested = True
            except Exception:
                log.warning("should_cancel of a waiting song raised; cancelling it", exc_info=True)
                request.cancel_requested = True
        with self._cond:
            for request, _, _ in finished:
                self._slots[request.slot] = None
            self.stats["songs_done"] += len(finished)
        for request, result, error in finished:
            _resolve(request.future, result=result, exc=error)
        return still

    def _finish(self, fe: FrameEngine, request: _Request, state: dict) -> tuple:
        slot, args = request.slot, self.model.args
        done = state["count"][slot]
        if state["error"][slot] >= 0:
            frame, codebook = divmod(state["error"][slot], args.audio_num_codebooks)
            return None, RuntimeError(f"no eligible id at frame {frame}, codebook {codebook}: "
                                      "every logit was NaN or -inf")
        if done == 0:
            return None, EmptySongError("EOS at frame 0: the model ended the song before its first frame")
        grid = fe.frames[slot, :done].T.contiguous().cpu()  # device work: an error here is engine-level
        try:
            if request.progress is not None:
                request.progress(done, request.total)
            validate_codes(grid, num_quantizers=args.audio_num_codebooks, codebook_size=CODEBOOK_SIZE)
        except Exception as exc:  # noqa: BLE001 - this song only
            return None, exc
        now = time.monotonic()
        return BatchedGenerationResult(
            frames=grid, stop_reason="eos" if state["eos"][slot] else "max_length",
            prompt_length=request.prompt.length, batch_size=request.batch_size, slots=self.max_songs,
            queued_s=request.admitted - request.submitted, generation_s=now - request.admitted,
            resumed_from=request.resumed_from, resume_s=request.resume_s), None


def _is_device_error(exc: BaseException) -> bool:
    from gpu_worker.worker.cuda_health import is_cuda_poison

    return is_cuda_poison(exc)


def _resolve(future: Future, *, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


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

STAGE_POLL_S = 0.5


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
                  checkpoint_every: int = 0, pace_s: float = 0.0,
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

    def keep_checkpoint(done: int, grid: torch.Tensor) -> None:
        checkpoints[:] = [(done, grid)]

    future = engine.submit(prompt, params, seed, progress=remember, should_cancel=cancel.is_set, resume=resume,
                           checkpoint=keep_checkpoint if save_checkpoint is not None else None,
                           checkpoint_every=checkpoint_every, pace_s=pace_s)
    deadline = _soft_deadline()
    reported: tuple[int, int] | None = None
    try:
        while True:
            try:
                return future.result(timeout=poll_s)
            except TimeoutError:
                pass
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
_codec_lock = threading.Lock()
_codec_holder = threading.local()


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


def _task_prerun(task=None, **_kwargs) -> None:
    global _time_limit_watchdog
    if not _threads_mode():
        return
    if getattr(task, "name", "") == "songpipe.decode_audio":
        _codec_lock.acquire()  # one codec decode at a time, as with prefork concurrency 1; its clock starts now
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


def _task_postrun(task=None, **_kwargs) -> None:
    task_id = getattr(getattr(task, "request", None), "id", None)
    if task_id is not None:
        with _running_lock:
            _running.pop(task_id, None)
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
