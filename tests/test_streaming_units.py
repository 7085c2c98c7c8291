"""Streaming's parts without workers (docs/streaming.md): window geometry, window-by-window decoding,
the window ends the token stage checkpoints at, the follower's contract, limits and record rules."""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sqlalchemy import select

from db.engine import session_scope
from db.models import StageRun, StageStatus, utcnow
from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint
from gpu_worker.model.heartcodec import (
    PUBLISHED_WINDOWS,
    CodecConfigError,
    HeartCodecConfig,
    WindowByWindow,
    WindowGeometry,
    build_random_heartcodec,
    plan_windows,
)
from gpu_worker.worker.token_checkpoints import stream_window_ends
from orchestrator.submission import new_job_rows
from tasks import reconciler
from tasks.audio_files import pcm16_bytes
from tasks.contracts import DecodeAudioInput, JobRequest
from tasks.pipeline.attempts import add_attempts, followed_progress
from tasks.recording import lease_s
from tasks.settings import Settings
from tasks.stage_inputs import decode_audio_input
from tasks.time_limits import following_limits, stage_limits

SMALL = WindowGeometry(48, 40)


def test_the_published_geometry_and_a_small_one_plan_the_same_way():
    assert (PUBLISHED_WINDOWS.window_frames, PUBLISHED_WINDOWS.hop_frames, PUBLISHED_WINDOWS.prefix_latents) == (372, 320, 104)
    assert plan_windows(3000).num_windows == 10 and plan_windows(3000).padded_frames == 3252
    plan = plan_windows(128, SMALL)
    assert (plan.padded_frames, plan.num_windows, plan.window(2)) == (128, 3, slice(80, 128))
    assert SMALL.frames_needed(1) == 88 and SMALL.final_samples_after(0) == 40 * 3840
    with pytest.raises(CodecConfigError, match="hop_frames"):
        WindowGeometry(40, 40)


def test_a_published_config_without_window_keys_takes_the_published_windows_silently(caplog):
    data = HeartCodecConfig.tiny().to_dict()
    del data["window_frames"], data["hop_frames"]
    with caplog.at_level(logging.WARNING, logger="gpu_worker.model.heartcodec"):
        config = HeartCodecConfig.from_dict(data)
    assert config.windows == PUBLISHED_WINDOWS
    assert "window_frames" not in caplog.text and "hop_frames" not in caplog.text
    assert HeartCodecConfig.from_dict({**data, "window_frames": 48, "hop_frames": 40}).windows == SMALL


def test_windows_decoded_one_by_one_give_final_samples_equal_to_the_whole_decode():
    codec = build_random_heartcodec(replace(HeartCodecConfig.tiny(), window_frames=48, hop_frames=40))
    codes = torch.randint(0, codec.config.codebook_size, (8, 128), generator=torch.Generator().manual_seed(1))
    whole = codec.decode(codes, generator=torch.Generator().manual_seed(5))
    song = WindowByWindow(SMALL, torch.Generator().manual_seed(5), 128, device=codec.device,
                          solve_window=codec.solve_window, decode_latents=codec.scalar_model.decode_batch)
    finals = []
    with torch.inference_mode():
        for w in range(3):
            song.add(codes[:, SMALL.window(w)], last=w == 2)
            finals.append(song.final_samples)
            assert torch.equal(song.samples(0, song.final_samples)[:, :whole.shape[1]],
                               whole[:, :min(song.final_samples, whole.shape[1])])
    assert finals == [40 * 3840, 80 * 3840, 128 * 3840]
    with pytest.raises(ValueError, match="only"):
        WindowByWindow(SMALL, torch.Generator(), 128, device=codec.device, solve_window=codec.solve_window,
                       decode_latents=codec.scalar_model.decode_batch).samples(0, 1)


