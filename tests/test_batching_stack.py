"""Continuous batching (SONGPIPE_GPU_BATCHING=1) in the real stack: one engine serves several songs at once.

One stack for the module: real Redis (a claimed DB), SQLite, the web server, one CPU worker and one
GPU worker started the way `songpipe worker gpu` starts it with batching on (Celery's threads pool
around one GenerationEngine per process; the pool, concurrency and --include come from
orchestrator.cli.worker_argv), the tiny random checkpoint on CPU, fault injection on. Jobs go in
through POST /api/jobs; the full record (every stage attempt with its output, environment and pid)
comes back from the admin JSON API, cancels go through it too. Tests run in file order and look at
their own jobs only; the OOM test is last because, when the product gets it wrong, the GPU worker
process ends.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from orchestrator.cli import worker_argv
from tests import stack_fixtures
from tests.reliability_fixtures import job_status
from tests.stack_fixtures import RedisServer, Stack, running_stack, wait_until

pytestmark = pytest.mark.integration

BATCHING_ENV = {
    "SONGPIPE_GPU_BATCHING": "1",
    "SONGPIPE_FAULT_INJECTION": "1",  # oom-once for the retry test
    "SONGPIPE_SUBMISSIONS_PER_MINUTE": "100000",
}
GPU_WORKER = "gpu-worker"  # its name in stack.processes (running_stack)
LYRICS = "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you"
FRAME_MS = 80
JOB_TIMEOUT_S = 240
LONG_MS = 10_240  # the longest song the API accepts for the tiny checkpoint (128 frames)


# -- the stack ---------------------------------------------------------------------------------

def _batching_gpu_pool() -> tuple[tuple[str, int], tuple[str, ...]]:
    """The GPU worker's pool, concurrency and extra arguments as `songpipe worker gpu` picks them with batching on."""
    argv = worker_argv("gpu", None, "INFO", gpu_batching=True)
    pool = argv[argv.index("--pool") + 1]
    concurrency = int(argv[argv.index("--concurrency") + 1])
    extra: tuple[str, ...] = ()
    if "--include" in argv:  # the threads-mode hooks (decode serialised, process handling after a failure)
        extra = ("--include", argv[argv.index("--include") + 1])
    return (pool, concurrency), extra


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_dir: Path,
          redis_service: RedisServer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("batching")
    gpu_pool, gpu_extra_args = _batching_gpu_pool()
    assert gpu_pool[0] == "threads" and gpu_pool[1] > 1, f"batching mode should run a threads pool, got {gpu_pool}"
    with redis_service.db() as redis_url, stack_fixtures.database("sqlite", workdir / "db") as database_url:
        with running_stack("batching", workdir, database_url, redis_url, tiny_checkpoint_dir, BATCHING_ENV,
                           gpu_pool=gpu_pool, gpu_extra_args=gpu_extra_args) as running:
            yield running


@pytest.fixture
def gpu_pid(stack: Stack) -> int:
    """The GPU worker's pid; each test starts with the worker alive (an earlier test may have ended it)."""
    process = stack.processes[GPU_WORKER]
    assert process.poll() is None, f"the GPU worker exited with {process.returncode} before this test\n{stack.logs()}"
    return process.pid


class Admin:
    """A logged-in admin session against the stack's web server (the generated development password)."""

    def __init__(self, stack: Stack):
        self.base_url = stack.base_url
        self.session = requests.Session()
        page = self.session.get(f"{self.base_url}/admin/login", timeout=30).text
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match, "no CSRF token on the login page"
        password = (stack.data_dir / "admin_password").read_text().strip()
        answer = self.session.post(f"{self.base_url}/admin/login", timeout=30, allow_redirects=False,
                                   data={"username": "admin", "password": password, "csrf_token": match.group(1)})
        assert answer.status_code == 302, f"admin login -> {answer.status_code}: {answer.text[:500]}"

    def record(self, job_id: str) -> dict[str, Any]:
        """GET /admin/api/jobs/<id>: the job's columns and every stage attempt (`stage_runs`)."""
        answer = self.session.get(f"{self.base_url}/admin/api/jobs/{job_id}", timeout=30)
        assert answer.status_code == 200, f"GET /admin/api/jobs/{job_id} -> {answer.status_code}: {answer.text[:500]}"
        return answer.json()

    def cancel(self, job_id: str, reason: str) -> dict[str, Any]:
        token = self.session.get(f"{self.base_url}/admin/api/csrf", timeout=30).json()["csrf_token"]
        answer = self.session.post(f"{self.base_url}/admin/api/jobs/{job_id}/cancel", json={"reason": reason},
                                   headers={"X-CSRFToken": token}, timeout=30)
        assert answer.status_code == 202, f"cancel {job_id} -> {answer.status_code}: {answer.text[:500]}"
        return answer.json()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Admin:
    return Admin(stack)


