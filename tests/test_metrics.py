"""Prometheus metrics: the web tier's /metrics (in-process app on SQLite and PostgreSQL, and the
stack's web server) and each worker's own /metrics over HTTP while a real job runs.

Every scrape is parsed with prometheus-client's own text parser, so a malformed exposition fails.
"""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from db.engine import session_scope
from db.models import JOB_STATUSES, Job, StageRun
from tasks.contracts import GPU_STAGES, STAGES, JobRequest
from tests import stack_fixtures
from tests.stack_fixtures import free_port, wait_until

SONG = {"lyrics": "[verse]\nla la la\nde da de", "tags": "ska,upbeat", "max_audio_length_ms": 2000, "seed": 7}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition; raises when it does not parse."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read().decode())


# -- the web tier, in process ------------------------------------------------------------------

def _store_jobs(settings, statuses: list[str]) -> None:
    from orchestrator.submission import new_job_rows

    with session_scope(settings.resolved_database_url) as session:
        for status in statuses:
            job = new_job_rows(session, JobRequest(lyrics="la la", tags="ska"), settings, source="api")
            job.status = status


def test_web_metrics_count_jobs_by_status_from_the_record(app_settings):
    from orchestrator.app import create_app

    _store_jobs(app_settings, ["queued", "queued", "running", "succeeded", "failed", "failed", "failed"])
    response = create_app(app_settings).test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    parsed = samples(response.get_data(as_text=True))
    jobs = {status: value(parsed, "songpipe_jobs", status=status) for status in JOB_STATUSES}
    assert jobs == {"queued": 2, "running": 1, "succeeded": 1, "failed": 3, "cancelled": 0}
    # every job has one queued row per stage at submission
    for stage in STAGES:
        assert value(parsed, "songpipe_stage_attempts", stage=stage, status="queued") == 7
    assert value(parsed, "songpipe_broker_errors_total", operation="publish") is not None


def test_web_metrics_count_reconciler_resends_by_reason(app_settings):
    from orchestrator.app import create_app

    _store_jobs(app_settings, ["running", "running"])
    with session_scope(app_settings.resolved_database_url) as session:
        rows = session.scalars(select(StageRun).where(StageRun.stage == "generate_tokens")).all()
        session.execute(update(StageRun).where(StageRun.id == rows[0].id).values(status="lost", error_type="WorkerLost"))
        session.execute(update(StageRun).where(StageRun.id == rows[1].id).values(status="lost", error_type="MessageLost"))
    parsed = samples(create_app(app_settings).test_client().get("/metrics").get_data(as_text=True))
    assert value(parsed, "songpipe_reconciler_resends_total", reason="WorkerLost") == 1
    assert value(parsed, "songpipe_reconciler_resends_total", reason="MessageLost") == 1


def test_a_failed_publish_is_counted_as_a_broker_error(app_settings):
    """The job is stored and answered; the broker (a closed port chosen here) failure is counted."""
    from orchestrator.app import create_app
    from orchestrator.submission import submit_job
    from tasks.celery_app import app as celery_app
    from tasks.celery_app import configure
    from tasks.settings import get_settings

    client = create_app(app_settings).test_client()
    before = value(samples(client.get("/metrics").get_data(as_text=True)),
                   "songpipe_broker_errors_total", operation="publish")
    configure(celery_app, app_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        submitted = submit_job(JobRequest(lyrics="la la", tags="ska"), app_settings)
    finally:
        configure(celery_app, get_settings())
    assert submitted.dispatched is False
    after = value(samples(client.get("/metrics").get_data(as_text=True)),
                  "songpipe_broker_errors_total", operation="publish")
    assert after == before + 1


def test_database_errors_are_counted_by_exception_class(app_settings):
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from orchestrator.app import create_app

    client = create_app(app_settings).test_client()

    def errors(parsed: dict) -> float:
        return sum(v for (name, _), v in parsed.items() if name == "songpipe_database_errors_total")

    before = errors(samples(client.get("/metrics").get_data(as_text=True)))
    with pytest.raises(DBAPIError):
        with session_scope(app_settings.resolved_database_url) as session:
            session.execute(text("SELECT * FROM no_such_table"))
    assert errors(samples(client.get("/metrics").get_data(as_text=True))) == before + 1


# -- a running stack: web server and workers over HTTP -----------------------------------------

@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory, redis_service, tiny_checkpoint_dir):
    workdir = tmp_path_factory.mktemp("metrics-stack")
    # as deploy/systemd/songpipe-web.service runs it: the web tier in multiprocess mode (workers choose their own)
    web_metrics = workdir / "web-metrics"
    web_metrics.mkdir()
    with stack_fixtures.database("sqlite", workdir / "db") as url:
        with stack_fixtures.running_stack("metrics", workdir, url, redis_service.claim_db(), tiny_checkpoint_dir,
                                          extra_env={"PROMETHEUS_MULTIPROC_DIR": str(web_metrics)},
                                          metrics=True) as stack:
            yield stack


