"""Continuous batching (gpu_worker/generation/engine.py, gpu_worker/worker/batching.py) on the CPU, fp32, tiny checkpoint.

A song's tokens must not depend on which songs share the engine with it, nor on when it joins: each
must equal `generate_fast` alone with the same seed.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gpu_worker.generation.engine import (
    BatchedGenerationResult,
    EngineBroken,
    EngineClosed,
    GenerationEngine,
)
from gpu_worker.generation.fast_generate import generate_fast
from gpu_worker.generation.generate import (
    ContextLimitError,
    EmptySongError,
    GenerationCancelled,
    generate,
)
from gpu_worker.worker import batching as ge
from tests import model_fixtures
from tests.model_fixtures import EOS, no_eos, tiny_params, tiny_prompts
from tests.stack_fixtures import wait_until

lm = model_fixtures.lm  # the tiny checkpoint (a module-scoped fixture)

PARAMS = tiny_params(40)
TIMEOUT = 60


@pytest.fixture(scope="module")
def prompts(lm):
    return tiny_prompts(lm, 4)


def eos_at_frame_0_in_slot(slot):
    def hook(frame_index, codebook, logits):
        logits = no_eos(frame_index, codebook, logits)
        rows = (frame_index == 0) & (torch.arange(len(frame_index)) == slot)
        hit = torch.zeros_like(logits, dtype=torch.bool)
        hit[:, EOS] = True
        return torch.where(hit & rows[:, None], torch.full_like(logits, 1e4), logits)
    return hook


def solo(lm, prompt, params, seed):
    return generate_fast(lm.model, prompt, params, seeds=[seed],
                         logits_hook=no_eos)[0].frames


@pytest.fixture
def engine_factory(lm):
    made = []

    def make(**kwargs):
        kwargs.setdefault("logits_hook", no_eos)
        kwargs.setdefault("sync_every", 4)
        engine = GenerationEngine(lm.model, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown(timeout=TIMEOUT)


def test_three_songs_one_joining_mid_way_each_match_generate_fast_alone(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=4)
    joined: list = []
    seen_at_join: list[int] = []

    def progress_0(done, total):  # runs on the engine thread at a read-back: song 2 joins mid-way
        if done >= 12 and not joined:
            seen_at_join.append(engine.live_count())
            joined.append(engine.submit(prompts[2], PARAMS, 33))

    f0 = engine.submit(prompts[0], PARAMS, 11, progress=progress_0)
    f1 = engine.submit(prompts[1], PARAMS, 22)
    r0, r1 = f0.result(TIMEOUT), f1.result(TIMEOUT)
    r2 = joined[0].result(TIMEOUT)
    assert seen_at_join == [2]  # both first songs were live when the third was submitted
    for result, prompt, seed in ((r0, prompts[0], 11), (r1, prompts[1], 22), (r2, prompts[2], 33)):
        assert isinstance(result, BatchedGenerationResult)
        assert result.frames.shape == (8, 40) and result.stop_reason == "max_length"
        assert torch.equal(result.frames, solo(lm, prompt, PARAMS, seed))
        assert result.prompt_length == prompt.length and result.slots == 4
    assert (r0.batch_size, r1.batch_size, r2.batch_size) == (3, 3, 3)
    assert engine.stats["songs_done"] == 3 and engine.stats["max_live"] == 3
    assert engine.stats["frames_stepped"] > 39  # the join made the batch run past one song's length


def test_a_song_alone_reports_batch_size_1_and_eos_songs_stop_early(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2, logits_hook=None)
    short = dataclasses.replace(PARAMS, max_audio_length_ms=6 * 80)
    result = engine.submit(prompts[3], short, 5).result(TIMEOUT)
    expected = generate_fast(lm.model, prompts[3], short, seeds=[5])[0]
    assert result.batch_size == 1
    assert torch.equal(result.frames, expected.frames) and result.stop_reason == expected.stop_reason


def test_a_cancelled_song_frees_its_slot_for_a_waiting_song_and_the_others_finish(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2)
    stop = threading.Event()
    long = dataclasses.replace(PARAMS, max_audio_length_ms=200 * 80)

    def progress(done, total):
        if done >= 8:
            stop.set()

    cancelled = engine.submit(prompts[0], long, 1, progress=progress, should_cancel=stop.is_set)
    other = engine.submit(prompts[1], PARAMS, 2)
    waiting = engine.submit(prompts[2], PARAMS, 3)  # no free slot until the cancel
    dropped = engine.submit(prompts[3], PARAMS, 4)
    assert engine.cancel(dropped)
    with pytest.raises(GenerationCancelled):
        cancelled.result(TIMEOUT)
    with pytest.raises(GenerationCancelled):
        dropped.result(TIMEOUT)
    assert torch.equal(other.result(TIMEOUT).frames, solo(lm, prompts[1], PARAMS, 2))
    assert torch.equal(waiting.result(TIMEOUT).frames, solo(lm, prompts[2], PARAMS, 3))
    assert engine.live_count() == 0 and engine.waiting_count() == 0


def test_empty_song_error_fails_only_its_future(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2, logits_hook=eos_at_frame_0_in_slot(1))  # lowest free slot first
    first = engine.submit(prompts[0], PARAMS, 7)
    empty = engine.submit(prompts[1], PARAMS, 8)
    with pytest.raises(EmptySongError, match="EOS at frame 0"):
        empty.result(TIMEOUT)
    assert torch.equal(first.result(TIMEOUT).frames, solo(lm, prompts[0], PARAMS, 7))
    assert not engine.broken


def test_song_level_validation_and_callback_errors_fail_only_that_song(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2)
    too_long = dataclasses.replace(PARAMS, max_audio_length_ms=(256 - prompts[0].length + 1) * 80)
    with pytest.raises(ContextLimitError, match="context limit 256"):
        engine.submit(prompts[0], too_long, 1).result(TIMEOUT)

    def bad_progress(done, total):
        raise KeyError("progress callback bug")

    bad = engine.submit(prompts[0], PARAMS, 1, progress=bad_progress)
    good = engine.submit(prompts[1], PARAMS, 2)
    with pytest.raises(KeyError):
        bad.result(TIMEOUT)
    assert torch.equal(good.result(TIMEOUT).frames, solo(lm, prompts[1], PARAMS, 2))
    assert not engine.broken


def test_an_engine_error_fails_every_song_and_later_submissions(lm, prompts, engine_factory):
    def explode(frame_index, codebook, logits):
        if int(frame_index.max()) >= 6:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return no_eos(frame_index, codebook, logits)

    engine = engine_factory(max_songs=2, logits_hook=explode)
    futures = [engine.submit(prompts[i], PARAMS, i) for i in range(3)]  # the third one is still waiting
    errors = []
    for future in futures:
        with pytest.raises(RuntimeError, match="illegal memory access") as failed:
            future.result(TIMEOUT)
        errors.append(failed.value)
    # each song raises its own instance (no two threads rewrite one traceback), caused by the engine's error
    assert len({id(e) for e in errors}) == 3 and all(type(e) is RuntimeError for e in errors)
    assert len({id(e.__cause__) for e in errors}) == 1 and errors[0].__cause__ is engine.error
    assert engine.broken
    with pytest.raises(EngineBroken, match="illegal memory access") as caught:
        engine.submit(prompts[0], PARAMS, 0)
    from gpu_worker.worker.cuda_health import is_cuda_poison

    assert is_cuda_poison(caught.value)  # so the stage's failure handler replaces the process


def test_songs_with_different_sampling_parameters_share_frame_steps(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=4)
    cold = dataclasses.replace(PARAMS, temperature=0.7, top_k=20, max_audio_length_ms=20 * 80)
    plain = dataclasses.replace(PARAMS, cfg_scale=1.0, max_audio_length_ms=24 * 80)  # no CFG: its 2nd row idles
    hot = dataclasses.replace(PARAMS, temperature=1.4, top_k=3, cfg_scale=3.0, max_audio_length_ms=16 * 80)
    requests = [(prompts[0], PARAMS, 1), (prompts[1], cold, 2), (prompts[2], hot, 3), (prompts[3], plain, 4)]
    futures = [engine.submit(prompt, params, seed) for prompt, params, seed in requests]
    for future, (prompt, params, seed) in zip(futures, requests):
        result = future.result(TIMEOUT)
        assert torch.equal(result.frames, solo(lm, prompt, params, seed))  # the song alone, as it would run
        assert torch.equal(result.frames, generate(lm.model, prompt, params, seed=seed, logits_hook=no_eos).frames)
    assert [f.result().batch_size for f in futures] == [4, 4, 4, 4]  # no song waited for another's settings
    assert engine.stats["buffer_rebuilds"] == 0 and engine.stats["max_live"] == 4


def test_an_out_of_memory_error_at_admission_fails_only_that_song(lm, prompts, engine_factory, monkeypatch):
    from gpu_worker.generation.fast_generate import FrameEngine

    engine = engine_factory(max_songs=3)
    original = FrameEngine.prefill

    def prefill(self, song, prompt, params, seed):
        if seed == 66:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return original(self, song, prompt, params, seed)

    monkeypatch.setattr(FrameEngine, "prefill", prefill)
    futures = [engine.submit(prompts[i], PARAMS, seed) for i, seed in enumerate((65, 66, 67))]
    with pytest.raises(torch.OutOfMemoryError):
        futures[1].result(TIMEOUT)
    for index in (0, 2):
        assert torch.equal(futures[index].result(TIMEOUT).frames, solo(lm, prompts[index], PARAMS, (65, 66, 67)[index]))
    assert not engine.broken and engine.stats["songs_out_of_memory"] == 1
    retry = engine.submit(prompts[1], PARAMS, 5)  # the slot is free again and the engine takes songs
    assert retry.result(TIMEOUT).frames.shape == (8, 40)


def test_shutdown_cancels_live_songs_and_refuses_new_ones(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2)
    started = threading.Event()
    long = dataclasses.replace(PARAMS, max_audio_length_ms=200 * 80)
    live = engine.submit(prompts[0], long, 1, progress=lambda done, total: started.set())
    assert started.wait(TIMEOUT)
    engine.shutdown(timeout=TIMEOUT)
    with pytest.raises(GenerationCancelled):
        live.result(TIMEOUT)
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], PARAMS, 1)


def test_run_in_engine_reports_progress_on_the_callers_thread_and_maps_a_cancel(lm, prompts, engine_factory):
    from tasks.recording import JobCancelled

    engine = engine_factory(max_songs=2, sync_every=2)
    long = dataclasses.replace(PARAMS, max_audio_length_ms=200 * 80)
    caller = threading.current_thread()

    class Ctx:
        def __init__(self, cancel_after):
            self.calls, self.cancel_after = [], cancel_after

        def progress(self, done, total, unit="frames", force=False):
            assert threading.current_thread() is caller
            self.calls.append((done, total))
            if self.cancel_after is not None and done >= self.cancel_after:
                raise JobCancelled("cancelled")

        def should_cancel(self):
            return False

    ctx = Ctx(cancel_after=None)
    result = ge.run_in_engine(lm.model, prompts[1], PARAMS, 2, ctx, engine=engine, poll_s=0.01)
    assert torch.equal(result.frames, solo(lm, prompts[1], PARAMS, 2))
    ctx = Ctx(cancel_after=4)
    with pytest.raises(JobCancelled):
        ge.run_in_engine(lm.model, prompts[0], long, 1, ctx, engine=engine, poll_s=0.01)
    deadline = threading.Event()
    for _ in range(200):  # the slot is freed at the engine's next read-back
        if engine.live_count() == 0:
            break
        deadline.wait(0.05)
    assert engine.live_count() == 0 and not engine.broken


def test_threads_mode_poison_stops_the_worker_warm_and_serialises_the_codec(monkeypatch):
    from celery.worker import state as worker_state

    from gpu_worker.worker import cuda_health
    exits: list[tuple[int, float]] = []
    monkeypatch.setattr(ge, "_start_watchdog", lambda code, grace: exits.append((code, grace)))
    monkeypatch.setattr(ge, "_threads_mode", lambda: True)
    monkeypatch.setattr(ge, "_exit_requested", False)
    monkeypatch.setattr(worker_state, "should_stop", None)
    decode = SimpleNamespace(name="songpipe.decode_audio")
    ge._task_prerun(task=decode)
    assert ge._codec_lock.locked()
    ge._task_postrun(task=decode)
    assert not ge._codec_lock.locked() and worker_state.should_stop is None and not exits

    monkeypatch.setattr(cuda_health, "_replace_reason", "CUDA context poisoned (AcceleratorError)")
    ge._task_postrun(task=SimpleNamespace(name="songpipe.generate_tokens"))
    assert worker_state.should_stop == cuda_health.POISON_EXIT_CODE  # warm shutdown, then exit 70
    assert exits == [(cuda_health.POISON_EXIT_CODE, ge.POISON_EXIT_GRACE_S)]


def test_the_gpu_worker_command_uses_threads_only_when_batching_is_on():
    from orchestrator.cli import worker_argv

    default = worker_argv("gpu", None, "INFO")
    assert default[default.index("--pool") + 1] == "prefork" and default[default.index("--concurrency") + 1] == "1"
    assert "--include" not in default
    batched = worker_argv("gpu", None, "INFO", gpu_batching=True)
    assert batched[batched.index("--pool") + 1] == "threads"
    # two threads a slot: with streaming on (the default) a song's decode runs beside its token task
    assert batched[batched.index("--concurrency") + 1] == str(2 * ge.DEFAULT_MAX_SONGS)
    assert batched[batched.index("--include") + 1] == "gpu_worker.worker.batching"


def test_the_batching_workers_threads_follow_the_slot_setting(monkeypatch):
    from orchestrator.cli import worker_argv

    monkeypatch.setenv("SONGPIPE_GPU_BATCH_SLOTS", "5")
    batched = worker_argv("gpu", None, "INFO", gpu_batching=True)
    assert batched[batched.index("--concurrency") + 1] == "10"
    monkeypatch.setenv("SONGPIPE_STREAMING", "0")
    unstreamed = worker_argv("gpu", None, "INFO", gpu_batching=True)
    assert unstreamed[unstreamed.index("--concurrency") + 1] == "5"


def test_batching_is_the_default_on_cuda_and_off_on_the_cpu(monkeypatch):
    from gpu_worker.worker.device import gpu_batching_enabled
    from tasks.settings import Settings

    monkeypatch.delenv("SONGPIPE_GPU_BATCHING", raising=False)
    assert not gpu_batching_enabled(Settings(device="cpu"))
    assert gpu_batching_enabled(Settings(device="cpu", gpu_batching=True))  # what the stack tests use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_batching_enabled(Settings(device="auto"))
    assert not gpu_batching_enabled(Settings(device="auto", gpu_batching=False))


@pytest.mark.parametrize("resume_at", [1, 5, 23, 39])
def test_a_song_resumed_from_its_first_frames_ends_with_the_uninterrupted_tokens(lm, prompts, engine_factory,
                                                                                 resume_at):
    """Resume replays the checkpointed frames through the backbone in frame-step-shaped chunks, beside
    songs that keep running; the continuation equals the song's uninterrupted run."""
    engine = engine_factory(max_songs=4)
    whole = engine.submit(prompts[0], PARAMS, 11).result(TIMEOUT).frames  # 40 frames, no EOS
    companions = [engine.submit(prompts[i], dataclasses.replace(PARAMS, max_audio_length_ms=(30 + i) * 80), 20 + i)
                  for i in (1, 2)]
    resumed = engine.submit(prompts[0], PARAMS, 11, resume=whole[:, :resume_at].clone()).result(TIMEOUT)
    assert resumed.resumed_from == resume_at
    assert torch.equal(resumed.frames, whole)
    for future in companions:
        assert future.result(TIMEOUT).frames.shape[1] > 0