# -- songs and their records -------------------------------------------------------------------

def song(length_ms: int, *, seed: int, temperature: float = 1.0, top_k: int = 50, cfg_scale: float = 1.5,
         faults: tuple[str, ...] = ()) -> dict[str, Any]:
    """A request body for POST /api/jobs; `faults` like "oom-once" become songpipe-fault-* tags."""
    return {"lyrics": LYRICS, "tags": ["ska", *(f"songpipe-fault-{f}" for f in faults)], "seed": seed,
            "temperature": temperature, "top_k": top_k, "cfg_scale": cfg_scale, "max_audio_length_ms": length_ms,
            "output_format": "wav"}


def submit_all(stack: Stack, bodies: list[dict[str, Any]]) -> list[str]:
    return [stack.submit(body)["id"] for body in bodies]


def attempts(record: dict[str, Any], stage: str = "generate_tokens") -> list[dict[str, Any]]:
    return sorted((r for r in record["stage_runs"] if r["stage"] == stage), key=lambda r: r["attempt"])


def wait_for_jobs(stack: Stack, admin: Admin, job_ids: list[str], timeout_s: float = JOB_TIMEOUT_S) -> dict[str, dict]:
    """Every job's admin record once all are terminal; fails at once when the GPU worker process has ended."""
    records: dict[str, dict] = {}
    gpu = stack.processes[GPU_WORKER]

    def done() -> bool:
        if gpu.poll() is not None:
            statuses = {j: job_status(stack, j) for j in job_ids}
            raise AssertionError(f"the GPU worker process exited with {gpu.returncode} while jobs were running: "
                                 f"{statuses}")
        records.update({j: admin.record(j) for j in job_ids})
        return all(r["status"] in ("succeeded", "failed", "cancelled") for r in records.values())

    try:
        wait_until(done, timeout_s, f"jobs {job_ids}", interval_s=1.0)
    except TimeoutError as exc:
        statuses = {j: r["status"] for j, r in records.items()}
        raise TimeoutError(f"{exc}; last seen: {statuses}") from None
    return records


