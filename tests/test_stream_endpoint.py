"""`GET /api/jobs/<id>/stream` and the public view's `stream` object (issue 15, docs/streaming.md).

Real SQL (SQLite and PostgreSQL) and a real artifact store: each test writes a job, its decode_audio
attempts and `stream_windows` rows with their pcm artifacts the way the decode stage records them,
then reads the stream from an in-process server (a thread, so rows can be added while the response
is read) or from `songpipe web` itself (gunicorn), for what its threads and timeouts do to streams.
"""
from __future__ import annotations

import datetime as dt
import http.client
import io
import struct
import sys
import threading
import time
import urllib.parse
import wave
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from sqlalchemy import select, update
from werkzeug.serving import make_server

from db.engine import session_scope
from db.models import Job, StageRun, StreamWindow
from orchestrator.app import create_app
from orchestrator.stream_serving import wav_stream_header
from orchestrator.submission import new_job_rows
from tasks.contracts import JobRequest
from tasks.pipeline.stream_windows import VOID_WINDOWS_ERROR
from tasks.settings import Settings
from tasks.storage import open_store
from tests import reliability_fixtures as rf
from tests import stack_fixtures

WINDOW = 4_800  # samples per test window (0.1 s): the endpoint does not care how long a window is
HEADER = 44


def song_pcm(samples: int, seed: int = 1) -> bytes:
    """A song's final samples: 16-bit little-endian interleaved stereo."""
    return np.random.default_rng(seed).integers(-32768, 32767, size=(samples, 2), dtype="<i2").tobytes()


def window_bytes(song: bytes, window: int, window_samples: int = WINDOW) -> bytes:
    return song[window * window_samples * 4:(window + 1) * window_samples * 4]


def new_job(settings: Settings, *, status: str = "running", decode_status: str = "running") -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, JobRequest(lyrics="la la la", tags="ska"), settings, source="api")
        job.status = status
        for row in job.stage_runs[:3]:
            row.status = "succeeded" if decode_status != "queued" else row.status
        job.stage_runs[2].outputs = {"frames": 50, "stop_reason": "max_length"} if decode_status != "queued" else None
        job.stage_runs[3].status = decode_status
        return job.id


def add_decode_attempt(settings: Settings, job_id: str, attempt: int, status: str = "running") -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.add(StageRun(job_id=job_id, stage="decode_audio", attempt=attempt, status=status, queue="gpu"))


def set_decode(settings: Settings, job_id: str, attempt: int, status: str, outputs: dict | None = None) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "decode_audio",
                                               StageRun.attempt == attempt).values(status=status, outputs=outputs))


def set_job(settings: Settings, job_id: str, status: str) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.get_one(Job, job_id).status = status


def add_window(settings: Settings, job_id: str, attempt: int, window: int, song: bytes,
               window_samples: int = WINDOW) -> None:
    """What the decode stage records for one window: the pcm artifact first, then its row."""
    data = window_bytes(song, window, window_samples)
    ref = open_store(settings).put(data, "pcm")
    now = dt.datetime.now(dt.UTC)
    with session_scope(settings.resolved_database_url) as session:
        session.add(StreamWindow(job_id=job_id, attempt=attempt, window=window, frame_start=window * 320,
                                 frame_end=window * 320 + 372, tokens_sha256="0" * 64, tokens_attempt=1,
                                 pcm_sha256=ref.sha256, sample_start=window * window_samples,
                                 sample_end=window * window_samples + len(data) // 4, started_at=now, finished_at=now,
                                 decode_s=0.05))


def wav_of(song: bytes) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(48_000)
        handle.writeframes(song)
    return buffer.getvalue()