def test_checkpoints_hand_out_the_frames_so_far_and_a_bad_resume_grid_fails_only_that_song(lm, prompts,
                                                                                         engine_factory):
    engine = engine_factory(max_songs=2)
    seen: list[tuple[int, torch.Tensor]] = []
    result = engine.submit(prompts[0], PARAMS, 5, checkpoint=lambda done, grid: seen.append((done, grid)),
                           checkpoint_every=8).result(TIMEOUT)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen}) and len(seen) >= 3
    assert all(done - before >= 8 for (before, _), (done, _) in zip([(0, None), *seen], seen))
    for done, grid in seen:
        assert grid.shape == (8, done) and torch.equal(grid.long(), result.frames[:, :done].long())
    too_long = engine.submit(prompts[0], PARAMS, 5, resume=result.frames.clone())  # nothing left to generate
    with pytest.raises(ValueError, match="resume grid"):
        too_long.result(TIMEOUT)
    assert engine.submit(prompts[1], PARAMS, 6).result(TIMEOUT).frames.shape[1] == 40


def test_an_engine_that_stops_stepping_is_abandoned_and_every_song_fails_with_a_transient_stall(lm, prompts):
    from tasks.recording import is_transient

    # not the fixture's engine: its thread stays asleep (a daemon), nothing may wait to join it
    engine = GenerationEngine(lm.model, max_songs=2, logits_hook=no_eos, sync_every=4)

    class Ctx:
        def progress(self, *args, **kwargs):
            pass

        def should_cancel(self):
            return False

    companion = engine.submit(prompts[1], PARAMS, 2)
    with pytest.raises(ge.EngineStalled, match="no frame step") as raised:  # the engine thread sleeps an hour
        ge.run_in_engine(lm.model, prompts[0], PARAMS, 1, Ctx(), engine=engine, poll_s=0.02, pace_s=3600,
                         stall_s=0.5)
    assert is_transient(raised.value) and engine.broken
    with pytest.raises(ge.EngineStalled):  # failed at once, although the engine thread never woke up
        companion.result(1)
    assert engine.live_count() == 0
    with pytest.raises(EngineBroken):
        engine.submit(prompts[2], PARAMS, 3)
    engine.shutdown(wait=False)


