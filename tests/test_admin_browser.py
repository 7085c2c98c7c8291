"""The admin dashboard in a real browser against a running stack (workers, Redis, SQL, web server).

One story, in order: an operator logs in, finds a finished job by a word of its lyrics and sees the
tags and seed the token stage received; a job whose token grid holds an out-of-range code fails in
decode_audio and its page shows the frame, codebook, value and traceback; once the cause is fixed,
Retry makes it succeed with both attempts on the page; a re-run as a new job with another seed
shows up on the compare page with the differing seed and different tokens.
"""
from __future__ import annotations

import io
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Artifact, StageRun
from orchestrator import replay
from tasks.artifact_store import open_store
from tasks.contracts import STAGES
from tests.stack_fixtures import Stack

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO_ROOT = Path(__file__).resolve().parent.parent


def screenshot(page, name: str, full_page: bool = False) -> None:
    """Only with SONGPIPE_SCREENSHOTS=docs/screenshots: a test run never writes into the tree by itself."""
    folder = os.environ.get("SONGPIPE_SCREENSHOTS")
    if folder:
        path = (REPO_ROOT / folder).resolve()
        path.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path / name), full_page=full_page)
WORD = f"zanzibar{uuid.uuid4().hex[:6]}"
SONG = {"lyrics": f"de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you {WORD}",
        "tags": "ska, Brass Band", "seed": 4242, "max_audio_length_ms": 1600}


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(20_000)
        page = context.pages[0] if context.pages else context.new_page()
        try:
            yield page
        finally:
            context.close()


def chain_sender(stack: Stack):
    """Send a replay's chain to this stack's broker (the test process has no REDIS_URL of its own)."""
    from celery import Celery, chain

    from tasks.celery_app import configure, queue_for, task_name

    app = Celery("admin-browser-test")
    configure(app, stack.settings)

    def send(job_id: str, attempts: dict[str, int]) -> None:
        chain(*(app.signature(task_name(s), args=(job_id, attempts[s]), immutable=True, queue=queue_for(s))
                for s in STAGES if s in attempts)).apply_async()

    return send


def tokens_row(stack: Stack, job_id: str) -> tuple[int, dict]:
    with session_scope(stack.database_url) as session:
        row = session.scalars(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "generate_tokens")
                              .order_by(StageRun.attempt.desc())).first()
        return row.id, row.outputs


def set_token_outputs(stack: Stack, row_id: int, outputs: dict) -> None:
    with session_scope(stack.database_url) as session:
        row = session.get(StageRun, row_id)
        row.outputs, row.artifacts = outputs, [outputs["tokens"]["sha256"]]


def bad_token_artifact(stack: Stack, good: dict) -> dict:
    """The good token grid with one code the codec does not have (8192 at frame 5, codebook 3)."""
    store = open_store(stack.settings.resolved_artifact_dir)
    codes = np.load(io.BytesIO(store.get(good["sha256"])), allow_pickle=False)
    codes[3, 5] = 8192
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    ref = store.put(buffer.getvalue(), "tokens")
    with session_scope(stack.database_url) as session:
        if session.get(Artifact, ref.sha256) is None:
            session.add(Artifact(sha256=ref.sha256, kind="tokens", media_type=ref.media_type, bytes=ref.bytes,
                                 location=store.location(ref.sha256)))
    return ref.model_dump()


def log_in(page, stack: Stack) -> None:
    password = (stack.data_dir / "admin_password").read_text().strip()
    page.goto(f"{stack.base_url}/admin/jobs")
    assert "/admin/login" in page.url
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/admin/jobs"))


def settled(page) -> None:
    """Wait until an open job page has reloaded itself into the finished state: its poller reloads the
    page when the job ends, and a reload racing the test's next goto interrupts that navigation."""
    page.wait_for_selector("body[data-job-status=succeeded]", timeout=60_000)


