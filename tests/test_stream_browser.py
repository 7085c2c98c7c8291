"""The song page's stream player in a real browser (Debian's Chromium driven by Playwright, issue 15).

First against the web tier on real SQL with a real store: the test records decode windows (rows and
pcm artifacts, as the decode stage does) while the page plays them. Then against `songpipe run` (the
supervised stack, real workers, a tiny checkpoint with small codec windows as in
tests/test_streaming_stack.py): the page starts playing before the token stage has finished. The test
presses "Listen" as a person would (no autoplay flag: the click is the gesture) and reads the player's
state from #stream-player's data attributes.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from werkzeug.serving import make_server

from orchestrator.app import create_app
from tasks.settings import Settings
from tests import stack_fixtures, test_web_browser
from tests import test_stream_endpoint as records

pytestmark = pytest.mark.browser
browser, page = test_web_browser.browser, test_web_browser.page  # the same headless Chromium fixtures

RATE = 48_000
WINDOW_S = 1.0
WINDOW = int(RATE * WINDOW_S)




@pytest.fixture(scope="module")
def web(tmp_path_factory, tiny_checkpoint_dir) -> Iterator[tuple[str, Settings]]:
    workdir = tmp_path_factory.mktemp("stream-web")
    with stack_fixtures.database("sqlite", workdir / "db") as url:
        settings = Settings(data_dir=workdir / "data", database_url=url, checkpoint_dir=tiny_checkpoint_dir)
        app = create_app(settings)
        app.config.update(SONGPIPE_STREAM_POLL_S=0.05)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.port}", settings
        finally:
            server.shutdown()


def add_window(settings: Settings, job_id: str, window: int, song: bytes) -> None:
    records.add_window(settings, job_id, 1, window, song, window_samples=WINDOW)


def tone(seconds: float) -> bytes:
    """A quiet 440 Hz tone as 16-bit stereo PCM: the song's final samples."""
    t = np.arange(int(seconds * RATE)) / RATE
    mono = (0.1 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    return np.repeat(mono[:, None], 2, axis=1).tobytes()


def player(page, name: str) -> str:
    return page.locator("#stream-player").get_attribute(f"data-{name}")


RECORD_STATES = """() => {
  const box = document.getElementById('stream-player');
  window.streamStates = [box.dataset.streamState];
  window.streamStateTimes = [Date.now()];
  new MutationObserver(() => {
    const s = box.dataset.streamState;
    if (window.streamStates[window.streamStates.length - 1] !== s) {
      window.streamStates.push(s);
      window.streamStateTimes.push(Date.now());
    }
  }).observe(box, {attributes: true, attributeFilter: ['data-stream-state']});
}"""


def test_the_page_plays_the_stream_while_windows_are_still_being_recorded(page, web):
    base_url, settings = web
    windows = 4
    song = tone(windows * WINDOW_S)
    job_id = records.new_job(settings)
    add_window(settings, job_id, 0, song)
    page.goto(f"{base_url}/jobs/{job_id}")
    assert player(page, "stream-state") == "idle"
    page.evaluate(RECORD_STATES)
    page.get_by_role("button", name="Listen").click()
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'playing'",
                           timeout=15_000)

    played_while_recording = []
    for window in range(1, windows):
        time.sleep(WINDOW_S * 0.8)  # a little faster than real time: the player never runs dry
        played_while_recording.append(float(player(page, "played-seconds")))
        add_window(settings, job_id, window, song)
    assert played_while_recording[-1] > played_while_recording[0] + 0.5, played_while_recording
    assert player(page, "stream-state") == "playing"  # more rows were still being added
    records.finish(settings, job_id, 1, song)

    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'ended'",
                           timeout=30_000)
    assert int(player(page, "received-bytes")) == len(song)
    assert float(player(page, "played-seconds")) == pytest.approx(windows * WINDOW_S, abs=0.05)
    assert page.evaluate("window.streamStates")[:3] == ["idle", "buffering", "playing"]
    assert page.evaluate("window.streamStates")[-1] == "ended"
    assert float(page.locator("#stream-decoded").inner_text()) == pytest.approx(windows * WINDOW_S)