def test_threads_mode_replaces_the_process_when_a_task_runs_past_its_hard_time_limit(monkeypatch):
    """The threads pool cannot kill one task: a decode hung past its hard limit (holding the codec lock)
    ends the process warm, with a short grace, and later stages are handed back meanwhile."""
    import time as clock

    from celery.worker import state as worker_state

    from gpu_worker.worker import cuda_health
    exits: list[tuple[int, float]] = []
    monkeypatch.setattr(ge, "_start_watchdog", lambda code, grace: exits.append((code, grace)))
    monkeypatch.setattr(ge, "_threads_mode", lambda: True)
    monkeypatch.setattr(ge, "_exit_requested", False)
    monkeypatch.setattr(ge, "_time_limit_watchdog", "not started in a test")
    monkeypatch.setattr(ge, "_running", {})
    monkeypatch.setattr(worker_state, "should_stop", None)
    monkeypatch.setattr(cuda_health, "_replace_reason", None)
    decode = SimpleNamespace(name="songpipe.decode_audio", request=SimpleNamespace(id="d1", timelimit=(30.0, 20.0)))
    tokens = SimpleNamespace(name="songpipe.generate_tokens", request=SimpleNamespace(id="t1", timelimit=(600.0, 500.0)))
    ge._task_prerun(task=decode)
    ge._task_prerun(task=tokens)
    try:
        now = clock.monotonic()
        assert not ge.check_time_limits(now + 10) and worker_state.should_stop is None
        assert ge.overdue_tasks(now + 31) == [("songpipe.decode_audio", 30.0)]
        assert ge.check_time_limits(now + 31)
        assert worker_state.should_stop == cuda_health.POISON_EXIT_CODE
        assert exits == [(cuda_health.POISON_EXIT_CODE, ge.HARD_LIMIT_EXIT_GRACE_S)]
        assert "hard time limit of 30 s" in cuda_health._replace_reason
    finally:
        ge._task_postrun(task=tokens)
        ge._task_postrun(task=decode)
    assert not ge._codec_lock.locked() and ge.overdue_tasks(clock.monotonic() + 10**6) == []


