"""`GET /api/jobs/<id>/stream`: the song as one chunked WAV while it is being decoded (docs/streaming.md).

The body is a 44-byte WAV header (48 kHz, 2 channels, 16-bit, RIFF and data sizes 0xFFFFFFFF: length
unknown), then the final samples in order, as the decode stage records them: each `stream_windows`
row's pcm artifact, read from the store, never from the GPU worker. The response follows one decode
attempt (tasks.pipeline.stream_windows) and counts the samples it has sent, so when a newer attempt
takes over (its rows start at window 0 again, same bytes) it continues at that sample, with no sample
twice. It ends when the followed attempt has succeeded and every sample was sent, or when the job
ended without that (failed, cancelled): a listener keeps what was final. A done decode attempt
without rows (a song decoded before streaming existed, a decode reused from another job) supplies
its samples from its WAV artifact's data chunk, after the same header.

`?start=N` begins at sample N (the player reconnects with it after a dropped connection).

Each stream holds one server thread for the length of the song, so a process serves at most
`web_threads - 2` streams at once (at least one) and answers 503 with Retry-After beyond that; the
other threads stay free for pages and polls. No SQL session is open while the response waits: each
poll (every POLL_S) opens its own. A stream that waits longer than IDLE_LIMIT_S for its next sample
ends (the listener can reconnect with `start`).
"""
from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator

from flask import Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import DBAPIError

from db.engine import session_scope
from orchestrator.job_views import is_job_id
from orchestrator.request_parsing import error, error_body
from orchestrator.schemas import Errors
from tasks.pipeline.stream_windows import BYTES_PER_SAMPLE, CHANNELS, SAMPLE_RATE, StreamState, stream_state
from tasks.settings import Settings
from tasks.storage import ArtifactIntegrityError, ArtifactStore, open_store

log = logging.getLogger(__name__)

POLL_S = 0.2
IDLE_LIMIT_S = 600.0  # a stream that waits this long for its next window (a stuck or queued job) ends
RETRY_AFTER_S = 5
SLOTS_KEY = "songpipe_stream_slots"
UNKNOWN_SIZE = 0xFFFFFFFF
WAV_HEAD_PROBE_BYTES = 4096  # our WAVs' data chunk starts at byte 44; other writers add a few chunks


def wav_stream_header() -> bytes:
    """A canonical 44-byte PCM WAV header whose RIFF and data sizes say "unknown" (0xFFFFFFFF)."""
    block_align = CHANNELS * 2
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", UNKNOWN_SIZE, b"WAVE", b"fmt ", 16, 1, CHANNELS,
                       SAMPLE_RATE, SAMPLE_RATE * block_align, block_align, 16, b"data", UNKNOWN_SIZE)


class StreamBroken(RuntimeError):
    """A recorded artifact cannot be served as recorded: the stream ends here."""


def _wav_data_chunk(store: ArtifactStore, sha256: str) -> tuple[int, int]:
    """(offset, length) of the data chunk of a stored WAV."""
    with store.open(sha256, 0, WAV_HEAD_PROBE_BYTES, kind="wav") as stream:
        head = stream.read()
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise StreamBroken(f"wav artifact {sha256} is not a RIFF/WAVE file")
    position = 12
    while position + 8 <= len(head):
        chunk_id, size = struct.unpack_from("<4sI", head, position)
        if chunk_id == b"data":
            return position + 8, size
        position += 8 + size + (size & 1)
    raise StreamBroken(f"wav artifact {sha256}: no data chunk in its first {WAV_HEAD_PROBE_BYTES} bytes")


def _wav_samples(store: ArtifactStore, sha256: str, from_sample: int) -> Iterator[bytes]:
    """The WAV's PCM from `from_sample` on, streamed (a ranged read: a song may be 46 MB)."""
    offset, length = _wav_data_chunk(store, sha256)
    skip = from_sample * BYTES_PER_SAMPLE
    if skip >= length:
        return
    with store.open(sha256, offset + skip, length - skip, kind="wav") as stream:
        yield from stream


def _window_bytes(store: ArtifactStore, part_sha256: str, samples: int) -> bytes:
    data = store.get(part_sha256, kind="pcm")  # verified: what is heard is what the record holds
    if len(data) != samples * BYTES_PER_SAMPLE:
        raise StreamBroken(f"pcm artifact {part_sha256} holds {len(data)} bytes, its row says {samples} samples")
    return data


