"""What a waiting song page says about the workers, from the readiness each worker process reports
in Redis (a real Redis DB of its own)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tasks import worker_readiness
from tasks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(redis_service, tmp_path) -> Iterator[Settings]:
    with redis_service.db() as url:
        yield Settings(data_dir=tmp_path, redis_url=url)


def test_no_worker_reported_says_none_has(settings):
    assert "none has reported in yet" in worker_readiness.describe_wait("cpu", settings)


def test_a_loading_worker_says_what_it_loads_then_ready(settings):
    worker_readiness.report(settings, "cpu", "loading", "the tag model")
    assert worker_readiness.describe_wait("cpu", settings) == "waiting for a CPU worker: loading the tag model"
    worker_readiness.report(settings, "cpu", "ready", "the tag model")
    assert worker_readiness.describe_wait("cpu", settings) == "waiting for a free CPU worker (1 ready)"


def test_warm_up_of_a_cpu_process_reports_ready_after_loading(settings):
    worker_readiness.warm_up_cpu_process(settings.model_copy(update={"default_tags_backend": "given"}))
    assert [e["state"] for e in worker_readiness.states(settings, "cpu")] == ["ready"]


def test_without_a_broker_reporting_is_a_no_op(tmp_path):
    quiet = Settings(data_dir=tmp_path, redis_url=None)
    worker_readiness.report(quiet, "cpu", "ready", "x")  # must not raise
    assert worker_readiness.states(quiet, "cpu") == []


def test_a_cpu_worker_answers_its_first_ping_only_after_the_tag_model_is_loaded(settings, tmp_path):
    import os
    import subprocess
    import sys

    from celery import Celery

    from tests import stack_fixtures

    with stack_fixtures.database("sqlite", tmp_path / "db") as url:
        env = {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": url,
               "SONGPIPE_DATA_DIR": str(tmp_path / "data")}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks.cpu_worker", "worker", "-Q", "cpu", "-c", "1",
             "-n", "cpu-readiness@test", "--without-gossip", "--without-mingle", "-l", "WARNING"],
            env=env, cwd=stack_fixtures.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        probe = Celery("readiness-probe", broker=settings.redis_url)
        try:
            answered: list = []

            def pinged() -> bool:
                assert worker.poll() is None, "the CPU worker exited"
                answered[:] = probe.control.ping(destination=["cpu-readiness@test"], timeout=0.5) or []
                return bool(answered)

            stack_fixtures.wait_until(pinged, 300, "the CPU worker's first ping")
            reported = worker_readiness.states(settings, "cpu")
            assert reported and all(entry["state"] == "ready" for entry in reported), reported
        finally:
            probe.close()
            stack_fixtures.kill_group(worker)
