"""Who may see and act on the admin dashboard: login everywhere, roles, CSRF, expiry, passwords."""
from __future__ import annotations

import re
import stat
import time

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from werkzeug.security import generate_password_hash

from db.engine import session_scope
from db.models import Job, StageRun
from orchestrator.admin.auth import AdminConfigurationError, hash_password
from orchestrator.app import create_app
from orchestrator.submission import new_job_rows
from tasks.contracts import JobRequest
from tasks.settings import Settings

ADMIN_PASSWORD, VIEWER_PASSWORD = "admin-secret-1", "viewer-secret-1"
FAST_HASH = "pbkdf2:sha256:1000"  # test speed only; hash_password() uses werkzeug's default (scrypt)
DUMMIES = {"job_id": "0" * 32, "sha256": "0" * 64, "filename": "admin.css"}
PUBLIC_ENDPOINTS = {"admin.login", "admin.static"}  # the login form and its vendored CSS/JS


@pytest.fixture
def settings(app_settings: Settings) -> Settings:
    return app_settings.model_copy(update={
        "admin_password_hash": generate_password_hash(ADMIN_PASSWORD, method=FAST_HASH),
        "viewer_password_hash": generate_password_hash(VIEWER_PASSWORD, method=FAST_HASH)})


@pytest.fixture
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture
def queued_job(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return new_job_rows(session, JobRequest(lyrics="la la la", tags="ska"), settings, source="cli").id


@pytest.fixture
def failed_job(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = new_job_rows(session, JobRequest(lyrics="la la la", tags="ska"), settings, source="cli")
        job.status, job.failed_stage, job.error_type = "failed", "refine_lyrics", "ValueError"
        job.stage_runs[0].status = "failed"
        return job.id


def csrf_of(client) -> str:
    return client.get("/admin/api/csrf").get_json()["csrf_token"]


def log_in(client, user: str, password: str):
    page = client.get("/admin/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return client.post("/admin/login", data={"username": user, "password": password, "csrf_token": token})


def admin_rules(app):
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/admin") and rule.endpoint not in PUBLIC_ENDPOINTS:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                yield rule, method


def job_state(settings: Settings, job_id: str) -> tuple:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        attempts = session.scalars(select(StageRun.attempt).where(StageRun.job_id == job_id)).all()
        return job.status, job.cancel_requested, sorted(attempts)


def test_every_admin_route_needs_a_login(app):
    client = app.test_client()
    checked = 0
    for rule, method in admin_rules(app):
        url = rule.build({name: DUMMIES[name] for name in rule.arguments}, append_unknown=False)[1]
        response = client.open(url, method=method)
        checked += 1
        if url.startswith("/admin/api/"):
            assert response.status_code == 401, (method, url, response.status_code)
        else:
            assert response.status_code == 302, (method, url, response.status_code)
            assert response.headers["Location"].startswith("/admin/login"), (method, url)
    assert checked >= 20


def test_the_login_page_itself_is_reachable(app):
    assert app.test_client().get("/admin/login").status_code == 200


def test_a_wrong_password_is_refused_and_gives_no_session(app):
    client = app.test_client()
    assert log_in(client, "admin", "not-the-password").status_code == 401
    assert client.get("/admin/jobs").status_code == 302


def test_admin_and_viewer_can_read_every_page(app, failed_job):
    for user, password in (("admin", ADMIN_PASSWORD), ("viewer", VIEWER_PASSWORD)):
        client = app.test_client()
        assert log_in(client, user, password).status_code == 302
        for path in ("/admin/jobs", f"/admin/jobs/{failed_job}", "/admin/stats", "/admin/workers?live=0",
                     f"/admin/compare?a={failed_job}&b={failed_job}", "/admin/api/jobs", f"/admin/api/jobs/{failed_job}"):
            assert client.get(path).status_code == 200, (user, path)


def test_viewer_cannot_retry_rerun_or_cancel(app, settings, failed_job, queued_job):
    client = app.test_client()
    log_in(client, "viewer", VIEWER_PASSWORD)
    token = csrf_of(client)
    before = job_state(settings, failed_job), job_state(settings, queued_job)
    forms = [(f"/admin/jobs/{failed_job}/retry", {}), (f"/admin/jobs/{failed_job}/rerun", {"seed": "3"}),
             (f"/admin/jobs/{queued_job}/cancel", {})]
    for url, data in forms:
        assert client.post(url, data={**data, "csrf_token": token}).status_code == 403, url
    for url, body in [(f"/admin/api/jobs/{failed_job}/retry", {}), (f"/admin/api/jobs/{failed_job}/rerun", {}),
                      (f"/admin/api/jobs/{queued_job}/cancel", {})]:
        response = client.post(url, json=body, headers={"X-CSRFToken": token})
        assert response.status_code == 403 and "admin role" in response.get_json()["error"], url
    assert (job_state(settings, failed_job), job_state(settings, queued_job)) == before


@pytest.mark.parametrize("hours", ["week", "0", "-5", "100000"])
def test_a_bad_stats_window_is_refused_naming_hours(app, hours):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    for url in ("/admin/stats", "/admin/api/stats"):
        response = client.get(url, query_string={"hours": hours})
        assert response.status_code == 400 and "hours" in response.get_data(as_text=True), url


def test_viewer_sees_no_action_buttons(app, failed_job):
    client = app.test_client()
    log_in(client, "viewer", VIEWER_PASSWORD)
    page = client.get(f"/admin/jobs/{failed_job}").get_data(as_text=True)
    assert "read-only" in page and "retry-form" not in page and "rerun-form" not in page


def test_state_changes_without_a_csrf_token_are_refused(app, settings, queued_job):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    before = job_state(settings, queued_job)
    assert client.post(f"/admin/jobs/{queued_job}/cancel").status_code == 400
    assert client.post(f"/admin/jobs/{queued_job}/cancel", data={"csrf_token": "forged"}).status_code == 400
    response = client.post(f"/admin/api/jobs/{queued_job}/cancel", json={})
    assert response.status_code == 400 and "CSRF" in response.get_json()["error"]
    assert client.post(f"/admin/api/jobs/{queued_job}/cancel", json={},
                       headers={"X-CSRFToken": "forged"}).status_code == 400
    assert job_state(settings, queued_job) == before


def test_a_csrf_token_from_another_session_is_refused(app, settings, queued_job):
    other = app.test_client()
    log_in(other, "admin", ADMIN_PASSWORD)
    foreign = csrf_of(other)
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    assert client.post(f"/admin/api/jobs/{queued_job}/cancel", json={},
                       headers={"X-CSRFToken": foreign}).status_code == 400


def test_admin_with_a_token_can_cancel(app, settings, queued_job):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    response = client.post(f"/admin/api/jobs/{queued_job}/cancel", json={"reason": "test"},
                           headers={"X-CSRFToken": csrf_of(client)})
    assert response.status_code == 202
    assert job_state(settings, queued_job)[1] is True


def test_bad_json_bodies_are_refused_naming_the_field_and_write_nothing(app, settings, failed_job, queued_job):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    headers = {"X-CSRFToken": csrf_of(client)}
    before = job_state(settings, failed_job), job_state(settings, queued_job)
    for url, body, field in [(f"/admin/api/jobs/{queued_job}/cancel", {"reason": {"why": "x"}}, "reason"),
                             (f"/admin/api/jobs/{failed_job}/retry", {"from_stage": 3}, "from_stage"),
                             (f"/admin/api/jobs/{failed_job}/retry", {"stage": "x"}, "stage"),
                             (f"/admin/api/jobs/{failed_job}/rerun", {"overrides": [1]}, "overrides"),
                             (f"/admin/api/jobs/{failed_job}/rerun", {"overrides": {"seed": "3"}}, "seed")]:
        response = client.post(url, json=body, headers=headers)
        assert response.status_code == 400 and field in response.get_json()["error"], (url, body)
    assert (job_state(settings, failed_job), job_state(settings, queued_job)) == before


def test_logout_needs_csrf_and_ends_the_session(app):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    assert client.post("/admin/logout").status_code == 400
    assert client.post("/admin/logout", data={"csrf_token": csrf_of(client)}).status_code == 302
    assert client.get("/admin/jobs").status_code == 302


def test_an_idle_session_expires_after_session_minutes(app, settings):
    client = app.test_client()
    log_in(client, "admin", ADMIN_PASSWORD)
    assert client.get("/admin/jobs").status_code == 200
    with client.session_transaction() as session:
        session["admin_seen"] = time.time() - settings.session_minutes * 60 - 5
    assert client.get("/admin/jobs").status_code == 302
    assert client.get("/admin/api/jobs").status_code == 401


def test_login_redirects_only_inside_the_dashboard(app):
    client = app.test_client()
    page = client.get("/admin/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post("/admin/login", data={"username": "admin", "password": ADMIN_PASSWORD,
                                                  "csrf_token": token, "next": "//evil.example/x"})
    assert response.headers["Location"] == "/admin/jobs"


def test_production_mode_refuses_to_start_without_an_admin_password_hash(app_settings):
    with pytest.raises(AdminConfigurationError, match="SONGPIPE_ADMIN_PASSWORD_HASH"):
        create_app(app_settings.model_copy(update={"mode": "production", "admin_password_hash": None,
                                                   "secret_key": SecretStr("x" * 32)}))


def test_development_generates_one_random_admin_password_per_data_dir(app_settings, capsys):
    create_app(app_settings)
    password_file = app_settings.data_dir / "admin_password"
    password = password_file.read_text().strip()
    assert len(password) >= 20 and stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert str(password_file) in capsys.readouterr().out
    app = create_app(app_settings)  # a restart keeps the same password
    assert password_file.read_text().strip() == password
    client = app.test_client()
    assert log_in(client, "admin", password).status_code == 302
    assert client.get("/admin/jobs").status_code == 200


def test_hash_password_makes_a_werkzeug_hash_and_refuses_short_passwords():
    from werkzeug.security import check_password_hash

    assert check_password_hash(hash_password("long enough"), "long enough")
    with pytest.raises(ValueError):
        hash_password("short")