def _stage_counts(parsed: dict, name: str, stages, **labels: str) -> dict[str, float | None]:
    return {stage: value(parsed, name, stage=stage, **labels) for stage in stages}


def test_workers_serve_stage_histograms_during_and_after_a_job(metrics_stack):
    stack = metrics_stack
    cpu_stages = [s for s in STAGES if s not in GPU_STAGES]
    job_id = stack.submit(SONG)["id"]
    # while the job runs: the CPU worker's first stages show up in its histograms (observed in the
    # prefork child, served by the worker's main process from the multiprocess files)
    wait_until(lambda: value(scrape(stack.metrics_urls["cpu"]), "songpipe_stage_duration_seconds_count",
                             stage="generate_tags", status="succeeded") == 1, 120, "generate_tags observed")
    view = stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", stack.logs()

    def all_observed() -> bool:
        cpu, gpu = scrape(stack.metrics_urls["cpu"]), scrape(stack.metrics_urls["gpu"])
        return (all(_stage_counts(cpu, "songpipe_stage_duration_seconds_count", cpu_stages, status="succeeded")[s] == 1
                    for s in cpu_stages)
                and all(_stage_counts(gpu, "songpipe_stage_duration_seconds_count", GPU_STAGES, status="succeeded")[s] == 1
                        for s in GPU_STAGES))

    wait_until(all_observed, 30, "every stage observed once by its worker")  # task_postrun follows the record
    cpu, gpu = scrape(stack.metrics_urls["cpu"]), scrape(stack.metrics_urls["gpu"])
    # each worker observes only its own queue's stages
    assert set(_stage_counts(cpu, "songpipe_stage_duration_seconds_count", GPU_STAGES, status="succeeded").values()) == {None}
    assert set(_stage_counts(gpu, "songpipe_stage_duration_seconds_count", cpu_stages, status="succeeded").values()) == {None}
    for parsed, stages in ((cpu, cpu_stages), (gpu, GPU_STAGES)):
        for stage in stages:
            assert value(parsed, "songpipe_stage_queue_wait_seconds_count", stage=stage) == 1
            assert value(parsed, "songpipe_stage_duration_seconds_bucket", stage=stage, status="succeeded", le="+Inf") == 1

    # the histogram's sum is the recorded duration of that attempt
    with session_scope(stack.database_url) as session:
        tokens = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "generate_tokens"))
        recorded = tokens.duration_s
        frames = tokens.progress["total"]
    assert value(gpu, "songpipe_stage_duration_seconds_sum", stage="generate_tokens", status="succeeded") == \
        pytest.approx(recorded)
    assert value(gpu, "songpipe_stage_progress_units_total", stage="generate_tokens", unit="frames") == frames
    # idle again: no stage running, so no throughput
    assert value(gpu, "songpipe_stage_units_per_second", stage="generate_tokens", unit="frames") == 0
    # CPU-only run: CUDA never used, so the GPU memory gauges have no samples
    assert not [key for key in gpu if key[0].startswith("songpipe_gpu_memory")]


def test_the_stack_web_server_serves_jobs_by_status(metrics_stack):
    stack = metrics_stack
    job_id = stack.submit(SONG)["id"]
    stack.wait_for_job(job_id)
    status, _, body = stack.http("GET", "/metrics")
    assert status == 200
    parsed = samples(body.decode())
    with session_scope(stack.database_url) as session:
        succeeded = session.query(Job).filter(Job.status == "succeeded").count()
    assert succeeded >= 1
    assert value(parsed, "songpipe_jobs", status="succeeded") == succeeded
    # the web tier's own counters come from its multiprocess files
    assert value(parsed, "songpipe_broker_errors_total", operation="publish") == 0
    assert list((stack.workdir / "web-metrics").glob("counter_*.db"))


def test_workers_without_a_metrics_port_serve_nothing_and_write_no_files(sqlite_stack):
    """The default (SONGPIPE_METRICS_PORT unset): no server, no multiprocess directory."""
    assert sqlite_stack.metrics_urls == {}
    assert not (Path(sqlite_stack.data_dir) / "prometheus").exists()


def test_a_worker_whose_metrics_port_is_taken_refuses_to_start(tmp_path, redis_service, tiny_checkpoint_dir):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken, stack_fixtures.database("sqlite", tmp_path / "db") as url, \
            redis_service.db() as redis_url:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = stack_fixtures.stack_environment(tmp_path, url, redis_url, tiny_checkpoint_dir,
                                               {"SONGPIPE_METRICS_PORT": str(port)})
        result = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks.cpu_worker", "worker", "-Q", "cpu", "-c", "1",
             "--without-gossip", "--without-mingle", "-l", "INFO"],
            env=env, cwd=stack_fixtures.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr
