"""The form and the live song page in a real browser (Debian's Chromium driven by Playwright).

Screenshots go to $SONGPIPE_SCREENSHOTS (e.g. docs/screenshots) only when it is set, so a test run
never writes into the source tree by itself.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, StageRun
from orchestrator.submission import new_job_rows
from tasks.contracts import JobRequest
from tests.stack_fixtures import REPO_ROOT, Stack

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
LYRICS = "[verse]\nde doo doo doo\nde blaa blaa blaa\nis all I want to sing to you"


def screenshot(page, name: str) -> None:
    folder = os.environ.get("SONGPIPE_SCREENSHOTS")
    if folder:
        path = (REPO_ROOT / folder).resolve()
        path.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path / name), full_page=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1100, "height": 1000})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def queued_job(stack: Stack, **request) -> str:
    """Job rows written but no chain sent: the job stays queued whatever the workers do."""
    body = {"lyrics": LYRICS, "tags": "ska", "max_audio_length_ms": 800, **request}
    with session_scope(stack.database_url) as session:
        return new_job_rows(session, JobRequest.model_validate(body), stack.settings, source="form").id


def wait_done(page) -> None:
    page.wait_for_function("['succeeded','failed','cancelled'].includes(document.getElementById('job-status').textContent)",
                           timeout=180_000)


def test_submitting_the_form_shows_the_inputs_every_stage_finish_and_a_player(page, sqlite_stack: Stack):
    page.goto(f"{sqlite_stack.base_url}/")
    page.get_by_label("Lyrics").fill(LYRICS)
    page.get_by_label("Style description").fill("upbeat ska with a brass section")
    page.get_by_label("Tags").fill("ska, upbeat")
    page.get_by_label("Length (seconds)").fill("2")
    page.get_by_label("Seed").fill("8")
    screenshot(page, "form.png")
    page.get_by_role("button", name="Generate song").click()

    page.wait_for_url("**/jobs/*")
    assert page.locator("#job-seed").inner_text().startswith("8")
    assert page.locator("#song-title").inner_text() == "de doo doo doo"
    screenshot(page, "song-running.png")
    page.wait_for_function("document.getElementById('job-status').textContent === 'succeeded'", timeout=180_000)
    stages = page.locator("#stage-rows tr")
    assert stages.count() == 5
    for i in range(5):
        assert stages.nth(i).locator(".badge").inner_text() == "succeeded"
    assert page.locator("#job-tags").inner_text() == "ska,upbeat"
    assert page.locator("#job-style").inner_text() == "upbeat ska with a brass section"
    assert page.locator("#job-length").inner_text() == "2 s"
    assert "temperature" in page.locator("#job-params").inner_text()
    assert page.locator("#lyrics-given").inner_text().startswith("[verse]")
    assert "de doo doo doo" in page.locator("#lyrics-refined").inner_text()
    assert page.locator("#overall-progress").get_attribute("value") == "100"
    assert "noise, not music" in page.locator(".notice").inner_text()
    assert page.locator("#cancel-form").count() == 0 or not page.locator("#cancel-form").is_visible()
    audio = page.locator("audio#audio")
    assert audio.get_attribute("src").endswith("/audio")
    page.wait_for_function("document.getElementById('audio').readyState >= 1", timeout=30_000)  # the MP3 loads
    screenshot(page, "song-done.png")


def test_token_stage_shows_frame_progress(page, sqlite_stack: Stack):
    submitted = sqlite_stack.submit({"lyrics": LYRICS, "tags": "ska", "seed": 8, "max_audio_length_ms": 2000})
    sqlite_stack.wait_for_job(submitted["id"])
    page.goto(f"{sqlite_stack.base_url}/jobs/{submitted['id']}")
    row = page.locator("#stage-rows tr[data-stage='generate_tokens']")
    assert "25/25 frames" in row.locator(".progress-cell").inner_text()


def test_another_take_prefills_the_same_inputs_with_a_new_seed(page, sqlite_stack: Stack):
    original = sqlite_stack.submit({"lyrics": LYRICS, "tags": "ska", "style": "brass", "seed": 11,
                                    "max_audio_length_ms": 800, "temperature": 0.9})
    page.goto(f"{sqlite_stack.base_url}/jobs/{original['id']}")
    page.locator("#another-take").click()
    page.wait_for_url("**/?from=*")
    assert page.get_by_label("Lyrics").input_value() == LYRICS
    assert page.get_by_label("Tags").input_value() == "ska"
    assert page.get_by_label("Style description").input_value() == "brass"
    assert page.get_by_label("Temperature").input_value() == "0.9"
    assert page.get_by_label("Length (seconds)").input_value() == "0.8"
    assert page.get_by_label("Seed").input_value() == ""  # a new seed is drawn
    assert "Another take" in page.locator("#prefilled").inner_text()
    page.get_by_role("button", name="Generate song").click()
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{32}$"))
    take_id = page.url.rsplit("/", 1)[1]
    assert take_id != original["id"]
    take = sqlite_stack.job(take_id)
    assert take["request"]["lyrics"] == LYRICS and take["request"]["temperature"] == 0.9
    assert take["seed_source"] == "drawn" and take["seed"] != 11


def test_edit_and_resubmit_keeps_the_seed_and_takes_the_edit(page, sqlite_stack: Stack):
    original = sqlite_stack.submit({"lyrics": LYRICS, "tags": "ska", "seed": 12, "max_audio_length_ms": 800})
    page.goto(f"{sqlite_stack.base_url}/jobs/{original['id']}")
    page.locator("#edit-resubmit").click()
    page.wait_for_url("**/?from=*")
    assert page.get_by_label("Seed").input_value() == "12"
    page.get_by_label("Tags").fill("ska, brass band")
    page.get_by_role("button", name="Generate song").click()
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{32}$"))
    edited = sqlite_stack.job(page.url.rsplit("/", 1)[1])
    assert edited["id"] != original["id"] and edited["seed"] == 12
    assert edited["request"]["tags"] == ["ska", "brass_band"]  # tags are normalised at validation


def test_cancel_from_the_song_page(page, sqlite_stack: Stack):
    job_id = queued_job(sqlite_stack)
    page.goto(f"{sqlite_stack.base_url}/jobs/{job_id}")
    assert page.locator("#job-status").inner_text() == "queued"
    # nothing has started: the page says what the job waits for (the stack's CPU workers reported ready)
    assert page.locator("#job-waiting").inner_text().startswith("waiting for a free CPU worker")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_url(f"**/jobs/{job_id}")
    # nothing was running: the cancel ends the job at once and its stages show as never run
    page.wait_for_function("document.querySelector('#job-status').innerText === 'cancelled'")
    assert page.get_by_role("button", name="Cancel").count() == 0
    job = sqlite_stack.job(job_id)
    assert job["cancel_requested"] is True and job["status"] == "cancelled"


def test_history_lists_both_songs_of_this_browser(page, sqlite_stack: Stack):
    first = queued_job(sqlite_stack, lyrics="first song of the history\nla")
    second = queued_job(sqlite_stack, lyrics="second song of the history\nla")
    for job_id in (first, second):
        page.goto(f"{sqlite_stack.base_url}/jobs/{job_id}")
        page.locator("#my-songs").wait_for(state="visible")
    page.goto(f"{sqlite_stack.base_url}/")
    items = page.locator("#my-songs-list li")
    items.first.wait_for()
    ids = [items.nth(i).get_attribute("data-job-id") for i in range(items.count())]
    assert ids[:2] == [second, first]  # newest first
    assert page.locator(f"#my-songs-list li[data-job-id='{first}'] a").inner_text() == "first song of the history"
    page.locator(f"#my-songs-list li[data-job-id='{first}'] a").click()
    page.wait_for_url(f"**/jobs/{first}")


def test_every_form_error_is_shown_at_once(page, sqlite_stack: Stack):
    page.goto(f"{sqlite_stack.base_url}/")
    page.get_by_label("Lyrics").fill("   ")
    page.get_by_label("Tags").fill("ska")
    page.get_by_label("Top-k").fill("0")
    page.get_by_label("Temperature").fill("-1")
    page.get_by_label("CFG scale").fill("0")
    page.get_by_label("Length (seconds)").fill("9999")
    page.get_by_label("Seed").fill("x")
    page.get_by_role("button", name="Generate song").click()

    for field in ("lyrics", "top_k", "temperature", "cfg_scale", "length_s", "seed"):
        assert page.locator(f"#{field}-error").is_visible(), field
    assert "Please fix 6 problems" in page.locator("#error-summary").inner_text()
    assert "greater than or equal to 1" in page.locator("#top_k-error").inner_text()
    assert page.get_by_label("Top-k").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Tags").input_value() == "ska"  # the user's values are kept
    assert page.url.endswith("/jobs")  # no redirect: nothing was submitted


def test_unknown_song_gets_a_styled_404(page, sqlite_stack: Stack):
    response = page.goto(f"{sqlite_stack.base_url}/jobs/{'0' * 32}")
    assert response.status == 404
    assert page.locator("h1").inner_text() == "Song not found"
    assert "0" * 32 in page.locator("#error-message").inner_text()
    assert page.locator("header.site .brand").is_visible()  # the site's own page, not the framework's
    assert page.get_by_role("link", name="Make a new song").is_visible()


def test_stages_after_a_failure_show_as_skipped(page, sqlite_stack: Stack):
    job_id = queued_job(sqlite_stack)
    with session_scope(sqlite_stack.database_url) as session:  # the record a token-stage failure leaves
        rows = {row.stage: row for row in session.scalars(select(StageRun).where(StageRun.job_id == job_id))}
        for stage in ("refine_lyrics", "generate_tags"):
            rows[stage].status = "succeeded"
        rows["generate_tokens"].status = "failed"
        rows["generate_tokens"].error_type, rows["generate_tokens"].error_message = "RuntimeError", "injected for the test"
        job = session.get(Job, job_id)
        job.status, job.failed_stage = "failed", "generate_tokens"
        job.error_type, job.error_message = "RuntimeError", "injected for the test"
    page.goto(f"{sqlite_stack.base_url}/jobs/{job_id}")
    page.wait_for_function("document.querySelector(\"#stage-rows tr[data-stage='encode_audio'] .badge\")"
                           ".textContent === 'skipped'")
    for stage in ("decode_audio", "encode_audio"):
        badge = page.locator(f"#stage-rows tr[data-stage='{stage}'] .badge")
        assert badge.inner_text() == "skipped" and "status-skipped" in badge.get_attribute("class")
    assert page.locator("#stage-rows tr[data-stage='generate_tokens'] .badge").inner_text() == "failed"
    assert "injected for the test" in page.locator("#job-error").inner_text()
