"""`songpipe web` serves through gunicorn: bounded workers and threads, timeouts, graceful restarts.

Always gunicorn, development included: one server path, the one production runs, is the one the
tests run (every stack the tests start serves through it). Linux and macOS only, as gunicorn is.

- workers x threads (SONGPIPE_WEB_WORKERS, SONGPIPE_WEB_THREADS) bound the requests served at
  once; further connections wait in the listen backlog instead of each getting a thread.
- SONGPIPE_WEB_TIMEOUT_S: a worker silent for longer (a request stuck) is killed and replaced.
- SIGHUP: new workers start with the new code/config, old ones finish their requests (graceful
  restart); SIGTERM: stop accepting, finish in-flight requests within SONGPIPE_WEB_GRACEFUL_TIMEOUT_S.
- workers are recycled after SONGPIPE_WEB_MAX_REQUESTS requests (with jitter) against slow leaks.

The app is built once in the master before forking (preload), so a configuration error (old
schema, production without password hashes or with fault injection) stops `songpipe web` with
its message instead of a crash loop of workers; SQL connections are closed before each fork so
no worker shares the master's sockets.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from tasks.settings import Settings


def gunicorn_options(settings: Settings, host: str, port: int, *, workers: int | None = None,
                     threads: int | None = None) -> dict[str, Any]:
    return {
        "bind": [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"],
        "workers": workers or settings.web_workers,
        "threads": threads or settings.web_threads,
        "worker_class": "gthread",
        "timeout": settings.web_timeout_s,
        "graceful_timeout": settings.web_graceful_timeout_s,
        "keepalive": settings.web_keepalive_s,
        "max_requests": settings.web_max_requests,
        "max_requests_jitter": settings.web_max_requests // 10,
        "preload_app": True,
        "accesslog": "-",
        "errorlog": "-",
        "proc_name": "songpipe-web",
        # ProxyFix (create_app, SONGPIPE_PROXY_HOPS) decides which forwarded headers count, not gunicorn
        "forwarded_allow_ips": "127.0.0.1,::1",
        "pre_fork": _close_sql_connections,
        # gunicorn's runtime control socket defaults to one per-user path that two servers would share;
        # signals (HUP, TERM, TTIN/TTOU) are the management interface here
        "control_socket_disable": True,
    }


def _close_sql_connections(_server: Any, _worker: Any) -> None:
    from db.engine import dispose_engines

    dispose_engines()


class SongpipeServer(BaseApplication):
    def __init__(self, make_app: Callable[[], Any], options: dict[str, Any]):
        self._make_app, self._options = make_app, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._make_app()


def serve(make_app: Callable[[], Any], settings: Settings, host: str, port: int, *, workers: int | None = None,
          threads: int | None = None) -> None:
    """Run gunicorn in this process until it is stopped (returns nothing; exits on fatal errors)."""
    SongpipeServer(make_app, gunicorn_options(settings, host, port, workers=workers, threads=threads)).run()