def test_the_pcm_of_a_slice_of_samples_is_that_slice_of_the_songs_pcm():
    audio = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 1000)).astype(np.float32)
    whole = pcm16_bytes(audio)
    assert pcm16_bytes(audio[:, 300:700]) == whole[300 * 4:700 * 4]
    assert len(whole) == 1000 * 4


def test_the_token_stage_checkpoints_one_frame_past_each_window_that_cannot_be_the_last(tmp_path):
    small = make_tiny_checkpoint(tmp_path / "small", codec_windows=(48, 40))
    assert stream_window_ends(small, 128) == (49, 89)
    assert stream_window_ends(small, 48) == ()  # one tiled window: it waits for the end
    published = make_tiny_checkpoint(tmp_path / "published")
    assert stream_window_ends(published, 3000)[:2] == (373, 693) and len(stream_window_ends(published, 3000)) == 9


def test_a_following_decode_names_its_token_attempt_or_its_tokens():
    with pytest.raises(ValidationError, match="tokens is required"):
        DecodeAudioInput(seed=1, checkpoint="c")
    with pytest.raises(ValidationError, match="go together"):
        DecodeAudioInput(seed=1, checkpoint="c", frames=3, follow={"attempt": 1, "max_frames": 3})
    follower = DecodeAudioInput(seed=1, checkpoint="c", follow={"attempt": 2, "max_frames": 128})
    assert follower.tokens is None and follower.follow is not None and follower.follow.attempt == 2


def test_a_follower_lives_through_both_stages_budgets():
    settings = Settings()
    both = following_limits("decode_audio", "generate_tokens", 240_000, settings)
    own = stage_limits("decode_audio", 240_000, settings)
    assert both.hard_s > own.hard_s + stage_limits("generate_tokens", 240_000, settings).hard_s // 2
    assert both.soft_s < both.hard_s


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, heartbeat_s=0.25,
                    redis_url="redis://127.0.0.1:1/0", default_tags_backend="given", default_lyrics_backend="rules")


def _job(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest(lyrics="la la la", tags="ska", seed=7, max_audio_length_ms=10_240),
                            settings, source="test").id


def _set(settings: Settings, job_id: str, stage: str, attempt: int, **values) -> None:
    with session_scope(settings.resolved_database_url) as session:
        row = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                                    StageRun.attempt == attempt))
        for key, value in values.items():
            setattr(row, key, value)


def _status(settings: Settings, job_id: str, stage: str) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return [r.status for r in session.scalars(select(StageRun).where(
            StageRun.job_id == job_id, StageRun.stage == stage).order_by(StageRun.attempt))]


def test_a_decode_resolved_while_its_token_stage_runs_follows_it_and_sees_its_checkpoints(settings):
    job_id = _job(settings)
    for stage in ("refine_lyrics", "generate_tags"):
        _set(settings, job_id, stage, 1, status=StageStatus.SUCCEEDED,
             outputs={"lyrics": "la la la", "tags_string": "ska"})
    point = {"done": 49, "tokens": {"sha256": "a" * 64}}
    _set(settings, job_id, "generate_tokens", 1, status=StageStatus.RUNNING, progress={"checkpoint": point})
    with session_scope(settings.resolved_database_url) as session:
        from db.models import Job

        inputs = decode_audio_input(session, session.get_one(Job, job_id), settings)
        seen = followed_progress(session, job_id, "generate_tokens")
    assert inputs.tokens is None and inputs.follow is not None and inputs.follow.attempt == 1
    assert inputs.follow.max_frames == 128
    assert seen.outputs is None and seen.checkpoint == point and seen.checkpoint_attempt == 1


def test_re_running_the_token_stage_supersedes_the_decode_that_followed_it(settings):
    job_id = _job(settings)
    _set(settings, job_id, "generate_tokens", 1, status=StageStatus.LOST)
    _set(settings, job_id, "decode_audio", 1, status=StageStatus.RUNNING, started_at=utcnow())
    with session_scope(settings.resolved_database_url) as session:
        attempts = add_attempts(session, job_id, "generate_tokens", requested_by="test")
    assert attempts == {"generate_tokens": 2, "decode_audio": 2, "encode_audio": 2}
    assert _status(settings, job_id, "decode_audio") == ["superseded", "queued"]
    assert _status(settings, job_id, "encode_audio") == ["superseded", "queued"]