def test_a_gpu_stage_reaching_a_threads_worker_on_its_way_out_is_handed_back_not_failed(monkeypatch):
    from gpu_worker.worker import cuda_health
    from tasks.recording import JobCancelled

    ctx = SimpleNamespace(stage="generate_tokens", _stopping=False)
    monkeypatch.setattr(cuda_health, "_is_pool_child", lambda: False)
    monkeypatch.setattr(cuda_health, "_simulated_poison", None)
    monkeypatch.setattr(cuda_health, "_replace_reason", None)
    cuda_health._guard(ctx, "start", {})  # a healthy process runs it
    assert ctx._stopping is False
    cuda_health.mark_for_replacement("the generation engine stopped stepping")
    with pytest.raises(JobCancelled, match="handed back"):
        cuda_health._guard(ctx, "start", {})
    assert ctx._stopping is True  # StageRunner then ends the attempt lost and queues a new one


def test_cancel_frees_the_songs_slot_before_the_next_frame_step(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=2, sync_every=50)  # read-backs far apart: the cancel must not wait for one
    long = dataclasses.replace(PARAMS, max_audio_length_ms=150 * 80)
    started = threading.Event()
    victim = engine.submit(prompts[0], long, 1, progress=lambda done, total: started.set())
    other = engine.submit(prompts[1], long, 2)
    for _ in range(600):  # until the first read-back after admission has run (frame 0 is out)
        if engine.stats["frames_stepped"] > 0:
            break
        threading.Event().wait(0.01)
    with engine._cond:  # between two steps: nothing else steps while we hold the lock
        assert engine.cancel(victim)
        at_cancel = engine.stats["frames_stepped"]
    with pytest.raises(GenerationCancelled):
        victim.result(TIMEOUT)
    assert engine.stats["frames_stepped"] - at_cancel <= 1  # freed before (at most) the step already under way
    assert engine.live_count() <= 1 and other.result(TIMEOUT).frames.shape[1] == 150  # the other runs on