def test_operator_finds_debugs_retries_and_compares_jobs(sqlite_stack: Stack, browser_page):
    stack, page = sqlite_stack, browser_page
    original = stack.submit(SONG)["id"]
    assert stack.wait_for_job(original)["status"] == "succeeded"

    # find it by a word of its lyrics, open it, see what the token stage received
    log_in(page, stack)
    page.fill("input[name=q]", WORD.upper())
    page.press("input[name=q]", "Enter")
    page.wait_for_url(re.compile(r"q="))
    page.click(f"a[href='/admin/jobs/{original}']")
    page.wait_for_url(re.compile(original))
    assert page.inner_text("#token-tags") == "ska,brass_band"
    assert page.inner_text("#token-seed") == "4242"
    assert "4242" in page.inner_text("#job-seed")

    # a token grid with code 8192 fails in decode_audio, with a message that says where
    row_id, good_outputs = tokens_row(stack, original)
    bad = replay.rerun_as_new(original, "decode_audio", settings=stack.settings, send=False)
    copied_row, _ = tokens_row(stack, bad.job_id)
    set_token_outputs(stack, copied_row, {**good_outputs, "tokens": bad_token_artifact(stack, good_outputs["tokens"])})
    chain_sender(stack)(bad.job_id, bad.attempts)
    failed = stack.wait_for_job(bad.job_id)
    assert failed["status"] == "failed"

    page.goto(f"{stack.base_url}/admin/jobs/{bad.job_id}")
    error_box = page.inner_text("#job-error")
    assert "decode_audio" in error_box and "InvalidCodesError" in error_box
    assert "frame 5, codebook 3: value 8192" in error_box
    traceback = page.locator("[data-role=traceback]").first
    assert traceback.is_visible()
    assert "Traceback (most recent call last)" in traceback.inner_text()
    assert "validate_codes" in traceback.inner_text()

    # fix the cause (the reused token output points at the correct grid again), press Retry
    set_token_outputs(stack, copied_row, good_outputs)
    page.click("#retry-button")
    page.wait_for_url(re.compile(bad.job_id))
    assert "retry queued from decode_audio" in page.inner_text(".flash")
    assert stack.wait_for_job(bad.job_id)["status"] == "succeeded"
    settled(page)
    page.goto(f"{stack.base_url}/admin/jobs/{bad.job_id}")
    assert page.inner_text("#job-status") == "succeeded"
    decode = page.locator(".stage", has=page.locator("h3", has_text="decode_audio"))
    headings = decode.locator("details.attempt h4").all_inner_texts()
    assert len(headings) == 2 and "attempt 1" in headings[0] and "failed" in headings[0]
    assert "attempt 2" in headings[1] and "succeeded" in headings[1]
    # top-down: the players and pictures come before the timeline and the attempts, and the players load
    order = page.evaluate("['#listen', '.timeline', '.stage']"
                          ".map(s => document.querySelector(s).getBoundingClientRect().top)")
    assert order == sorted(order)
    page.wait_for_function("[...document.querySelectorAll('#listen audio')].every(a => a.readyState >= 1 && a.duration > 0)")
    assert page.locator("#listen figure.plot figcaption", has_text="codebook").count() >= 1
    screenshot(page, "admin_job.png")

    # re-run the original as a new job with another seed; compare shows seed and tokens differ
    page.goto(f"{stack.base_url}/admin/jobs/{original}")
    page.click("details.rerun summary")
    page.select_option("#rerun-form select[name=from_stage]", "generate_tokens")
    page.fill("#rerun-form input[name=seed]", "4243")
    page.click("#rerun-button")
    page.wait_for_url(lambda url: original not in url and "/admin/jobs/" in url)
    rerun_id = page.url.rstrip("/").rsplit("/", 1)[-1].split("#")[0]
    assert stack.wait_for_job(rerun_id)["status"] == "succeeded"
    settled(page)
    page.goto(f"{stack.base_url}/admin/jobs/{original}")
    page.click(f"a[href='/admin/compare?a={original}&b={rerun_id}']")
    page.wait_for_url(re.compile(r"/admin/compare"))
    assert (page.inner_text("#seed-a"), page.inner_text("#seed-b")) == ("4242", "4243")
    tokens = page.locator("#stage-generate_tokens")
    assert "tokens differ" in tokens.inner_text() and "inputs differ" in tokens.inner_text()
    assert tokens.locator("table.diff th", has_text="seed").count() == 1
    assert "same inputs" in page.inner_text("#stage-refine_lyrics")
    # the picker offers A's replays; both songs can be listened to side by side
    assert page.locator(f"#compare-picker a[href*='b={rerun_id}']").count() == 1
    page.wait_for_function("['audio-a', 'audio-b'].every(id => document.getElementById(id).readyState >= 1)")
    screenshot(page, "admin_compare.png", full_page=True)

    page.goto(f"{stack.base_url}/admin/jobs")
    row = page.locator("table.jobs tr", has=page.locator(f"a[href='/admin/jobs/{original}']"))
    assert "ska,brass_band" in row.inner_text()  # the tags the token stage used
    screenshot(page, "admin_jobs.png")


def test_workers_page_lists_the_live_workers_queues_and_what_the_gpu_worker_ran_on(sqlite_stack: Stack, browser_page):
    stack, page = sqlite_stack, browser_page
    job_id = stack.submit({**SONG, "seed": 5})["id"]
    stack.wait_for_job(job_id)
    page.goto(f"{stack.base_url}/admin/workers")
    if "/admin/login" in page.url:
        log_in(page, stack)
        page.goto(f"{stack.base_url}/admin/workers")
    text = page.inner_text("main")
    assert re.search(r"cpu-\w+@test", text) and re.search(r"gpu-\w+@test", text)
    assert page.inner_text("[data-queue=gpu]").isdigit() and page.inner_text("[data-queue=cpu]").isdigit()
    assert "file(s)" in text and "torch" in text  # model file checksums and versions of the GPU worker
    page.goto(f"{stack.base_url}/admin/stats")
    durations = page.inner_text("main")
    assert "generate_tokens" in durations and "Jobs over time" in durations
    assert "Queue wait per stage" in durations and page.locator("#submission-to-audio td").count() == 4


def test_job_list_refreshes_itself_while_a_job_is_queued(sqlite_stack: Stack, browser_page):
    from orchestrator.submission import new_job_rows
    from tasks.contracts import JobRequest

    stack, page = sqlite_stack, browser_page

    def queued_job(word: str) -> str:  # rows only, no chain sent: it stays queued
        with session_scope(stack.database_url) as session:
            return new_job_rows(session, JobRequest(lyrics=f"refresh {word}", tags="ska", max_audio_length_ms=160),
                                stack.settings, source="cli").id

    queued_job("first")
    page.goto(f"{stack.base_url}/admin/jobs?limit=200")
    if "/admin/login" in page.url:
        log_in(page, stack)
        page.goto(f"{stack.base_url}/admin/jobs?limit=200")
    assert int(page.get_attribute("#auto-refresh", "data-active")) >= 1
    page.evaluate("window.__same_document = true")
    later = queued_job("second")
    page.wait_for_selector(f"a[href='/admin/jobs/{later}']", timeout=30_000)
    assert page.evaluate("window.__same_document") is True  # swapped in place, not reloaded
