"""Continuous batching: one engine steps every song of a process together (no Celery, no SQL here).

The engine keeps a FrameEngine (gpu_worker/generation/fast_generate.py) of `max_songs` fixed slots busy:
between frames it admits waiting songs into free slots (prefill + frame 0 for the new slots only, or
the replay of a resumed song's frames) and retires finished ones (EOS, max length, cancel, error).
gpu_worker/worker/batching.py is the Celery side (the per-process registry, the stage's wait loop, the
threads-pool hooks); docs/batching.md is the overview.

API:
    engine = GenerationEngine(model, max_songs=8)
    future = engine.submit(prompt, params, seed, progress=None, should_cancel=None, resume=None,
                           checkpoint=None, checkpoint_every=0)
    result = future.result()   # BatchedGenerationResult (a GenerationResult with batch_size, slots, ...)
    engine.cancel(future); engine.shutdown()

Reproducibility: a song's draws are a function of its seed and frame index
(gpu_worker/generation/sampling_noise.py), every op of a frame is row-wise, the GEMM shapes (always
`max_songs` slots) and the attention's key chunks are fixed for the engine, so a song's tokens do not
depend on its batch mates, its slot or the step's bucket (tests/test_generation_engine.py on the CPU,
bench/engine_batching.py on the GPU). The result's `batch_size` (the most songs live at once while this
one ran, itself included) and `slots` go into the stage's record.

Sharing: temperature, top-k and CFG scale are per-slot tensors of the FrameEngine and every slot has
two rows (a scale-1 song ignores its second), so songs with any settings share a frame step and no
song causes a graph capture beyond the key-length buckets. Requests are admitted in strict FIFO order
whenever a slot is free; only a prompt with another audio EOS id (another model configuration) waits
until the live songs have retired.

Out of memory: an OOM while admitting a song (its prefill) fails that song only (the stage retries it
once) and the allocator's cache is emptied; the other songs keep stepping.

Callbacks: `progress(done, total)`, `should_cancel()` and `checkpoint(done, grid)` run on the engine
thread at the read-back points (every `sync_every` frames, when a song is admitted, and when one must
have finished), so they must be cheap. `cancel(future)` frees the slot before the next frame step, a
`should_cancel()` that turns true at the next read-back; both resolve the future with GenerationCancelled.

Errors: a song-level error (EmptySongError, ContextLimitError, bad prompt ids, "no eligible id",
a callback that raises) fails only that song's future. Anything raised by the device work itself
(prefill, frame step, read-back - e.g. a CUDA error) is engine-level: every in-flight and waiting
future fails with it (each with its own copy, caused by the original), the engine is marked broken and
refuses new submissions
(EngineBroken, chained to and naming the original error). `abandon(exc)` does the same from outside
without waiting for the engine thread (a hung engine); `stalled_s()` says how long it has not stepped.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gpu_worker.generation import scheduler
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
from gpu_worker.generation.host_copy import to_host
from gpu_worker.model.heartmula import HeartMuLa
from gpu_worker.model.prompt import Prompt
from gpu_worker.model.token_validation import CODEBOOK_SIZE, validate_codes

log = logging.getLogger(__name__)

DEFAULT_SYNC_EVERY = 25
# set once any engine of this process has admitted a song: work that would slow a first frame (the
# worker's background codec warm-up) waits for it
FIRST_SONG_ADMITTED = threading.Event()


class EngineBroken(RuntimeError):
    """The engine hit an engine-level error (e.g. a CUDA error) and takes no more songs."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


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
    checkpoint_at: tuple[int, ...] = ()  # frame counts that get a checkpoint as well (codec window ends)
    checkpointed: int = 0  # frames in the last checkpoint handed out
    first_checkpoint_at: float | None = None  # when the first count of `checkpoint_at` was handed out
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

    @property
    def prompt_length(self) -> int:
        return self.prompt.length