def test_a_streamed_song_is_pending_until_its_first_window_checkpoint_and_a_grace_after(lm, prompts, engine_factory):
    engine = engine_factory(max_songs=1)
    before_first, after_first = threading.Event(), threading.Event()
    seen: list[int] = []

    def should_cancel() -> bool:  # runs on the engine thread at each read-back: it holds the song there
        (after_first if seen else before_first).wait(30)
        return False

    streamed = engine.submit(prompts[0], PARAMS, 1, checkpoint=lambda done, grid: seen.append(done),
                             checkpoint_at=(12, 30), should_cancel=should_cancel)
    plain = engine.submit(prompts[1], PARAMS, 2)  # no checkpoint_at; it waits for the one slot
    wait_until(lambda: engine.live_count() == 1, TIMEOUT, "the streamed song admitted")
    assert engine.first_checkpoints_pending() == 1  # held in its cancel check, before its first checkpoint
    before_first.set()
    # held again at the read-back after its first checkpoint: pending only within the grace
    wait_until(lambda: seen and engine.first_checkpoints_pending() == 0, TIMEOUT, "the first checkpoint")
    assert seen[0] >= 12 and engine.first_checkpoints_pending(grace_s=3600) == 1
    after_first.set()
    streamed.result(TIMEOUT), plain.result(TIMEOUT)
    assert engine.first_checkpoints_pending(grace_s=3600) == 0  # a finished song has left the engine


