"""Broker outages under real workers: Redis restarted while a CPU task runs (issue 11).

A private redis-server (killable), SQLite, web, one CPU and one GPU worker and the reconciler; the
lyrics stage asks a stub LLM that answers after 10 s, so the CPU task is running when Redis goes.
"""
from __future__ import annotations

import sys

import pytest

from tests import reliability_fixtures as rf
from tests import stack_fixtures
from tests.slow_llm import LYRICS, SlowLlm
from tests.stack_fixtures import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm():
    server = SlowLlm(delay_s=10)
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with rf.private_redis(tmp_path_factory.mktemp("outage-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint_dir, redis, llm):
    with rf.reliability_stack("outage", tmp_path_factory.mktemp("outage"), tiny_checkpoint_dir, redis.url(),
                              llm.env()) as running:
        # the worker as `songpipe run` starts it (gossip, mingle and heartbeats on), not the lean test one
        rf.sigkill(running, "cpu-worker")
        del running.processes["cpu-worker"]
        rf.spawn(running, "cpu-worker", [sys.executable, "-m", "orchestrator.cli", "worker", "cpu"],
                 {"SONGPIPE_WORKER_NAME": "cpu-outage@test"})
        wait_until(lambda: stack_fixtures._workers_answer(redis.url(), ["cpu-outage@test"]), 90, "songpipe worker cpu")
        yield running


def test_redis_restarted_empty_while_a_cpu_task_runs_the_worker_survives_and_the_job_succeeds(stack, redis):
    job = stack.submit(rf.song(lyrics=LYRICS, lyrics_backend="llm"))
    rf.wait_for_stage(stack, job["id"], "refine_lyrics", lambda r: r["status"] == "running")
    cpu = stack.processes["cpu-worker"]
    redis.restart_empty(down_s=3)

    view = stack.wait_for_job(job["id"], timeout_s=180)
    assert view["status"] == "succeeded", (view.get("error_message"), stack.logs())
    assert cpu.poll() is None, f"the CPU worker exited with {cpu.returncode}\n{stack.logs()}"
    assert "Unrecoverable error" not in stack.log_path("cpu-worker").read_text()