def stream_body(load: Callable[[], StreamState | None], store: ArtifactStore, start: int = 0, *,
                poll_s: float = POLL_S, idle_limit_s: float = IDLE_LIMIT_S,
                first: StreamState | None = None) -> Iterator[bytes]:
    """The response body: header, then samples [start, ...) as they become final (see the module doc).

    `load` reads the current state in a session of its own; it is called between sleeps, never
    holding a session across one.
    """
    yield wav_stream_header()
    served = start  # the next sample to send, whichever attempt supplies it
    sent: dict[tuple[int, int], str] = {}  # (sample_start, sample_end) -> pcm sha256 of each window sent
    state = first if first is not None else load()
    last_sent = time.monotonic()
    try:
        while state is not None:
            for part in state.windows:
                if part.sample_end <= served:
                    # already sent (by this attempt or an earlier one); a newer attempt's bytes must match
                    earlier = sent.get((part.sample_start, part.sample_end))
                    if earlier is not None and earlier != part.pcm_sha256:
                        log.warning("job %s: decode attempt %s window %d differs from the window already "
                                    "streamed (%s)", state.job_id, state.attempt, part.window, earlier)
                        sent[(part.sample_start, part.sample_end)] = part.pcm_sha256
                    continue
                data = _window_bytes(store, part.pcm_sha256, part.samples)
                yield data[(served - part.sample_start) * BYTES_PER_SAMPLE:]
                sent[(part.sample_start, part.sample_end)] = part.pcm_sha256
                served, last_sent = part.sample_end, time.monotonic()
            if state.succeeded:
                if state.wav_sha256 and (state.total_samples is None or served < state.total_samples):
                    if state.windows:
                        log.warning("job %s: decode attempt %s succeeded with rows up to sample %d of %s; "
                                    "the rest comes from its WAV", state.job_id, state.attempt, served,
                                    state.total_samples)
                    yield from _wav_samples(store, state.wav_sha256, served)
                return
            if state.job_ended:
                return  # failed or cancelled: what was final was sent
            if time.monotonic() - last_sent > idle_limit_s:
                log.info("job %s: stream waited %.0f s for its next window; ending it", state.job_id, idle_limit_s)
                return
            time.sleep(poll_s)
            state = _load_or_keep(load, state)
    except (StreamBroken, ArtifactIntegrityError) as exc:
        # the status line has gone out: ending the body early is the only way left to say it
        log.error("job %s: stream ended at sample %d: %s", state.job_id if state else "?", served, exc)


def _load_or_keep(load: Callable[[], StreamState | None], previous: StreamState) -> StreamState | None:
    """A database that is restarting does not end a stream: it waits (the idle limit bounds it)."""
    try:
        return load()
    except DBAPIError as exc:
        log.warning("job %s: stream poll failed, retrying: %s", previous.job_id, exc)
        return previous


def _errors(errors: list[dict[str, str]], status: int) -> tuple[Response, int]:
    return jsonify(Errors.model_validate(error_body(errors)).model_dump(mode="json")), status


def stream_slots(settings: Settings) -> int:
    """Streams one web process serves at once: all its threads but two, which stay for everything else."""
    return max(1, settings.web_threads - 2)


def _start_sample() -> int | None:
    raw = request.args.get("start", "0")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 15 else None


def get_stream(job_id: str) -> Response | tuple[Response, int]:
    """The view; orchestrator/api.py routes GET /api/jobs/<id>/stream here."""
    settings: Settings = current_app.config["SONGPIPE_SETTINGS"]
    start = _start_sample()
    if start is None:
        return _errors([error("start", "must be a whole number of samples, 0 or more")], 422)

    def load() -> StreamState | None:
        with session_scope(settings.resolved_database_url) as session:
            return stream_state(session, job_id)

    first = load() if is_job_id(job_id) else None
    if first is None:
        return _errors([error("id", f"no job with id {job_id!r}")], 404)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # a proxy must pass chunks on at once
    if request.method == "HEAD":
        return Response(status=200, mimetype="audio/wav", headers=headers)
    slots: threading.BoundedSemaphore = current_app.extensions[SLOTS_KEY]
    if not slots.acquire(blocking=False):
        response, status = _errors(
            [error("stream", "this server is streaming to as many listeners as it can; try again shortly")], 503)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response, status
    config = current_app.config
    body = stream_body(load, open_store(settings), start, first=first,
                       poll_s=config.get("SONGPIPE_STREAM_POLL_S", POLL_S),
                       idle_limit_s=config.get("SONGPIPE_STREAM_IDLE_LIMIT_S", IDLE_LIMIT_S))
    # not direct_passthrough: werkzeug then hands the server our generator itself, and call_on_close never runs
    response = Response(body, mimetype="audio/wav", headers=headers)
    response.call_on_close(slots.release)  # the server closes the body when it ends or the client goes
    return response


def init_app(app: Flask) -> None:
    """The per-process stream slots (SONGPIPE_STREAM_SLOTS in the app config overrides, for tests)."""
    settings: Settings = app.config["SONGPIPE_SETTINGS"]
    app.extensions[SLOTS_KEY] = threading.BoundedSemaphore(app.config.get("SONGPIPE_STREAM_SLOTS")
                                                           or stream_slots(settings))