def test_the_reconciler_judges_a_lost_follower_by_both_stages_budgets(settings):
    """A follower that ran through the whole token stage is not taken for a decode past its time limit."""
    job_id = _job(settings)
    for stage in ("refine_lyrics", "generate_tags", "generate_tokens"):
        _set(settings, job_id, stage, 1, status=StageStatus.SUCCEEDED, outputs={})
    decode_hard = stage_limits("decode_audio", 10_240, settings).hard_s
    started = utcnow() - dt.timedelta(seconds=decode_hard + 100)
    seen = utcnow() - dt.timedelta(seconds=lease_s(settings) + 5)
    _set(settings, job_id, "decode_audio", 1, status=StageStatus.RUNNING, started_at=started, heartbeat_at=seen,
         inputs={"seed": 7, "checkpoint": "c", "follow": {"attempt": 1, "max_frames": 128}})
    decisions = reconciler.reconcile_once(settings, broker_view=set, sender=lambda *a: None, confirm_delay_s=0)
    (decision,) = [d for d in decisions if d.job_id == job_id]
    assert decision.action == "resent", decision
    assert _status(settings, job_id, "decode_audio") == ["lost", "queued"]


def _following(settings: Settings, job_id: str) -> bool:
    with session_scope(settings.resolved_database_url) as session:
        row = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "decode_audio"))
        return bool(row is not None and (row.inputs or {}).get("follow"))


def test_a_decode_following_a_token_stage_that_fails_stops_and_leaves_the_jobs_failure_as_it_is(settings,
                                                                                                 tiny_checkpoint_dir):
    import threading

    from celery.exceptions import Ignore

    from db.models import Job, JobStatus
    from gpu_worker.worker.stages import decode_audio
    from tasks.pipeline.attempts import end_job
    from tasks.recording import StageRunner
    from tasks.stage_inputs import RESOLVERS

    worker_settings = Settings(data_dir=settings.data_dir, database_url=settings.database_url, heartbeat_s=0.25,
                               redis_url="redis://127.0.0.1:1/0", HEARTMULA_CKPT=tiny_checkpoint_dir, device="cpu")
    job_id = _job(settings)
    for stage in ("refine_lyrics", "generate_tags"):
        _set(settings, job_id, stage, 1, status=StageStatus.SUCCEEDED, outputs={"lyrics": "la la", "tags_string": "ska"})
    _set(settings, job_id, "generate_tokens", 1, status=StageStatus.RUNNING, started_at=utcnow())
    ended: list[BaseException] = []

    def follow() -> None:
        try:
            StageRunner("decode_audio", RESOLVERS["decode_audio"], decode_audio).run(
                job_id, 1, settings=worker_settings, continue_chain=True)
        except BaseException as exc:  # noqa: BLE001 - the runner ends a cancelled attempt with Ignore
            ended.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    wait = dt.datetime.now() + dt.timedelta(seconds=60)
    while not _following(settings, job_id) and dt.datetime.now() < wait:
        time.sleep(0.05)
    with session_scope(settings.resolved_database_url) as session:
        row = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "generate_tokens"))
        row.status = StageStatus.FAILED
        end_job(session, session.get_one(Job, job_id), JobStatus.FAILED, "generate_tokens", "ValueError", "boom",
                utcnow())
    follower.join(60)
    assert not follower.is_alive() and isinstance(ended[0], Ignore)
    assert _status(settings, job_id, "decode_audio") == ["cancelled"]
    with session_scope(settings.resolved_database_url) as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.failed_stage, job.error_type) == ("failed", "generate_tokens", "ValueError")


