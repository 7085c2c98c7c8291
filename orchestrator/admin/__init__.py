"""The admin dashboard: task inspection, replay of failed jobs, workers and stats (login required)."""
from __future__ import annotations

from flask import Flask

from tasks.settings import Settings


def register(app: Flask) -> None:
    """Mount /admin on `app`. In production mode this refuses to start without configured password hashes."""
    from orchestrator.admin.auth import init_auth
    from orchestrator.admin.views import bp

    settings: Settings = app.config["SONGPIPE_SETTINGS"]
    init_auth(app, settings)
    app.register_blueprint(bp)