def finish(settings: Settings, job_id: str, attempt: int, song: bytes) -> None:
    """The decode attempt succeeds with the WAV of the whole song, then the job."""
    ref = open_store(settings).put(wav_of(song), "wav")
    set_decode(settings, job_id, attempt, "succeeded",
               {"wav": ref.model_dump(mode="json"), "samples": len(song) // 4, "sample_rate": 48_000, "channels": 2})
    set_job(settings, job_id, "succeeded")


@contextmanager
def served(settings: Settings, **config) -> Iterator[str]:
    app = create_app(settings)
    app.config.update(SONGPIPE_STREAM_POLL_S=0.05, **config)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def open_stream(base_url: str, path: str) -> http.client.HTTPResponse:
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("GET", path)
    return connection.getresponse()


def read_all(response: http.client.HTTPResponse) -> tuple[bytes, list[tuple[float, int]]]:
    """The body and, per chunk read, (when, bytes so far)."""
    body, arrivals = bytearray(), []
    while chunk := response.read1(65536):
        body += chunk
        arrivals.append((time.monotonic(), len(body)))
    return bytes(body), arrivals


# -- the header and the body --------------------------------------------------------------------

def test_the_header_says_48k_stereo_16_bit_of_unknown_length():
    header = wav_stream_header()
    assert len(header) == HEADER
    assert struct.unpack("<4sI4s4sIHHIIHH4sI", header) == (
        b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 1, 2, 48_000, 48_000 * 4, 4, 16, b"data", 0xFFFFFFFF)


def test_a_finished_stream_is_the_header_then_the_windows_pcm_in_order(app_settings):
    song = song_pcm(3 * WINDOW - 1000)  # the last window is shorter: the song ends inside it
    job_id = new_job(app_settings)
    for window in (2, 0, 1):  # recorded out of order: served in window order
        add_window(app_settings, job_id, 1, window, song)
    finish(app_settings, job_id, 1, song)
    response = create_app(app_settings).test_client().get(f"/api/jobs/{job_id}/stream")
    assert response.status_code == 200 and response.mimetype == "audio/wav"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_data()
    assert body[:HEADER] == wav_stream_header() and body[HEADER:] == song


def test_rows_recorded_while_the_response_is_read_are_served_as_they_come(app_settings):
    song = song_pcm(4 * WINDOW)
    job_id = new_job(app_settings)
    add_window(app_settings, job_id, 1, 0, song)
    recorded: dict[int, float] = {}

    def decode_stage() -> None:
        for window in (1, 2, 3):
            time.sleep(0.6)
            add_window(app_settings, job_id, 1, window, song)
            recorded[window] = time.monotonic()
        time.sleep(0.3)
        finish(app_settings, job_id, 1, song)

    with served(app_settings) as base_url:
        response = open_stream(base_url, f"/api/jobs/{job_id}/stream")
        assert response.status == 200 and response.getheader("Content-Type") == "audio/wav"
        writer = threading.Thread(target=decode_stage)
        writer.start()
        body, arrivals = read_all(response)
        writer.join()
    assert body == wav_stream_header() + song
    # window 0 arrived before window 1 existed, and each later window only after it was recorded
    first_window_at = next(t for t, size in arrivals if size >= HEADER + WINDOW * 4)
    assert first_window_at < recorded[1]
    for window in (1, 2, 3):
        complete_at = next(t for t, size in arrivals if size >= HEADER + (window + 1) * WINDOW * 4)
        assert complete_at >= recorded[window]


def test_a_newer_attempt_continues_at_the_sample_served_so_far_without_repeating_any(app_settings):
    song = song_pcm(4 * WINDOW)
    job_id = new_job(app_settings)
    add_window(app_settings, job_id, 1, 0, song)
    add_window(app_settings, job_id, 1, 1, song)

    def crash_and_retry() -> None:
        time.sleep(0.5)
        set_decode(app_settings, job_id, 1, "lost")  # the GPU worker died after window 1
        add_decode_attempt(app_settings, job_id, 2)
        time.sleep(0.3)
        add_window(app_settings, job_id, 2, 0, song)  # the new attempt starts again at window 0
        time.sleep(0.3)
        for window in (1, 2, 3):
            add_window(app_settings, job_id, 2, window, song)
            time.sleep(0.2)
        finish(app_settings, job_id, 2, song)

    with served(app_settings) as base_url:
        response = open_stream(base_url, f"/api/jobs/{job_id}/stream")
        first = response.read(HEADER + 2 * WINDOW * 4)  # attempt 1's two windows
        retry = threading.Thread(target=crash_and_retry)
        retry.start()
        rest, _ = read_all(response)
        retry.join()
    assert first + rest == wav_stream_header() + song  # windows 2 and 3 from attempt 2, nothing twice


def test_windows_of_an_attempt_that_found_its_tokens_changed_are_not_followed(app_settings):
    song = song_pcm(2 * WINDOW)
    job_id = new_job(app_settings)
    add_window(app_settings, job_id, 1, 0, song_pcm(2 * WINDOW, seed=99))  # streamed from other frames
    with session_scope(app_settings.resolved_database_url) as session:
        session.execute(update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "decode_audio")
                        .values(status="failed", error_type=VOID_WINDOWS_ERROR))
    add_decode_attempt(app_settings, job_id, 2)
    client = create_app(app_settings).test_client()
    view = client.get(f"/api/jobs/{job_id}").get_json()["stream"]
    assert view["status"] == "waiting" and view["attempt"] == 2 and view["windows"] == 0
    add_window(app_settings, job_id, 2, 0, song)
    add_window(app_settings, job_id, 2, 1, song)
    finish(app_settings, job_id, 2, song)
    assert client.get(f"/api/jobs/{job_id}/stream").get_data() == wav_stream_header() + song


def test_start_begins_at_that_sample_inside_a_window(app_settings):
    song = song_pcm(3 * WINDOW)
    job_id = new_job(app_settings)
    for window in range(3):
        add_window(app_settings, job_id, 1, window, song)
    finish(app_settings, job_id, 1, song)
    client = create_app(app_settings).test_client()
    start = WINDOW + 123
    body = client.get(f"/api/jobs/{job_id}/stream?start={start}").get_data()
    assert body == wav_stream_header() + song[start * 4:]
    assert client.get(f"/api/jobs/{job_id}/stream?start={len(song)}").get_data() == wav_stream_header()


def test_a_failed_job_ends_the_stream_with_what_was_final(app_settings):
    song = song_pcm(4 * WINDOW)
    job_id = new_job(app_settings)
    add_window(app_settings, job_id, 1, 0, song)
    add_window(app_settings, job_id, 1, 1, song)

    def fail() -> None:
        time.sleep(0.5)
        set_decode(app_settings, job_id, 1, "failed")
        set_job(app_settings, job_id, "failed")

    with served(app_settings) as base_url:
        response = open_stream(base_url, f"/api/jobs/{job_id}/stream")
        started = time.monotonic()
        threading.Thread(target=fail).start()
        body, _ = read_all(response)
    assert body == wav_stream_header() + song[:2 * WINDOW * 4]
    assert time.monotonic() - started < 10


def test_a_cancelled_job_that_never_decoded_ends_the_stream_after_the_header(app_settings):
    job_id = new_job(app_settings, status="cancelled", decode_status="skipped")
    body = create_app(app_settings).test_client().get(f"/api/jobs/{job_id}/stream").get_data()
    assert body == wav_stream_header()


def test_a_song_decoded_before_streaming_is_served_from_its_wav(app_settings):
    song = song_pcm(2 * WINDOW + 17)
    job_id = new_job(app_settings, status="succeeded", decode_status="succeeded")
    finish(app_settings, job_id, 1, song)  # a WAV and no stream_windows rows
    client = create_app(app_settings).test_client()
    assert client.get(f"/api/jobs/{job_id}/stream").get_data() == wav_stream_header() + song
    assert client.get(f"/api/jobs/{job_id}/stream?start=5").get_data() == wav_stream_header() + song[20:]


def test_a_stream_that_waits_too_long_for_its_next_window_ends(app_settings):
    job_id = new_job(app_settings)
    with served(app_settings, SONGPIPE_STREAM_IDLE_LIMIT_S=0.5) as base_url:
        response = open_stream(base_url, f"/api/jobs/{job_id}/stream")
        started = time.monotonic()
        body, _ = read_all(response)
    assert body == wav_stream_header() and time.monotonic() - started < 5


def test_unknown_jobs_and_bad_starts_answer_json_errors(app_settings):
    client = create_app(app_settings).test_client()
    for path in (f"/api/jobs/{'0' * 32}/stream", "/api/jobs/not-a-job/stream"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.get_json()["errors"][0]["field"] == "id"
    job_id = new_job(app_settings)
    for start in ("-1", "abc", "1.5", ""):
        response = client.get(f"/api/jobs/{job_id}/stream?start={start}")
        assert response.status_code == 422 and response.get_json()["errors"][0]["field"] == "start"


# -- the public job view ------------------------------------------------------------------------

def _conforms(body: dict, settings: Settings) -> None:
    import jsonschema

    from orchestrator.openapi import spec

    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/PublicJobView", **spec(settings)}).validate(body)


def test_the_public_view_says_what_a_listener_can_hear(app_settings):
    song = song_pcm(3 * WINDOW)
    job_id = new_job(app_settings, decode_status="queued")
    client = create_app(app_settings).test_client()

    def stream_view() -> dict:
        body = client.get(f"/api/jobs/{job_id}").get_json()
        _conforms(body, app_settings)
        assert body["links"]["stream"] == body["stream"]["href"] == f"/api/jobs/{job_id}/stream"
        return body["stream"]

    assert stream_view() | {"href": None} == {"status": "waiting", "attempt": None, "windows": 0, "seconds_final": 0.0,
                                              "seconds_total": None, "seconds_generated": 0.0, "decode_s": 0.0,
                                              "href": None}
    with session_scope(app_settings.resolved_database_url) as session:
        tokens = session.scalars(select(StageRun).where(StageRun.job_id == job_id,
                                                        StageRun.stage == "generate_tokens")).one()
        tokens.status, tokens.progress = "running", {"done": 40, "total": 50, "unit": "frames"}
    add_decode_attempt(app_settings, job_id, 2)
    add_window(app_settings, job_id, 2, 0, song)
    add_window(app_settings, job_id, 2, 1, song)
    view = stream_view()
    assert view["status"] == "streaming" and view["attempt"] == 2 and view["windows"] == 2
    assert view["seconds_final"] == pytest.approx(2 * WINDOW / 48_000)
    assert view["seconds_generated"] == pytest.approx(40 * 0.08) and view["seconds_total"] is None
    assert view["decode_s"] == pytest.approx(0.1)
    add_window(app_settings, job_id, 2, 2, song)
    finish(app_settings, job_id, 2, song)
    view = stream_view()
    assert view["status"] == "finished" and view["windows"] == 3
    assert view["seconds_final"] == view["seconds_total"] == pytest.approx(3 * WINDOW / 48_000)

    failed = new_job(app_settings)
    add_window(app_settings, failed, 1, 0, song)
    set_job(app_settings, failed, "failed")
    body = client.get(f"/api/jobs/{failed}").get_json()
    assert body["stream"]["status"] == "ended" and body["stream"]["windows"] == 1


def test_the_openapi_document_describes_the_stream_and_is_valid(app_settings):
    from openapi_spec_validator import validate

    document = create_app(app_settings).test_client().get("/api/openapi.json").get_json()
    validate(document)
    operation = document["paths"]["/api/jobs/{job_id}/stream"]["get"]
    assert set(operation["responses"]) == {"200", "404", "422", "503"}
    assert "audio/wav" in operation["responses"]["200"]["content"]
    assert "stream" in document["components"]["schemas"]["PublicJobView"]["properties"]


# -- under the production server: a stream holds a thread, not the server ------------------------

@pytest.fixture
def gunicorn_web(tmp_path, database_url, tiny_checkpoint_dir, redis_service):
    """`songpipe web` with 1 process of 3 threads (so 1 stream slot) and a 5 s worker timeout."""
    env = stack_fixtures.stack_environment(tmp_path, database_url, redis_service.claim_db(), tiny_checkpoint_dir,
                                           {"SONGPIPE_WEB_WORKERS": "1", "SONGPIPE_WEB_THREADS": "3",
                                            "SONGPIPE_WEB_TIMEOUT_S": "5"})
    stack = stack_fixtures.Stack("stream-web", tmp_path, env, database_url, env["REDIS_URL"], tiny_checkpoint_dir)
    stack.base_url = f"http://127.0.0.1:{stack_fixtures.free_port()}"
    rf.spawn(stack, "web", [sys.executable, "-m", "orchestrator.cli", "web", "--host", "127.0.0.1",
                            "--port", stack.base_url.rsplit(":", 1)[1]])
    try:
        stack_fixtures.wait_until(lambda: stack_fixtures._web_answers(stack.base_url), 60, "web server")
        yield stack
    finally:
        stack_fixtures.kill_group(stack.processes["web"])


def test_under_gunicorn_a_stream_outlives_the_worker_timeout_and_other_requests_still_answer(gunicorn_web):
    settings = gunicorn_web.settings
    song = song_pcm(2 * WINDOW)
    job_id = new_job(settings)
    add_window(settings, job_id, 1, 0, song)
    stream = open_stream(gunicorn_web.base_url, f"/api/jobs/{job_id}/stream")
    assert stream.status == 200
    assert stream.read(HEADER + WINDOW * 4) == wav_stream_header() + window_bytes(song, 0)

    second = open_stream(gunicorn_web.base_url, f"/api/jobs/{job_id}/stream")  # the process's one slot is taken
    assert second.status == 503 and second.getheader("Retry-After") == "5"
    assert second.read().startswith(b'{"errors"')
    started = time.monotonic()
    for _ in range(5):  # pages and polls keep their threads
        status, _, body = gunicorn_web.http("GET", f"/api/jobs/{job_id}")
        assert status == 200
    assert time.monotonic() - started < 5

    time.sleep(6)  # longer than SONGPIPE_WEB_TIMEOUT_S: the streaming worker must not be killed
    add_window(settings, job_id, 1, 1, song)
    finish(settings, job_id, 1, song)
    rest, _ = read_all(stream)
    assert rest == window_bytes(song, 1)
    stack_fixtures.wait_until(lambda: open_stream(gunicorn_web.base_url, f"/api/jobs/{job_id}/stream").status == 200,
                              10, "the stream slot freed")


def test_the_admin_record_lists_every_streamed_window(app_settings):
    settings = app_settings
    from werkzeug.security import generate_password_hash

    from tests.test_admin_auth import FAST_HASH, log_in

    admin = settings.model_copy(update={"admin_password_hash": generate_password_hash("pw-1", method=FAST_HASH)})
    job_id = new_job(settings)
    song = song_pcm(2 * WINDOW + 10)
    for window in range(2):
        add_window(settings, job_id, 1, window, song)
    client = create_app(admin).test_client()
    log_in(client, "admin", "pw-1")
    windows = client.get(f"/admin/api/jobs/{job_id}").get_json()["stream_windows"]
    assert [(w["attempt"], w["window"], w["sample_start"], w["sample_end"]) for w in windows] == \
        [(1, 0, 0, WINDOW), (1, 1, WINDOW, 2 * WINDOW)]
    assert {"tokens_sha256", "tokens_attempt", "pcm_sha256", "frame_start", "frame_end", "decode_s",
            "started_at", "finished_at"} <= set(windows[0])
    page = client.get(f"/admin/jobs/{job_id}").get_data(as_text=True)
    assert 'id="stream-windows"' in page and windows[1]["pcm_sha256"][:12] in page