class GenerationEngine:
    """Continuous batching over a FrameEngine of `max_songs` slots, driven by one background thread."""

    def __init__(self, model: HeartMuLa, *, max_songs: int,
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
               checkpoint_every: int = 0, checkpoint_at: tuple[int, ...] = (), pace_s: float = 0.0) -> Future:
        """Queue one song; its future resolves to a BatchedGenerationResult or the song's error.

        `resume [8, k]`: the song's first k frames from an earlier attempt (a token checkpoint of this
        engine's shape); the song continues from frame k and ends with the tokens of an uninterrupted
        run. `checkpoint(frames, grid)` receives the frames so far about every `checkpoint_every` frames, and
        as soon as the song has each count of `checkpoint_at` (a streaming decode waits for those).
        `pace_s`: the engine waits this long after every frame step while the song is live (fault
        injection's slow songs, so crash tests can strike mid-song).
        Raises EngineBroken / EngineClosed when the engine takes no more songs; song-level validation
        errors (context limit, prompt ids, seed, a bad resume grid) come back through the future.
        """
        future: Future = Future()
        future.set_running_or_notify_cancel()
        request = _Request(prompt, params, seed, progress, should_cancel, future, resume=resume,
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every, checkpoint_at=checkpoint_at,
                           pace_s=pace_s)
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

    def first_checkpoints_pending(self, grace_s: float = 0.0) -> int:
        """Live songs given `checkpoint_at` counts whose first such checkpoint is still to come, or was handed
        out less than `grace_s` ago: streamed songs whose first sound is being made. Songs still waiting for a
        slot do not count: none of their frames is being made."""
        now = time.monotonic()
        with self._cond:
            songs = [r for r in self._slots if r is not None]
        return sum(1 for r in songs if r.checkpoint_at and not r.cancel_requested and (
            r.first_checkpoint_at is None and r.checkpointed < min(r.checkpoint_at)
            or r.first_checkpoint_at is not None and now - r.first_checkpoint_at < grace_s))

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
            _resolve(request.future, exc=_own_copy(self._error))

    def _loop(self) -> None:
        since_sync = 0
        while True:
            stopped: list[_Request] = []
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
                    stopped += [r for r in live if r.cancel_requested]  # freed before the next step
                    for request in stopped:
                        self._slots[request.slot] = None
                        live.remove(request)
                    self.stats["songs_done"] += len(stopped)
                    admit = scheduler.pick_admissions(self._waiting, self._slots, live)
            if closing:
                if self._frames is not None:
                    self._frames.done.fill_(True)
                for request in leftover:
                    _resolve(request.future, exc=GenerationCancelled("generation engine shut down"))
                return
            for request in dropped:
                _resolve(request.future, exc=GenerationCancelled("cancelled before it started"))
            for request in stopped:
                assert self._frames is not None  # a live song runs on the slot buffers
                self._frames.done[request.slot] = True  # its rows are ignored from the next step on
                _resolve(request.future, exc=GenerationCancelled(
                    f"cancelled after about {request.steps + 1} of {request.total} frames"))

            fe = self._frames
            self._last_step = time.monotonic()
            if admit:
                fe = self._frame_engine(admit[0].key) if not live else fe
                assert fe is not None  # live songs run on self._frames
                live = live + self._admit(fe, admit)
                FIRST_SONG_ADMITTED.set()
            if not live:
                continue
            assert fe is not None  # live songs run on self._frames
            if scheduler.must_read_back(live, admitted=bool(admit), since_sync=since_sync, sync_every=self.sync_every):
                since_sync = 0
                live = self._read_back(fe, live)
                if not live:
                    continue
            for request in live:
                request.steps += 1
                request.batch_size = max(request.batch_size, len(live))
            fe.step(scheduler.step_bound(live))
            self._last_step = time.monotonic()
            self.stats["frames_stepped"] += 1
            since_sync += 1
            pace = max(r.pace_s for r in live)
            if pace > 0:
                time.sleep(pace)

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
                if request.checkpoint is not None and done > request.checkpointed and (
                        0 < request.checkpoint_every <= done - request.checkpointed
                        or any(request.checkpointed < at <= done for at in request.checkpoint_at)):
                    request.checkpointed = done
                    request.checkpoint(done, to_host(fe.frames[slot, :done].T.contiguous()))
                    if request.first_checkpoint_at is None and request.checkpoint_at \
                            and done >= min(request.checkpoint_at):
                        request.first_checkpoint_at = time.monotonic()
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
        grid = to_host(fe.frames[slot, :done].T.contiguous())  # device work: an error here is engine-level
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


def _own_copy(exc: BaseException) -> BaseException:
    """The engine's error for one song: a copy of the same type and message, caused by the original. Each
    song's thread raises its own instance, so no two threads rewrite one traceback (each record keeps its
    own stack, with the engine thread's below it); an exception that cannot be copied is shared."""
    try:
        clone = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception type copy cannot rebuild
        return exc
    clone.__cause__, clone.__traceback__ = exc, None
    return clone


def _resolve(future: Future, *, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