def test_a_later_window_waits_while_a_streamed_songs_first_window_is_generated(lm, prompts, monkeypatch):
    """batching.codec_turn in a threads-mode process, beside a real engine registered for the model."""
    from gpu_worker.worker.priority_turns import PriorityTurns

    monkeypatch.setattr(ge, "_hooks_forced", True)
    monkeypatch.setattr(ge, "FIRST_SOUND_GRACE_S", 0.05)
    monkeypatch.setattr(ge, "_codec_lock", PriorityTurns(ge.first_sounds_pending, poll_s=0.005))
    engine = ge.get_engine(lm.model, max_songs=2)
    release = threading.Event()
    order: list[str] = []

    def window(priority: int) -> threading.Thread:
        def run() -> None:
            with ge.codec_turn(priority, None):
                order.append(f"window {priority}")
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def plain_decode() -> None:  # a decode task that does not follow its token stage holds the codec throughout
        decode = SimpleNamespace(name="songpipe.decode_audio")
        ge._task_prerun(task=decode)
        order.append("plain decode")
        ge._task_postrun(task=decode)

    try:
        window(3).join(10)
        assert order == ["window 3"]  # nothing streams yet: a later window goes at once
        song = engine.submit(prompts[0], PARAMS, 1, checkpoint=lambda done, grid: None, checkpoint_at=(12,),
                             should_cancel=lambda: not release.wait(30))  # held before its first checkpoint
        wait_until(lambda: engine.live_count() == 1, TIMEOUT, "the streamed song admitted")
        later = window(2)
        wait_until(lambda: ge._codec_lock.waiting() == [2], 10, "the later window queued")
        plain = threading.Thread(target=plain_decode, daemon=True)
        plain.start()
        wait_until(lambda: ge._codec_lock.waiting() == [ge.PLAIN_DECODE_PRIORITY, 2], 10, "the plain decode queued")
        window(0).join(10)
        assert order == ["window 3", "window 0"]  # a first window is never held back
        time.sleep(0.1)
        assert order == ["window 3", "window 0"] and later.is_alive() and plain.is_alive()
        release.set()
        later.join(30), plain.join(30)
        assert order == ["window 3", "window 0", "plain decode", "window 2"]
        song.result(TIMEOUT)
    finally:
        release.set()
        ge.shutdown_engines()
