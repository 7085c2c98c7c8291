"""Flask application factory: one app per Settings, blueprints per area (form, API, admin).

Production mode (SONGPIPE_MODE=production) refuses to start with fault injection on, marks the
session cookie Secure, and needs a Redis for the shared submission limits (docs/web-tier.md).
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from db.schema import require_current_schema
from gpu_worker.worker.fault_injection import check_allowed as check_fault_injection_allowed
from tasks.settings import Settings, get_settings

SECRET_KEY_FILE = "secret_key"


def _secret_key(settings: Settings) -> str:
    """The configured key (SONGPIPE_SECRET_KEY: the same on every web host), else one per data dir.

    The generated file is created with O_EXCL at mode 0600, so it is never readable by others, and
    of two processes starting at once on a fresh data dir exactly one writes it; the other reads it.
    """
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    path: Path = settings.data_dir / SECRET_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
    key = path.read_text().strip()
    while not key:  # the winner of the O_EXCL race has created the file but not written it yet
        key = path.read_text().strip()
    return key


def create_app(settings: Settings | None = None, *, check_schema: bool = True) -> Flask:
    settings = settings or get_settings()
    check_fault_injection_allowed(settings)  # SystemExit with a message in production mode
    if check_schema:
        require_current_schema(settings.resolved_database_url)  # refuse to serve on an old schema
    app = Flask(__name__)
    app.config.update(
        SONGPIPE_SETTINGS=settings,
        SECRET_KEY=_secret_key(settings),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.mode == "production",  # production is served over HTTPS (a proxy)
        PERMANENT_SESSION_LIFETIME=settings.session_minutes * 60,
    )
    if settings.proxy_hops:  # trust exactly this many X-Forwarded-* hops: remote_addr is then the client
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops,  # type: ignore[method-assign]
                                x_host=settings.proxy_hops)
    from orchestrator.admin import register as register_admin
    from orchestrator.admission import init_admission
    from orchestrator.api import register as register_api
    from orchestrator.metrics_view import register as register_metrics
    from orchestrator.openapi import register as register_openapi
    from orchestrator.web import register as register_web

    register_web(app)
    register_api(app)
    register_admin(app)  # first the admin's configuration errors, then the rate storage's
    register_openapi(app)
    register_metrics(app)
    init_admission(app, settings)
    _publish_without_sent_events()
    return app


def _publish_without_sent_events() -> None:
    """Web processes send chains without Celery's task-sent events.

    Celery publishes those through one event dispatcher per app whose lock is held across the
    broker publish, so with them every concurrent submission would queue behind a slow broker
    (code-review H1, found by tests/test_web_tier.py). The SQL rows already record what was sent;
    workers still emit received/started/succeeded events for Flower.
    """
    from tasks.celery_app import app as celery_app

    celery_app.conf.task_send_sent_event = False


def settings_of(app: Flask) -> Settings:
    return app.config["SONGPIPE_SETTINGS"]
