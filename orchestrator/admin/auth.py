"""Who may see the dashboard and who may act on it: login, roles, session expiry and CSRF.

Two users come from Settings: an admin (may replay and cancel) and an optional read-only viewer.
Passwords are werkzeug hashes, never plain text in settings. In development, when no admin hash is
configured, a random password is generated once per data directory (its hash kept next to it);
production refuses to start the dashboard without configured hashes.

CSRF: every state-changing admin request (form or JSON) must carry the Flask-WTF token, in the
`csrf_token` form field or the `X-CSRFToken` header. The check is scoped to the admin blueprint, so
the public JSON API (POST /api/jobs) is not affected; it is compatible with an app-wide
CSRFProtect (same token, same session key) if one is added later.
"""
from __future__ import annotations

import collections
import functools
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
from flask import Flask, abort, current_app, g, jsonify, redirect, request, session, url_for
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from werkzeug.security import check_password_hash, generate_password_hash

from tasks.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("admin", "viewer")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
GENERATED_PASSWORD_FILE = "admin_password"
GENERATED_HASH_FILE = "admin_password.hash"
# a hash that no password matches, checked for unknown users so a wrong user name costs the same time
_DUMMY_HASH = generate_password_hash(secrets.token_hex(16), method="pbkdf2:sha256:1000")
LOGIN_FAILURES_PER_MINUTE = 10
LOGIN_THROTTLE_KEYS = 4096  # (user, address) pairs with recent failures kept per web process


class AdminConfigurationError(RuntimeError):
    pass


def hash_password(password: str) -> str:
    """The werkzeug hash to put in SONGPIPE_ADMIN_PASSWORD_HASH / SONGPIPE_VIEWER_PASSWORD_HASH."""
    if len(password) < 8:
        raise ValueError("a dashboard password needs at least 8 characters")
    return generate_password_hash(password)


