"""What a waiting song page says about the workers, from the readiness each worker process reports
in Redis (a real Redis DB of its own)."""
from __future__ import annotations

import pytest

from tasks import worker_readiness
from tasks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(redis_service, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, redis_url=redis_service.claim_db())


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
