"""The decode stage while its token stage still generates: each codec window decoded as its frames exist.

docs/streaming.md has the design. The decode follows the token stage's recorded checkpoints (SQL and the
artifact store, never the engine's memory), decodes window w once a checkpoint holds one frame more than
the window needs (so it cannot be the song's last, wrapped-around window), and records the samples that
window made final as a `pcm` artifact and a `stream_windows` row. When the token stage has succeeded it
decodes the remaining windows from the finished grid, checks that every streamed window's frames are the
finished grid's, and writes the WAV from the very samples it streamed.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from db.engine import session_scope
from db.models import utcnow
from db.status import JOB_ACTIVE
from gpu_worker.model.heartcodec import SAMPLE_RATE, HeartCodec, WindowByWindow, WindowGeometry, plan_windows
from gpu_worker.model.token_validation import validate_codes
from tasks.audio_files import pcm16_bytes
from tasks.contracts import ArtifactRef, DecodeAudioInput
from tasks.pipeline.attempts import followed_progress
from tasks.recording import JobCancelled, StageContext

POLL_S = 0.2  # how often the decode looks for the token stage's next checkpoint
FIRST_WINDOW_POLL_S = 0.05  # ... while the song has no sound yet: each look is one indexed query
FOLLOWED_STAGE = "generate_tokens"


class StreamTokensChanged(RuntimeError):
    """A streamed window's frames differ from the finished grid (the token stage was re-run from scratch with
    other numbers): this attempt's windows are void; a new attempt decodes the finished grid."""

    transient = True


@dataclass
class StreamedSong:
    """The decode's result: the song's samples on the CPU and the finished token grid it decoded."""

    audio: torch.Tensor  # float32 [2, T*3840]
    tokens: ArtifactRef
    frames: int
    windows_streamed: int  # windows decoded before the token stage had finished


def slice_sha256(codes: np.ndarray) -> str:
    """The digest of a window's [8, n] frames as int16 (the token artifact's element type)."""
    return hashlib.sha256(np.ascontiguousarray(codes, dtype="<i2").tobytes()).hexdigest()


class _Grids:
    """Token grids read from the store, kept while the next windows still need them."""

    def __init__(self, ctx: StageContext, load: Callable[[bytes], np.ndarray]):
        self.ctx, self.load = ctx, load
        self._sha: str | None = None
        self._grid: np.ndarray | None = None

    def get(self, ref: dict) -> np.ndarray:
        if ref["sha256"] != self._sha:
            grid = self.load(self.ctx.store.get(ref["sha256"], "tokens"))
            validate_codes(grid)  # on the host, before the codec sees a single id
            self._sha, self._grid = ref["sha256"], grid
        assert self._grid is not None
        return self._grid