def test_a_follower_reads_only_the_newest_token_attempts_checkpoints(settings):
    job_id = _job(settings)
    _set(settings, job_id, "generate_tokens", 1, status=StageStatus.LOST,
         progress={"checkpoint": {"done": 90, "tokens": {"sha256": "b" * 64}}})
    with session_scope(settings.resolved_database_url) as session:
        add_attempts(session, job_id, "generate_tokens", requested_by="test")
        seen = followed_progress(session, job_id, "generate_tokens")
    assert seen.checkpoint is None and seen.checkpoint_attempt is None  # attempt 2 has none yet: wait for it
    point = {"done": 49, "tokens": {"sha256": "c" * 64}}
    _set(settings, job_id, "generate_tokens", 2, status=StageStatus.RUNNING, progress={"checkpoint": point})
    with session_scope(settings.resolved_database_url) as session:
        seen = followed_progress(session, job_id, "generate_tokens")
    assert (seen.checkpoint, seen.checkpoint_attempt) == (point, 2)


def test_a_threads_mode_process_takes_no_more_token_tasks_than_it_has_engine_slots(monkeypatch):
    from types import SimpleNamespace

    from gpu_worker.worker import batching

    monkeypatch.setattr(batching, "_threads_mode", lambda: True)
    requests = [SimpleNamespace(id=f"task-{i}", retries=0) for i in range(3)]
    assert batching.admit_token_task(requests[0], slots=2) and batching.admit_token_task(requests[1], slots=2)
    assert not batching.admit_token_task(requests[2], slots=2)  # it waits in the broker, not on a pool thread
    batching._task_postrun(task=SimpleNamespace(name="songpipe.generate_tokens", request=requests[0]))
    retried = SimpleNamespace(id="task-2", retries=1)  # the same task, delivered again after its deferral
    assert batching.admit_token_task(retried, slots=2)
    for request in (requests[1], retried):
        batching._task_postrun(task=SimpleNamespace(name="songpipe.generate_tokens", request=request))
    monkeypatch.setattr(batching, "_threads_mode", lambda: False)
    assert all(batching.admit_token_task(r, slots=0) for r in requests)  # prefork: one task per child anyway


def test_a_deferred_token_delivery_waits_in_the_broker_only_while_its_attempt_can_be_claimed(settings):
    """A token task deferred for a free engine slot is retried from the broker while its row is queued in an
    active job; once the job is cancelled it goes to the claim instead, which drops it (no endless cycling)."""
    from gpu_worker.worker.stages import generate_tokens_task
    from tasks.recording import waits_in_broker

    runner, request = generate_tokens_task.runner, object()
    job_id = _job(settings)
    assert waits_in_broker(lambda _: False, runner, request, job_id, 1, settings)  # no free slot: back to the broker
    assert not waits_in_broker(lambda _: True, runner, request, job_id, 1, settings)  # admitted: it runs
    with session_scope(settings.resolved_database_url) as session:
        from db.models import Job, JobStatus

        session.get_one(Job, job_id).status = JobStatus.CANCELLED
    assert not waits_in_broker(lambda _: False, runner, request, job_id, 1, settings)  # to the claim, dropped
    other = _job(settings)
    _set(settings, other, "generate_tokens", 1, status=StageStatus.SUPERSEDED)
    assert not runner.claimable(other, 1, settings) and not runner.claimable(other, 2, settings)


def test_a_decode_whose_streamed_windows_were_void_is_recorded_with_the_error_the_stream_reader_skips():
    from gpu_worker.worker.streaming_decode import StreamTokensChanged
    from tasks.pipeline.stream_windows import VOID_WINDOWS_ERROR
    from tasks.recording import describe_error, is_transient

    error = StreamTokensChanged("window 1 differs")
    assert describe_error(error)[0] == VOID_WINDOWS_ERROR and is_transient(error)