def wait_until_generating(admin: Admin, job_ids: list[str], timeout_s: float = 120) -> None:
    """Until every job's token attempt is running and has reported frames (it is live in the engine)."""
    def generating(job_id: str) -> bool:
        rows = attempts(admin.record(job_id))
        return bool(rows) and rows[-1]["status"] == "running" and (rows[-1]["progress"] or {}).get("done", 0) > 0

    wait_until(lambda: all(generating(j) for j in job_ids), timeout_s, f"generation of {job_ids}", interval_s=0.2)


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stage attempts were running at the same time (started_at .. finished_at)."""
    return _time(a["started_at"]) < _time(b["finished_at"]) and _time(b["started_at"]) < _time(a["finished_at"])


def assert_batched_success(record: dict[str, Any], gpu_pid: int, body: dict[str, Any]) -> dict[str, Any]:
    """The job succeeded, its one token attempt ran in the engine of `gpu_pid`; returns that attempt."""
    assert record["status"] == "succeeded", (record["status"], record.get("error_type"), record.get("error_message"))
    (tokens,) = attempts(record)
    environment, output = tokens["environment"] or {}, tokens["outputs"] or {}
    assert tokens["status"] == "succeeded"
    assert environment.get("generation_path") == "batched", environment
    assert output.get("batch_size", 0) >= 1, output
    assert tokens["worker_pid"] == gpu_pid  # threads pool: the worker's main process runs every song
    max_frames = body["max_audio_length_ms"] // FRAME_MS
    assert 1 <= output["frames"] <= max_frames
    if output["stop_reason"] == "max_length":
        assert output["frames"] == max_frames, output
    (decode,) = attempts(record, "decode_audio")
    assert decode["status"] == "succeeded" and decode["inputs"]["frames"] == output["frames"]
    return tokens


# -- the tests ---------------------------------------------------------------------------------

def test_six_songs_with_different_lengths_and_settings_share_the_engine(stack: Stack, admin: Admin, gpu_pid: int):
    # Three sampling settings (CFG off and on), two lengths each, all submitted at once: the engine
    # must give every song its own settings and length while songs share its frame steps.
    bodies = [
        song(2_400, seed=101, temperature=1.0, top_k=50, cfg_scale=1.0),
        song(LONG_MS, seed=102, temperature=1.0, top_k=50, cfg_scale=1.0),
        song(4_000, seed=103, temperature=0.8, top_k=20, cfg_scale=2.0),
        song(8_000, seed=104, temperature=0.8, top_k=20, cfg_scale=2.0),
        song(3_200, seed=105, temperature=1.3, top_k=200, cfg_scale=1.5),
        song(9_600, seed=106, temperature=1.3, top_k=200, cfg_scale=1.5),
    ]
    job_ids = submit_all(stack, bodies)
    records = wait_for_jobs(stack, admin, job_ids)

    tokens = [assert_batched_success(records[j], gpu_pid, body) for j, body in zip(job_ids, bodies, strict=True)]
    for row, body in zip(tokens, bodies, strict=True):
        params = row["inputs"]["params"]  # each song ran with its own settings, not its batch mates'
        assert (params["temperature"], params["top_k"], params["cfg_scale"]) == (
            body["temperature"], body["top_k"], body["cfg_scale"])
    batch_sizes = [row["outputs"]["batch_size"] for row in tokens]
    # each setting has two songs: a batch of 3 or more mixed settings in one frame step
    assert max(batch_sizes) > 2, f"songs with different settings never shared a frame step: {batch_sizes}"


def test_cancel_of_one_song_leaves_the_others_running(stack: Stack, admin: Admin, gpu_pid: int):
    bodies = [song(LONG_MS, seed=200 + i) for i in range(4)]
    job_ids = submit_all(stack, bodies)
    victim = job_ids[1]
    wait_until_generating(admin, job_ids)
    assert admin.cancel(victim, "test: cancel one song of the batch")["cancel_requested"] is True
    records = wait_for_jobs(stack, admin, job_ids)

    cancelled = records[victim]
    assert cancelled["status"] == "cancelled", (cancelled["status"], cancelled.get("error_message"))
    (tokens,) = attempts(cancelled)
    assert tokens["status"] == "cancelled", (tokens["status"], tokens["error_type"], tokens["error_message"])
    assert tokens["progress"]["done"] < tokens["progress"]["total"]  # stopped mid-song, in the engine
    assert [r["status"] for r in attempts(cancelled, "decode_audio")] in ([], ["skipped"])
    others = [assert_batched_success(records[j], gpu_pid, b) for j, b in zip(job_ids, bodies, strict=True)
              if j != victim]
    assert all(row["outputs"]["batch_size"] > 1 for row in others)  # they ran beside the cancelled song
    assert all(overlap(tokens, row) for row in others)


def test_an_injected_oom_in_one_song_retries_only_that_song(stack: Stack, admin: Admin, gpu_pid: int):
    bodies = [song(LONG_MS, seed=300 + i, faults=("oom-once",) if i == 1 else ()) for i in range(4)]
    job_ids = submit_all(stack, bodies)
    oom_job = job_ids[1]
    records = wait_for_jobs(stack, admin, job_ids)

    record = records[oom_job]
    assert record["status"] == "succeeded", (record["status"], record.get("error_type"), record.get("error_message"))
    first, second = attempts(record)  # exactly two token attempts
    assert (first["attempt"], first["status"]) == (1, "failed")
    assert first["error_type"] == "torch.OutOfMemoryError" and "out of memory" in first["error_message"]
    assert "retried once as attempt 2" in first["error_message"]
    assert (first["environment"] or {}).get("injected_faults") == ["oom-once"]
    assert (first["environment"] or {}).get("worker_process", {}).get("replaced_after_this_failure") is not True
    assert (second["attempt"], second["status"]) == (2, "succeeded")
    assert second["environment"]["generation_path"] == "batched" and second["outputs"]["batch_size"] >= 1
    # the song's retry ran in the same process: the OOM ended that song's attempt, not the worker
    assert first["worker_pid"] == second["worker_pid"] == gpu_pid

    others = [assert_batched_success(records[j], gpu_pid, b) for j, b in zip(job_ids, bodies, strict=True)
              if j != oom_job]  # exactly one token attempt each, succeeded
    assert any(overlap(first, row) for row in others), "the failing song was never in the engine beside the others"
    process = stack.processes[GPU_WORKER]
    assert process.poll() is None and process.pid == gpu_pid, "the GPU worker process was replaced"
    assert "must be replaced" not in stack.log_path(GPU_WORKER).read_text(errors="replace")