def decode_following(inp: DecodeAudioInput, ctx: StageContext, codec: HeartCodec, *,
                     solve_window: Callable[..., torch.Tensor], decode_latents: Callable[[torch.Tensor], torch.Tensor],
                     generator: torch.Generator, codec_turn: Callable[[int, float | None], AbstractContextManager],
                     load_tokens: Callable[[bytes], np.ndarray]) -> StreamedSong:
    """Follow the token stage named by `inp.follow` and decode the song window by window."""
    assert inp.follow is not None
    geometry: WindowGeometry = codec.config.windows
    song = WindowByWindow(geometry, generator, inp.follow.max_frames, device=codec.device,
                          solve_window=solve_window, decode_latents=decode_latents)
    grids = _Grids(ctx, load_tokens)
    streamed: list[str] = []  # each streamed window's frames digest, checked against the finished grid
    heard: float | None = None  # when the first window's samples were recorded: a listener may play from then
    expected = plan_windows(inp.follow.max_frames, geometry).num_windows
    while True:
        with session_scope(ctx.database_url) as session:
            seen = followed_progress(session, ctx.job_id, FOLLOWED_STAGE)
        if seen.outputs is not None:
            break
        if seen.job_status not in JOB_ACTIVE:
            raise JobCancelled(f"job {ctx.job_id} ended ({seen.job_status}) before its token stage finished")
        point = seen.checkpoint
        w = song.windows
        if point is not None and int(point["done"]) > geometry.frames_needed(w):
            grid = grids.get(point["tokens"])
            window = grid[:, geometry.window(w)]
            assert seen.checkpoint_attempt is not None
            heard = _add_window(ctx, song, window, codec.device, codec_turn, heard,
                                tokens_attempt=seen.checkpoint_attempt)
            streamed.append(slice_sha256(window))
            continue
        ctx.progress(w, expected, "windows")  # heartbeat, cancel check, fault hooks
        time.sleep(POLL_S if w else FIRST_WINDOW_POLL_S)

    outputs = seen.outputs
    tokens = ArtifactRef.model_validate(outputs["tokens"])
    codes = grids.get(outputs["tokens"])
    frames = int(outputs["frames"])
    if codes.shape[1] != frames:
        raise ValueError(f"token artifact holds {codes.shape[1]} frames, the record says {frames}")
    plan = plan_windows(frames, geometry)
    padded = codes[:, np.arange(plan.padded_frames) % plan.frames]
    for w, digest in enumerate(streamed):
        if slice_sha256(padded[:, plan.window(w)]) != digest:
            raise StreamTokensChanged(f"window {w} was streamed from frames that differ from the finished token "
                                      f"grid {tokens.sha256[:12]}; a new attempt decodes the finished grid")
    assert seen.outputs_attempt is not None
    for w in range(song.windows, plan.num_windows):
        last = w == plan.num_windows - 1
        heard = _add_window(ctx, song, padded[:, plan.window(w)], codec.device, codec_turn, heard,
                            tokens_attempt=seen.outputs_attempt, last=last, end=plan.cropped_samples if last else None)
    return StreamedSong(song.samples(0, plan.cropped_samples), tokens, frames, len(streamed))


def window_due(heard: float | None, start_sample: int) -> float | None:
    """When a listener who started playing as the first window was recorded (`heard`, monotonic) reaches
    `start_sample`, the next window's first sample; None for the first window."""
    return None if heard is None else heard + start_sample / SAMPLE_RATE


def _add_window(ctx: StageContext, song: WindowByWindow, window: np.ndarray, device: torch.device,
                codec_turn: Callable[[int, float | None], AbstractContextManager], heard: float | None, *,
                tokens_attempt: int, last: bool = False, end: int | None = None) -> float:
    """Decode one window, store the samples it made final and record its row. `heard`: when the first window
    was recorded (None: this is it); returns it."""
    w, start_sample = song.windows, song.final_samples
    started_at, t0 = utcnow(), time.monotonic()
    with codec_turn(w, window_due(heard, start_sample)):  # the lowest window index goes first
        turn, turn_cpu = time.monotonic(), time.thread_time()  # after waiting for the codec (another song's window)
        song.add(torch.from_numpy(window.astype(np.int64)).to(device), last=last)
    decoded, decode_cpu = time.monotonic(), time.thread_time() - turn_cpu
    end_sample = song.final_samples if end is None else end
    pcm = ctx.put_artifact(pcm16_bytes(song.samples(start_sample, end_sample).numpy()), "pcm")
    g = song.geometry
    ctx.record_stream_window(window=w, frame_start=g.window(w).start, frame_end=g.window(w).stop,
                             tokens_sha256=slice_sha256(window), tokens_attempt=tokens_attempt,
                             pcm_sha256=pcm.sha256, sample_start=start_sample, sample_end=end_sample,
                             started_at=started_at, finished_at=utcnow(), decode_s=round(decoded - t0, 4))
    # where a window's time went, for the record (bench/stream_latency.py reads it). decode_cpu_s is this
    # thread's CPU time while decoding: far below decode_s means it was blocked (in the driver, or on the
    # GIL); waiting for the GPU itself counts as CPU time, because a stream sync spins
    ctx.environment_extra.setdefault("stream_window_timings", []).append(
        {"window": w, "wait_s": round(turn - t0, 4), "decode_s": round(decoded - turn, 4),
         "decode_cpu_s": round(decode_cpu, 4), "store_and_record_s": round(time.monotonic() - decoded, 4)})
    ctx.progress(song.windows, max(song.windows, 1), "windows", force=True)
    return time.monotonic() if heard is None else heard