def test_the_player_waits_for_a_slow_window_and_resumes_by_itself(page, web):
    base_url, settings = web
    song = tone(2 * WINDOW_S)
    job_id = records.new_job(settings)
    add_window(settings, job_id, 0, song)
    page.goto(f"{base_url}/jobs/{job_id}")
    page.evaluate(RECORD_STATES)
    page.get_by_role("button", name="Listen").click()
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'playing'")
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'buffering'",
                           timeout=10_000)  # window 0 played out; window 1 is not recorded yet
    assert "Waiting for the next part" in page.locator("#stream-message").inner_text()
    add_window(settings, job_id, 1, song)
    records.finish(settings, job_id, 1, song)
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'ended'",
                           timeout=30_000)
    assert page.evaluate("window.streamStates") == ["idle", "buffering", "playing", "buffering", "playing", "ended"]
    assert float(player(page, "played-seconds")) == pytest.approx(2 * WINDOW_S, abs=0.05)


def test_a_failed_job_ends_the_player_with_what_was_final(page, web):
    base_url, settings = web
    song = tone(2 * WINDOW_S)
    job_id = records.new_job(settings)
    add_window(settings, job_id, 0, song)
    page.goto(f"{base_url}/jobs/{job_id}")
    page.get_by_role("button", name="Listen").click()
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'playing'")
    records.set_job(settings, job_id, "failed")
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'ended'",
                           timeout=30_000)
    assert int(player(page, "received-bytes")) == WINDOW * 4


# -- the real stack ---------------------------------------------------------------------------------

STREAM_ENV = {"SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_TOKEN_CHECKPOINT_FRAMES": "16"}
BODY = {"lyrics": "de doo doo doo\nde blaa blaa blaa", "seed": 4242, "max_audio_length_ms": 10_240,
        "tags": ["ska", "songpipe-fault-slow-60"],  # a frame step every 60 ms: 128 frames take about 7.7 s
        "output_format": "wav"}


@pytest.fixture(scope="module")
def streaming_stack(tmp_path_factory):
    from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint
    from tests.supervised_stack import supervised_stack

    # windows of 48 frames every 40: the 128-frame tiny song spans 3 windows (tests/test_streaming_stack.py)
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-windows", codec_windows=(48, 40))
    with supervised_stack(tmp_path_factory.mktemp("streaming-browser"), checkpoint, STREAM_ENV) as running:
        yield running


@pytest.mark.integration
def test_on_the_real_stack_the_page_plays_before_the_token_stage_has_finished(page, streaming_stack):
    job_id = streaming_stack.submit(BODY)
    page.goto(f"{streaming_stack.base_url}/jobs/{job_id}")
    page.evaluate(RECORD_STATES)
    page.get_by_role("button", name="Listen").click()
    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'playing'",
                           timeout=180_000)
    playing_at = page.evaluate("window.streamStateTimes[window.streamStates.indexOf('playing')]") / 1000
    view = streaming_stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", view.get("error_message")
    tokens = next(s for s in view["stages"] if s["stage"] == "generate_tokens" and s["status"] == "succeeded")
    decode = next(s for s in view["stages"] if s["stage"] == "decode_audio" and s["status"] == "succeeded")
    finished_at = dt.datetime.fromisoformat(tokens["finished_at"]).timestamp()
    assert playing_at < finished_at, f"playing at {playing_at}, the token stage finished at {finished_at}"

    page.wait_for_function("document.getElementById('stream-player').dataset.streamState === 'ended'",
                           timeout=60_000)
    samples = decode["outputs"]["samples"]
    assert int(player(page, "received-bytes")) == samples * 4  # every sample of the song, none twice
    assert float(player(page, "played-seconds")) == pytest.approx(samples / RATE, abs=0.05)
    assert view["stream"]["status"] == "finished" and view["stream"]["windows"] == 3
