"""`songpipe run` heals itself (issue 11): real processes under the supervisor, embedded Redis, SQLite.

One stack for the module; tests run in file order, each looks at its own jobs, and the last one
stops the stack with SIGTERM while a song is generating.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3

import pytest
import requests

from tests import reliability_fixtures as rf
from tests.stack_fixtures import wait_until
from tests.supervised_stack import job_pids_of, supervised_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint_dir):
    with supervised_stack(tmp_path_factory.mktemp("selfheal"), tiny_checkpoint_dir) as running:
        yield running


def _stage(view: dict, name: str) -> dict:
    return [s for s in view["stages"] if s["stage"] == name][-1]


def test_the_embedded_broker_is_recorded_in_the_data_dir(stack):
    recorded = (stack.data_dir / "broker_url").read_text().strip()
    assert recorded == f"redis+socket://{stack.data_dir / 'redis' / 'redis.sock'}"


def test_submit_show_and_replay_from_a_second_shell_reach_the_embedded_broker(stack):
    assert "REDIS_URL" not in stack.env
    submitted = stack.cli("submit", "--lyrics", rf.SHORT_SONG["lyrics"], "--tags", "ska", "--max-audio-length-ms", "1600",
                          "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded"
    replayed = stack.cli("replay", job["id"], "--mode", "new", "--json")
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    new_id = json.loads(replayed.stdout)["job_id"]
    assert stack.wait_for_job(new_id)["status"] == "succeeded"
    shown = stack.cli("show", new_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"


def test_cancel_from_a_second_shell_ends_a_generating_job(stack):
    job_id = stack.submit(rf.song("slow-300", max_audio_length_ms=8000))
    wait_until(lambda: _stage(stack.job(job_id), "generate_tokens")["status"] == "running", 120, "generation")
    cancelled = stack.cli("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr + cancelled.stdout
    assert stack.wait_for_job(job_id)["status"] == "cancelled"


def test_the_workers_page_shows_queue_lengths_on_the_default_setup(stack):
    session = requests.Session()
    page = session.get(f"{stack.base_url}/admin/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    password = (stack.data_dir / "admin_password").read_text().strip()
    session.post(f"{stack.base_url}/admin/login", timeout=10,
                 data={"username": "admin", "password": password, "csrf_token": token})
    overview = session.get(f"{stack.base_url}/admin/api/workers", timeout=30).json()
    assert overview["queues"]["error"] is None, overview["queues"]
    assert set(overview["queues"]["queues"]) == {"cpu", "gpu"}
    assert all(isinstance(n, int) for n in overview["queues"]["queues"].values())


def test_kill_9_of_the_gpu_worker_web_keeps_answering_the_worker_returns_and_the_job_succeeds(stack):
    job_id = stack.submit(rf.song("slow-60", max_audio_length_ms=8000))
    wait_until(lambda: _stage(stack.job(job_id), "generate_tokens")["status"] == "running", 120, "generation")
    old = stack.pid("gpu")
    restarts = stack.restarts("gpu")
    os.killpg(old, signal.SIGKILL)  # main process and pool child
    assert stack.web_answers()
    assert stack.wait_for_new_pid("gpu", old) != old
    assert stack.web_answers()
    view = stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", view.get("error_message")
    assert stack.restarts("gpu") == restarts + 1
    assert "supervisor: gpu exited with -9" in stack.output()


def test_a_stopped_worker_is_detected_killed_and_replaced(stack):
    old = stack.pid("cpu")
    os.kill(old, signal.SIGSTOP)  # alive as a process, answers no ping
    new = stack.wait_for_new_pid("cpu", old)
    assert new != old
    assert f"supervisor: cpu (pid {old}) did not answer 3 liveness probes in a row" in stack.output()
    job_id = stack.submit(rf.song())
    assert stack.wait_for_job(job_id)["status"] == "succeeded"


def test_kill_9_of_the_cpu_workers_pool_child_and_of_redis_are_healed(stack):
    children = job_pids_of(stack.pid("cpu"))
    assert children, "the CPU worker has pool children"
    os.kill(children[0], signal.SIGKILL)  # Celery's own pool replaces it
    old_redis = stack.pid("redis")
    os.kill(old_redis, signal.SIGKILL)
    assert stack.wait_for_new_pid("redis", old_redis) != old_redis
    job_id = stack.submit(rf.song())
    assert stack.wait_for_job(job_id)["status"] == "succeeded"


def test_sigterm_while_a_song_generates_hands_the_stage_back_instead_of_losing_it_to_a_lease(stack, tiny_checkpoint_dir):
    job_id = stack.submit(rf.song("slow-200", max_audio_length_ms=8000))  # ~20 s of generation
    wait_until(lambda: _stage(stack.job(job_id), "generate_tokens")["status"] == "running", 120, "generation")
    assert stack.stop() == 0, stack.output()[-6000:]
    with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
        rows = db.execute("SELECT attempt, status, error_type, requested_by FROM stage_runs WHERE job_id = ? AND "
                          "stage = 'generate_tokens' ORDER BY attempt", (job_id,)).fetchall()
    # handed back at once: the attempt ends lost with the reason, its successor is queued (no lease wait)
    assert rows == [(1, "lost", "WorkerStopped", None), (2, "queued", None, "worker-stop")], rows
    assert not (stack.data_dir / "broker_url").exists()  # a clean stop forgets the embedded broker
    assert "supervisor: gpu stopped (0)" in stack.output()

    with supervised_stack(stack.data_dir.parent, tiny_checkpoint_dir) as again:
        finished = again.wait_for_job(job_id, timeout_s=300)
    assert finished["status"] == "succeeded"
    tokens = [s for s in finished["stages"] if s["stage"] == "generate_tokens"]
    assert [(s["attempt"], s["status"]) for s in tokens] == [(1, "lost"), (2, "succeeded")]
