"""The form and the live job page in a real browser (Debian's Chromium driven by Playwright).

Also writes docs/screenshots/form.png and docs/screenshots/job.png from the pages it visits.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack_fixtures import REPO_ROOT, Stack

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
LYRICS = "[verse]\nde doo doo doo\nde blaa blaa blaa\nis all I want to sing to you"


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
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def test_submitting_the_form_shows_every_stage_finish_and_a_player(page, sqlite_stack: Stack):
    page.goto(f"{sqlite_stack.base_url}/")
    page.get_by_label("Lyrics").fill(LYRICS)
    page.get_by_label("Tags").fill("ska, upbeat")
    page.get_by_label("Length (seconds)").fill("2")
    page.get_by_label("Seed").fill("8")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "form.png"), full_page=True)
    page.get_by_role("button", name="Generate song").click()

    page.wait_for_url("**/jobs/*")
    assert page.locator("#job-seed").inner_text().startswith("8")
    page.wait_for_function("document.getElementById('job-status').textContent === 'succeeded'", timeout=120_000)
    stages = page.locator("#stage-rows tr")
    assert stages.count() == 5
    for i in range(5):
        assert stages.nth(i).locator(".badge").inner_text() == "succeeded"
    assert page.locator("#job-tags").inner_text() == "ska,upbeat"
    assert "noise, not music" in page.locator(".notice").inner_text()
    audio = page.locator("audio#audio")
    assert audio.get_attribute("src").endswith("/audio")
    page.wait_for_function("document.getElementById('audio').readyState >= 1", timeout=30_000)  # the MP3 loads
    page.screenshot(path=str(SCREENSHOTS / "job.png"), full_page=True)


def test_token_stage_shows_frame_progress(page, sqlite_stack: Stack):
    submitted = sqlite_stack.submit({"lyrics": LYRICS, "tags": "ska", "seed": 8, "max_audio_length_ms": 2000})
    sqlite_stack.wait_for_job(submitted["id"])
    page.goto(f"{sqlite_stack.base_url}/jobs/{submitted['id']}")
    row = page.locator("#stage-rows tr[data-stage='generate_tokens']")
    assert "25/25 frames" in row.locator(".progress-cell").inner_text()


def test_validation_error_is_shown_next_to_its_field(page, sqlite_stack: Stack):
    page.goto(f"{sqlite_stack.base_url}/")
    page.get_by_label("Lyrics").fill("la la la")
    page.get_by_label("Tags").fill("ska")
    page.get_by_label("Top-k").fill("0")
    page.get_by_role("button", name="Generate song").click()

    error = page.locator("#top_k-error")
    assert "greater than or equal to 1" in error.inner_text()
    assert page.get_by_label("Top-k").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Lyrics").input_value() == "la la la"  # the user's values are kept
    assert page.url.endswith("/jobs")  # no redirect: nothing was submitted
