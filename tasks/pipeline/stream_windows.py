"""The read side of streamed decoding (docs/streaming.md): which decode attempt a listener follows,
its recorded windows, and how much of the song is final so far.

One home for the query, asked by the stream endpoint (every poll) and the public job view. The rows
themselves are written by the decode stage; nothing here writes.

Which decode attempt to follow:
1. a done (succeeded or reused) decode attempt newer than every attempt with rows: its final WAV is
   the song, and any rows it lacks (a song decoded the old way, a reused decode) come from that WAV;
2. else the newest attempt that has rows, whatever its status: its rows are final samples even when
   it was lost later, and the next attempt rewrites the same bytes from window 0;
3. else the newest running attempt (nothing to hear yet), or none.
An attempt that ended because its streamed windows were not the finished song's (VOID_WINDOWS_ERROR)
counts as having no rows.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, StageRun, StreamWindow
from db.status import JOB_TERMINAL, STAGE_DONE, StageStatus
from tasks.pipeline.attempts import latest_runs

SAMPLE_RATE = 48_000  # stereo sample frames per second of every song (DecodeAudioOutput.sample_rate)
CHANNELS = 2
BYTES_PER_SAMPLE = 2 * CHANNELS  # one 16-bit little-endian sample per channel, interleaved
# one 12.5 Hz code frame decodes to this many samples (gpu_worker.model.heartcodec.SAMPLES_PER_FRAME;
# not imported: tasks does not load the model package)
SAMPLES_PER_FRAME = 3840
DECODE_STAGE, TOKENS_STAGE = "decode_audio", "generate_tokens"
# the error type a decode attempt is recorded with when the windows it streamed are not the finished song's
# (tasks.recording.describe_error of gpu_worker.worker.streaming_decode.StreamTokensChanged): its rows are
# never followed
VOID_WINDOWS_ERROR = "gpu_worker.worker.streaming_decode.StreamTokensChanged"


@dataclass(frozen=True)
class WindowPart:
    """One recorded window, as plain values (safe to use after the session is closed)."""

    window: int
    sample_start: int
    sample_end: int  # exclusive
    pcm_sha256: str
    decode_s: float
    finished_at: dt.datetime | None

    @property
    def samples(self) -> int:
        return self.sample_end - self.sample_start


@dataclass(frozen=True)
class StreamState:
    job_id: str
    job_status: str
    attempt: int | None  # the decode_audio attempt followed; None: no decode has started or written rows
    attempt_status: str | None
    windows: tuple[WindowPart, ...]  # the followed attempt's rows in window order, contiguous from sample 0
    succeeded: bool  # the followed attempt is done: every sample of the song is final
    wav_sha256: str | None  # the done attempt's WAV artifact: serves samples its rows do not cover
    total_samples: int | None  # the decode output's count, else the finished token stage's frames x 3840
    frames_generated: int  # the latest token attempt's recorded progress (frames)

    @property
    def window_samples(self) -> int:
        """Samples the followed attempt's rows hold (from sample 0)."""
        return self.windows[-1].sample_end if self.windows else 0

    @property
    def samples_final(self) -> int:
        """Samples a listener may hear now: all of them once the decode succeeded."""
        if self.succeeded and self.total_samples is not None:
            return max(self.total_samples, self.window_samples)
        return self.window_samples

    @property
    def job_ended(self) -> bool:
        return self.job_status in JOB_TERMINAL

    @property
    def complete(self) -> bool:
        """Nothing more will ever be added to what the followed attempt offers a listener now."""
        return self.succeeded or self.job_ended

    @property
    def status(self) -> str:
        """waiting (nothing final yet) | streaming (some final, more to come) | finished (the whole
        song is final) | ended (the job ended without a decoded song: what was final stays final)."""
        if self.succeeded:
            return "finished"
        if self.job_ended:
            return "ended"
        return "streaming" if self.windows else "waiting"


def _contiguous(rows: list[StreamWindow]) -> tuple[WindowPart, ...]:
    """Rows in window order up to the first gap: a reader may see window w+1 before w is committed."""
    parts: list[WindowPart] = []
    expected_start, expected_window = 0, 0
    for row in sorted(rows, key=lambda r: r.window):
        if row.window != expected_window or row.sample_start != expected_start or row.sample_end <= row.sample_start:
            break
        parts.append(WindowPart(row.window, int(row.sample_start), int(row.sample_end), row.pcm_sha256,
                                float(row.decode_s), row.finished_at))
        expected_start, expected_window = int(row.sample_end), row.window + 1
    return tuple(parts)


def _followed(decode_runs: list[StageRun], attempts_with_rows: set[int]) -> StageRun | None:
    by_attempt = {row.attempt: row for row in decode_runs}
    newest_rows = max(attempts_with_rows, default=None)
    done = [row for row in decode_runs if row.status in STAGE_DONE]
    newest_done = max(done, key=lambda r: r.attempt, default=None)
    if newest_done is not None and (newest_rows is None or newest_done.attempt >= newest_rows):
        return newest_done
    if newest_rows is not None:
        return by_attempt.get(newest_rows)
    running = [row for row in decode_runs if row.status == StageStatus.RUNNING]
    return max(running, key=lambda r: r.attempt, default=None)


def stream_state(session: Session, job_id: str) -> StreamState | None:
    """What a listener of `job_id` can hear now, or None for an unknown job. Three small queries."""
    job_status = session.scalar(select(Job.status).where(Job.id == job_id))
    if job_status is None:
        return None
    runs = list(session.scalars(select(StageRun).where(
        StageRun.job_id == job_id, StageRun.stage.in_((DECODE_STAGE, TOKENS_STAGE)))))
    decode_runs = [row for row in runs if row.stage == DECODE_STAGE]
    void = {row.attempt for row in decode_runs if row.error_type == VOID_WINDOWS_ERROR}
    with_rows = set(session.scalars(select(StreamWindow.attempt).where(StreamWindow.job_id == job_id)
                                    .distinct())) - void
    followed = _followed(decode_runs, with_rows)
    windows: tuple[WindowPart, ...] = ()
    if followed is not None and followed.attempt in with_rows:
        windows = _contiguous(list(session.scalars(select(StreamWindow).where(
            StreamWindow.job_id == job_id, StreamWindow.attempt == followed.attempt))))
    succeeded = followed is not None and followed.status in STAGE_DONE
    outputs = (followed.outputs or {}) if succeeded and followed is not None else {}
    wav_sha256 = (outputs.get("wav") or {}).get("sha256")
    tokens = latest_runs(row for row in runs if row.stage == TOKENS_STAGE).get(TOKENS_STAGE)
    total_samples: int | None = int(outputs["samples"]) if outputs.get("samples") else None
    if total_samples is None and tokens is not None and tokens.status in STAGE_DONE and tokens.outputs:
        total_samples = int(tokens.outputs.get("frames", 0)) * SAMPLES_PER_FRAME or None
    frames_generated = 0
    if tokens is not None:
        if tokens.status in STAGE_DONE and tokens.outputs:
            frames_generated = int(tokens.outputs.get("frames", 0))
        else:
            frames_generated = int((tokens.progress or {}).get("done", 0) or 0)
    return StreamState(
        job_id=job_id, job_status=str(job_status),
        attempt=followed.attempt if followed is not None else None,
        attempt_status=str(followed.status) if followed is not None else None,
        windows=windows, succeeded=succeeded, wav_sha256=wav_sha256 if succeeded else None,
        total_samples=total_samples, frames_generated=frames_generated)


def seconds(samples: int | None) -> float | None:
    return None if samples is None else samples / SAMPLE_RATE