@click.command("hash-password")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
def hash_password_command(password: str) -> None:
    """Print the hash of a dashboard password (for SONGPIPE_ADMIN_PASSWORD_HASH)."""
    click.echo(hash_password(password))


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def can_act(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Credentials:
    users: dict[str, tuple[str, str]]  # name -> (password hash, role)
    generated_password_file: Path | None = None


def _generated_admin_hash(settings: Settings) -> tuple[str, Path]:
    """Development only: a random admin password made once per data dir; its hash is reused after."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    password_file, hash_file = data_dir / GENERATED_PASSWORD_FILE, data_dir / GENERATED_HASH_FILE
    if hash_file.exists():
        return hash_file.read_text().strip(), password_file
    password = secrets.token_urlsafe(18)
    for path, text in ((password_file, password + "\n"), (hash_file, generate_password_hash(password) + "\n")):
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(text)
    return hash_file.read_text().strip(), password_file


def load_credentials(settings: Settings) -> Credentials:
    users: dict[str, tuple[str, str]] = {}
    generated: Path | None = None
    admin_hash = settings.admin_password_hash
    if not admin_hash:
        if settings.mode == "production":
            raise AdminConfigurationError(
                "the admin dashboard needs SONGPIPE_ADMIN_PASSWORD_HASH in production mode "
                "(make one with `songpipe admin hash-password`); refusing to start without it")
        admin_hash, generated = _generated_admin_hash(settings)
        log.warning("admin dashboard: no SONGPIPE_ADMIN_PASSWORD_HASH configured; user %r has a generated "
                    "password, readable only by this account, in %s", settings.admin_user, generated)
    users[settings.admin_user] = (admin_hash, "admin")
    if settings.viewer_password_hash:
        if settings.viewer_user == settings.admin_user:
            raise AdminConfigurationError("viewer_user and admin_user must differ")
        users[settings.viewer_user] = (settings.viewer_password_hash, "viewer")
    return Credentials(users=users, generated_password_file=generated)


class LoginThrottle:
    """At most N failed logins per minute per (user name, client address): slows password guessing.

    Keyed by both, so a flood of wrong passwords from one address (or against one made-up name)
    never locks the real admin out from another address - behind a proxy, ProxyFix (create_app,
    SONGPIPE_PROXY_HOPS) makes the address the client's, not the proxy's. Only failures create
    entries, and at most `max_keys` are kept (least recently failed dropped first), so many clients
    cannot grow it without bound. Per web process: a guesser spread over processes gets N each.
    """

    def __init__(self, per_minute: int = LOGIN_FAILURES_PER_MINUTE, max_keys: int = LOGIN_THROTTLE_KEYS):
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._failures: collections.OrderedDict[tuple[str, str], collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._failures)

    def blocked(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = self._failures.get(key)
            if recent is None:
                return False  # looking does not create an entry
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if not recent:
                del self._failures[key]
                return False
            return len(recent) >= self.per_minute

    def failed(self, key: tuple[str, str]) -> None:
        with self._lock:
            recent = self._failures.pop(key, None) or collections.deque(maxlen=self.per_minute)
            recent.append(time.monotonic())
            self._failures[key] = recent  # most recent last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)


def login_throttle_key(username: str) -> tuple[str, str]:
    """(user name, client address) of the login request being handled."""
    return username[:128], request.remote_addr or "unknown"


def authenticate(credentials: Credentials, name: str, password: str) -> User | None:
    match = None
    for user, (pw_hash, role) in credentials.users.items():
        if hmac.compare_digest(user.encode(), name.encode()):
            match = (user, pw_hash, role)
    if match is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    user, pw_hash, role = match
    return User(user, role) if check_password_hash(pw_hash, password) else None


# -- the session ------------------------------------------------------------------------------

def log_in(user: User) -> None:
    session.clear()
    session.permanent = True
    session["admin_user"], session["admin_role"] = user.name, user.role
    session["admin_seen"] = time.time()


def log_out() -> None:
    for key in ("admin_user", "admin_role", "admin_seen"):
        session.pop(key, None)


def current_user() -> User | None:
    """The logged-in user, or None when absent or idle longer than session_minutes."""
    if "admin_user_obj" in g:
        return g.admin_user_obj
    user = None
    name, role, seen = session.get("admin_user"), session.get("admin_role"), session.get("admin_seen")
    credentials: Credentials = current_app.extensions["songpipe_admin_credentials"]
    minutes = current_app.config["SONGPIPE_SETTINGS"].session_minutes
    if name and role in ROLES and isinstance(seen, (int, float)):
        known = credentials.users.get(name)
        if known is not None and known[1] == role and time.time() - seen <= minutes * 60:
            user = User(name, role)
            session["admin_seen"] = time.time()
        else:
            log_out()
    g.admin_user_obj = user
    return user


def is_api_request() -> bool:
    return request.path.startswith("/admin/api/")


def check_access() -> object | None:
    """before_request of the admin blueprint: login for everything but the login page and static."""
    if request.endpoint in ("admin.login", "admin.static"):
        return None
    user = current_user()
    if user is None:
        if is_api_request():
            return jsonify(error="login required"), 401
        return redirect(url_for("admin.login", next=request.full_path if request.query_string else request.path))
    if request.method not in SAFE_METHODS:
        check_csrf()
    return None


def check_csrf() -> None:
    token = request.headers.get("X-CSRFToken") or request.headers.get("X-CSRF-Token")
    if token is None and not request.is_json:
        token = request.form.get("csrf_token")
    try:
        validate_csrf(token)
    except Exception as exc:  # flask_wtf raises ValidationError with a reason
        raise CSRFError(f"CSRF check failed: {exc}") from exc


def require_admin(view: Callable) -> Callable:
    """State-changing views: role admin only (a viewer gets 403)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        user = current_user()
        if user is None or not user.can_act:
            if is_api_request():
                return jsonify(error="this action needs the admin role"), 403
            abort(403, description="this action needs the admin role; you are logged in read-only")
        return view(*args, **kwargs)

    return wrapper


def init_auth(app: Flask, settings: Settings) -> Credentials:
    credentials = load_credentials(settings)
    app.extensions["songpipe_admin_credentials"] = credentials
    app.extensions["songpipe_admin_throttle"] = LoginThrottle()
    if credentials.generated_password_file is not None:
        print(f"songpipe admin: log in at /admin as {settings.admin_user!r} with the password in "
              f"{credentials.generated_password_file}", flush=True)
    app.jinja_env.globals.setdefault("csrf_token", generate_csrf)
    return credentials
