"""Flask application factory: one app per Settings, blueprints per area (form, API, admin)."""
from __future__ import annotations

import secrets
from pathlib import Path

from flask import Flask

from db.schema import require_current_schema
from tasks.settings import Settings, get_settings


def _secret_key(settings: Settings) -> str:
    """The configured key, else one generated once per data directory (sessions survive restarts)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    path: Path = settings.data_dir / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def create_app(settings: Settings | None = None, *, check_schema: bool = True) -> Flask:
    settings = settings or get_settings()
    if check_schema:
        require_current_schema(settings.resolved_database_url)  # refuse to serve on an old schema
    app = Flask(__name__)
    app.config.update(
        SONGPIPE_SETTINGS=settings,
        SECRET_KEY=_secret_key(settings),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=settings.session_minutes * 60,
    )
    from orchestrator.web import register as register_web
    from orchestrator.api import register as register_api
    from orchestrator.admin import register as register_admin
    from orchestrator.openapi import register as register_openapi
    from orchestrator.metrics_view import register as register_metrics

    register_web(app)
    register_api(app)
    register_admin(app)
    register_openapi(app)
    register_metrics(app)
    return app


def settings_of(app: Flask) -> Settings:
    return app.config["SONGPIPE_SETTINGS"]
