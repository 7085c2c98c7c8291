"""Routes of the admin dashboard: HTML pages, artifact downloads and pictures, the admin JSON API.

Every route needs a login (auth.check_access runs before each request of this blueprint); those
that change anything also need the admin role and a CSRF token. The views only read SQL and call
orchestrator.replay; they never write a stage record themselves.
"""
from __future__ import annotations

import datetime as dt
import json
import threading
from collections import OrderedDict
from typing import Any, overload

from flask import Blueprint, Response, abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError, generate_csrf
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from db.engine import session_scope
from db.models import JOB_STATUSES, Artifact, StageRun, StageStatus, StreamWindow, utcnow
from db.status import STAGE_DONE
from orchestrator import compare as compare_module
from orchestrator import images, replay
from orchestrator.admin import auth, queries, stats, workers
from orchestrator.artifact_serving import artifact_response
from tasks.artifact_store import ArtifactIntegrityError, ArtifactUnavailable, open_store
from tasks.contracts import STAGES
from tasks.pipeline.attempts import latest_runs
from tasks.settings import Settings

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="../templates",
               static_folder="../static/admin", static_url_path="/static")

CSP = ("default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
LONG_TEXT_CHARS = 400
LONG_TEXT_LINES = 8


def settings() -> Settings:
    return current_app.config["SONGPIPE_SETTINGS"]


def db():
    return session_scope(settings().resolved_database_url)


@bp.before_request
def _access():
    return auth.check_access()


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint not in ("admin.static", "admin.token_picture", "admin.waveform_picture"):
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.context_processor
def _template_globals() -> dict[str, Any]:
    return {"user": auth.current_user(), "stages": STAGES, "job_statuses": JOB_STATUSES}


# -- errors -----------------------------------------------------------------------------------

@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError):
    if auth.is_api_request():
        return jsonify(error=exc.description), 400
    return render_template("admin/error.html", code=400, message=exc.description +
                           " (the form may have expired: reload the page and try again)"), 400


@bp.errorhandler(403)
@bp.errorhandler(404)
def _http_error(exc: HTTPException):
    if auth.is_api_request():
        return jsonify(error=exc.description), exc.code
    return render_template("admin/error.html", code=exc.code, message=exc.description), exc.code


def _actor() -> str:
    """Who acts: every route that calls this is behind auth.require_admin, so someone is logged in."""
    user = auth.current_user()
    assert user is not None, "auth.require_admin lets no anonymous request through"
    return user.name


def _replay_error_status(exc: Exception) -> int:
    if isinstance(exc, replay.JobNotFound):
        return 404
    if isinstance(exc, (replay.ReplayConflict, ArtifactIntegrityError)):
        return 409
    return 400


def _api_error(exc: Exception):
    body: dict[str, Any] = {"error": str(exc), "error_type": type(exc).__name__}
    if isinstance(exc, replay.OverrideError):
        body["fields"] = exc.errors
    return jsonify(body), _replay_error_status(exc)


# -- template helpers -------------------------------------------------------------------------

@overload
def as_utc(value: dt.datetime) -> dt.datetime: ...
@overload
def as_utc(value: dt.datetime | None) -> dt.datetime | None: ...


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@bp.app_template_filter("adm_dt")
def _fmt_dt(value: dt.datetime | None) -> str:
    value = as_utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC" if value else "—"


@bp.app_template_filter("adm_dur")
def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


@bp.app_template_filter("adm_json")
def _fmt_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


@bp.app_template_filter("adm_bytes")
def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "—"
    size: float = value
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


@bp.app_template_global("adm_is_long")
def _is_long(value: Any) -> bool:
    text = value if isinstance(value, str) else _fmt_json(value)
    return len(text) > LONG_TEXT_CHARS or text.count("\n") >= LONG_TEXT_LINES


@bp.app_template_global("adm_url_with")
def _url_with(endpoint: str, args: dict[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**args, **changes}.items() if v not in (None, "")}
    return url_for(endpoint, **merged)


def job_summary(row: dict[str, Any]) -> dict[str, Any]:
    request_ = row.get("request") or {}
    lyrics = (request_.get("lyrics") or "").strip().splitlines()
    created, finished = as_utc(row["created_at"]), as_utc(row.get("finished_at"))
    return {**row, "tags": ",".join(request_.get("tags") or []), "style": request_.get("style") or "",
            "lyrics_first": lyrics[0] if lyrics else "",
            "duration_s": (finished - created).total_seconds() if finished and created else None}


def timeline(runs: list[StageRun], now: dt.datetime) -> dict[str, Any]:
    """Geometry of the Gantt strip: one row per attempt, queue wait light, run time solid."""
    label_w, width, row_h = 190, 620, 22
    stamps = [as_utc(t) for r in runs for t in (r.queued_at, r.started_at, r.finished_at) if t]
    if not stamps:
        return {"rows": [], "height": 0, "width": label_w + width, "span_s": 0}
    start = min(stamps)
    end = max(stamps + [now if any(r.status == StageStatus.RUNNING for r in runs) else max(stamps)])
    span = max((end - start).total_seconds(), 1e-3)

    def x(t: dt.datetime | None) -> float:
        return label_w + width * ((as_utc(t) - start).total_seconds() / span) if t else label_w

    ordered = sorted(runs, key=lambda r: (STAGES.index(r.stage) if r.stage in STAGES else 99, r.attempt))
    rows = []
    for i, run in enumerate(ordered):
        run_end = run.finished_at or (now if run.status == StageStatus.RUNNING else None)
        rows.append({
            "y": 18 + i * row_h, "label": f"{run.stage} #{run.attempt}", "id": run.id,
            "status": run.status,
            "wait_x": x(run.queued_at), "wait_w": max(0.0, x(run.started_at) - x(run.queued_at)) if run.started_at else 0.0,
            "run_x": x(run.started_at), "run_w": max(1.5, x(run_end) - x(run.started_at)) if run.started_at and run_end else 0.0,
            "duration": run.duration_s,
        })
    ticks = [{"x": label_w + width * f, "label": _fmt_duration(span * f)} for f in (0, 0.25, 0.5, 0.75, 1.0)]
    return {"rows": rows, "height": 26 + len(rows) * row_h, "width": label_w + width + 170, "span_s": span,
            "ticks": ticks, "label_w": label_w}


# -- login ------------------------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    next_url = request.values.get("next") or url_for("admin.jobs")
    if not next_url.startswith("/admin") or next_url.startswith("//"):
        next_url = url_for("admin.jobs")
    error = None
    if request.method == "POST":
        auth.check_csrf()
        throttle: auth.LoginThrottle = current_app.extensions["songpipe_admin_throttle"]
        client = auth.login_throttle_key(request.form.get("username", ""))
        if throttle.blocked(client):
            error = "too many failed logins; wait a minute"
        else:
            user = auth.authenticate(current_app.extensions["songpipe_admin_credentials"],
                                     request.form.get("username", ""), request.form.get("password", ""))
            if user is not None:
                auth.log_in(user)
                return redirect(next_url)
            throttle.failed(client)
            error = "wrong user name or password"
    return render_template("admin/login.html", error=error, next_url=next_url), (401 if error else 200)


@bp.route("/logout", methods=["POST"])
def logout():
    auth.log_out()
    return redirect(url_for("admin.login"))


@bp.route("/")
def index():
    return redirect(url_for("admin.jobs"))


# -- jobs list --------------------------------------------------------------------------------

def _list(args) -> tuple[queries.JobFilters, queries.JobPage, list[str]]:
    filters = queries.JobFilters.from_args(args)
    with db() as session:
        page = queries.list_jobs(session, filters)
        error_types = queries.known_error_types(session)
        used = tags_used(session, [row["id"] for row in page.rows])
    page.rows = [{**job_summary(row), "tags_used": used.get(row["id"])} for row in page.rows]
    return filters, page, error_types


def tags_used(session, job_ids: list[str]) -> dict[str, str]:
    """Each job's tags as the token stage got them (the latest finished generate_tags output)."""
    if not job_ids:
        return {}
    rows = session.scalars(select(StageRun).where(StageRun.job_id.in_(job_ids), StageRun.stage == "generate_tags",
                                                  StageRun.status.in_(STAGE_DONE))
                           .order_by(StageRun.attempt))
    return {row.job_id: row.outputs["tags_string"] for row in rows if (row.outputs or {}).get("tags_string")}


@bp.route("/jobs")
def jobs():
    try:
        filters, page, error_types = _list(request.args)
    except queries.BadFilter as exc:
        flash(str(exc), "error")
        return redirect(url_for("admin.jobs"))
    return render_template("admin/jobs.html", filters=filters, page=page, error_types=error_types,
                           args=filters.query_args(), sorts=list(queries.SORTS), page_sizes=queries.PAGE_SIZES)


@bp.route("/api/jobs")
def api_jobs():
    try:
        filters, page, _ = _list(request.args)
    except queries.BadFilter as exc:
        return jsonify(error=str(exc)), 400
    rows = [{**row, "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
             "finished_at": _iso(row["finished_at"])} for row in page.rows]
    return jsonify(jobs=rows, counts=page.counts, total=page.total, next_cursor=page.next_cursor,
                   next_page=page.next_page)


def _iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


# -- one job ----------------------------------------------------------------------------------

@bp.route("/jobs/<job_id>")
def job_detail(job_id: str):
    with db() as session:
        record = queries.job_record(session, job_id)
        if record is None:
            abort(404, description=f"job {job_id} does not exist")
        now = utcnow()
        runs_by_stage: dict[str, list[StageRun]] = {s: [] for s in STAGES}
        for run in record.runs:
            runs_by_stage.setdefault(run.stage, []).append(run)
        latest = latest_runs(record.runs)
        latest_attempt = {s: latest[s].attempt if s in latest else 0 for s in runs_by_stage}
        token_run = next((r for r in reversed(record.runs) if r.stage == "generate_tokens" and r.inputs), None)
        return render_template("admin/job.html", record=record, job=record.job, runs_by_stage=runs_by_stage,
                               latest_attempt=latest_attempt, timeline=timeline(record.runs, now),
                               token_inputs=token_run.inputs if token_run else None,
                               overridable=replay.OVERRIDABLE, request_=record.job.request)


@bp.route("/api/jobs/<job_id>")
def api_job(job_id: str):
    with db() as session:
        record = queries.job_record(session, job_id)
        if record is None:
            return jsonify(error=f"job {job_id} does not exist"), 404
        job = record.job
        columns = [c.key for c in StageRun.__table__.columns]
        runs = [{c: _jsonable(getattr(run, c)) for c in columns} for run in record.runs]
        body = {c.key: _jsonable(getattr(job, c.key)) for c in job.__table__.columns}
        window_columns = [c.key for c in StreamWindow.__table__.columns if c.key not in ("id", "job_id")]
        body.update(stage_runs=runs, replays=[r["id"] for r in record.replays],
                    stream_windows=[{c: _jsonable(getattr(w, c)) for c in window_columns} for w in record.windows],
                    artifacts={sha: {"kind": a.kind, "bytes": a.bytes, "media_type": a.media_type}
                               for sha, a in record.artifacts.items()})
        return jsonify(body)


def _jsonable(value: Any) -> Any:
    return _iso(value) if isinstance(value, dt.datetime) else value


@bp.route("/api/jobs/<job_id>/progress")
def api_progress(job_id: str):
    with db() as session:
        snapshot = queries.progress_snapshot(session, job_id)
    if snapshot is None:
        return jsonify(error=f"job {job_id} does not exist"), 404
    return jsonify(snapshot)


# -- actions: retry, re-run as new, cancel ----------------------------------------------------

def _overrides_from_form(form) -> dict[str, Any]:
    parsers = {"seed": int, "temperature": float, "top_k": int, "cfg_scale": float, "max_audio_length_ms": int}
    overrides: dict[str, Any] = {}
    for name in replay.OVERRIDABLE:
        raw = form.get(name, "")
        if not raw.strip():
            continue
        if name != "lyrics":  # lyrics keep their whitespace as typed
            raw = raw.strip()
        if name in parsers:
            try:
                overrides[name] = parsers[name](raw)
            except ValueError as exc:
                raise replay.OverrideError(f"override {name!r}: {raw!r} is not a valid number",
                                           errors={name: "not a number"}) from exc
        else:
            overrides[name] = raw
    return overrides


@bp.route("/jobs/<job_id>/retry", methods=["POST"])
@auth.require_admin
def retry_job(job_id: str):
    try:
        result = replay.retry(job_id, request.form.get("from_stage") or None, settings=settings(),
                              requested_by=_actor())
    except (replay.ReplayError, ArtifactIntegrityError) as exc:
        flash(f"retry refused: {exc}", "error")
    else:
        attempts = ", ".join(f"{s} #{a}" for s, a in result.attempts.items())
        flash(f"retry queued from {result.from_stage}: {attempts}", "ok")
    return redirect(url_for("admin.job_detail", job_id=job_id))


@bp.route("/jobs/<job_id>/rerun", methods=["POST"])
@auth.require_admin
def rerun_job(job_id: str):
    try:
        overrides = _overrides_from_form(request.form)
        result = replay.rerun_as_new(job_id, request.form.get("from_stage") or "refine_lyrics", overrides,
                                     settings=settings(), requested_by=_actor())
    except (replay.ReplayError, ArtifactIntegrityError) as exc:
        flash(f"re-run refused: {exc}", "error")
        return redirect(url_for("admin.job_detail", job_id=job_id))
    flash(f"re-run of {job_id} queued as a new job from {result.from_stage}", "ok")
    return redirect(url_for("admin.job_detail", job_id=result.job_id))


@bp.route("/jobs/<job_id>/cancel", methods=["POST"])
@auth.require_admin
def cancel_job(job_id: str):
    try:
        changed = replay.cancel(job_id, reason=request.form.get("reason") or None,
                                requested_by=_actor(), settings=settings())
    except replay.ReplayError as exc:
        flash(f"cancel refused: {exc}", "error")
    else:
        flash("cancel requested" if changed else "cancel was already requested", "ok")
    return redirect(url_for("admin.job_detail", job_id=job_id))


def _json_body(fields: tuple[str, ...] | None = None, usage: str = "") -> dict[str, Any]:
    """The JSON object of the request ({} without one); with `fields`, any other key is refused."""
    body = request.get_json(silent=True)
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise replay.ReplayError("the request body must be a JSON object")
    unknown = set(body) - set(fields) if fields is not None else set()
    if unknown:
        raise replay.ReplayError(f"unknown field(s) {', '.join(sorted(unknown))}; {usage}")
    for name in ("from_stage", "reason"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise replay.ReplayError(f"{name} must be a string, got {type(body[name]).__name__}")
    return body


def _api_replay(fields: tuple[str, ...], usage: str, start) -> tuple[Response, int]:
    """A JSON replay verb: check the body, call `start(body)`, answer 202 with the result (or the error)."""
    try:
        result = start(_json_body(fields, usage))
    except (replay.ReplayError, ArtifactIntegrityError) as exc:
        return _api_error(exc)
    return jsonify(result.as_dict()), 202


@bp.route("/api/jobs/<job_id>/retry", methods=["POST"])
@auth.require_admin
def api_retry(job_id: str):
    return _api_replay(("from_stage",), "retry takes from_stage", lambda body: replay.retry(
        job_id, body.get("from_stage"), settings=settings(), requested_by=_actor()))


def _rerun(job_id: str, body: dict[str, Any]) -> replay.ReplayResult:
    overrides = body.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise replay.OverrideError("overrides must be a JSON object", errors={"overrides": "not an object"})
    return replay.rerun_as_new(job_id, body.get("from_stage") or "refine_lyrics", overrides,
                               settings=settings(), requested_by=_actor())


@bp.route("/api/jobs/<job_id>/rerun", methods=["POST"])
@auth.require_admin
def api_rerun(job_id: str):
    return _api_replay(("from_stage", "overrides"), "re-run takes from_stage and overrides",
                       lambda body: _rerun(job_id, body))


@bp.route("/api/jobs/<job_id>/cancel", methods=["POST"])
@auth.require_admin
def api_cancel(job_id: str):
    try:
        body = _json_body()
        changed = replay.cancel(job_id, reason=body.get("reason"), requested_by=_actor(),
                                settings=settings())
    except replay.ReplayError as exc:
        return _api_error(exc)
    return jsonify(job_id=job_id, cancel_requested=True, changed=changed), 202


@bp.route("/api/csrf")
def api_csrf():
    """The token a JSON client sends back in the X-CSRFToken header (bound to its session)."""
    return jsonify(csrf_token=generate_csrf())


# -- compare ----------------------------------------------------------------------------------

@bp.route("/compare")
def compare_page():
    a, b = request.args.get("a", "").strip(), request.args.get("b", "").strip()
    with db() as session:  # the template reads the compared rows, so it renders inside the session
        # the picker: the original, replays and siblings of A (plain job ids only)
        related = compare_module.related_jobs(session, a) if a and not a.startswith("run:") else []
        context = {"a": a, "b": b, "related": related, "comparison": None, "error": None, "audio": {}}
        if not (a and b):
            return render_template("admin/compare.html", **context)
        try:
            comparison = compare_module.compare(session, a, b)
        except compare_module.CompareError as exc:
            return render_template("admin/compare.html", **{**context, "error": str(exc)}), 400
        context["audio"] = {side: compare_module.final_audio_sha(session, job.id)
                            for side, job in (("a", comparison.job_a), ("b", comparison.job_b)) if job is not None}
        return render_template("admin/compare.html", **{**context, "comparison": comparison})


@bp.route("/api/compare")
def api_compare():
    with db() as session:
        try:
            comparison = compare_module.compare(session, request.args.get("a", ""), request.args.get("b", ""))
        except compare_module.CompareError as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(comparison.as_dict())


# -- workers, stats ---------------------------------------------------------------------------

@bp.route("/workers")
def workers_page():
    with db() as session:
        overview = workers.workers_overview(session, settings(), live=request.args.get("live", "1") != "0")
    return render_template("admin/workers.html", overview=overview, now=utcnow())


@bp.route("/api/workers")
def api_workers():
    with db() as session:
        overview = workers.workers_overview(session, settings())
    return Response(json.dumps(overview, default=_json_default), mimetype="application/json")


MAX_WINDOW_HOURS = 24 * 90


def _window_hours() -> int:
    """The stats window; a bad `hours` is a 400 naming it, never a silent week."""
    raw = request.args.get("hours")
    if raw is None or raw == "":
        return 24 * 7
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WINDOW_HOURS:
        abort(400, description=f"hours must be a whole number from 1 to {MAX_WINDOW_HOURS}, got {raw!r}")
    return int(raw)


@bp.route("/stats")
def stats_page():
    with db() as session:
        overview = stats.stats_overview(session, _window_hours())
    return render_template("admin/stats.html", overview=overview, windows=stats.WINDOWS_H)


@bp.route("/api/stats")
def api_stats():
    with db() as session:
        overview = stats.stats_overview(session, _window_hours())
    return Response(json.dumps(overview, default=_json_default), mimetype="application/json")


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _iso(value)
    return str(value)


# -- artifacts --------------------------------------------------------------------------------

def _artifact(sha256: str) -> Artifact:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        abort(404, description="not an artifact id")
    with db() as session:
        artifact = session.get(Artifact, sha256)
    if artifact is None:
        abort(404, description=f"artifact {sha256} is not recorded")
    return artifact


@bp.route("/artifacts/<sha256>")
def artifact_file(sha256: str):
    artifact = _artifact(sha256)
    extension = {"tokens": "npy", "wav": "wav", "mp3": "mp3"}.get(artifact.kind, "bin")
    try:
        return artifact_response(open_store(settings()), sha256, kind=artifact.kind, media_type=artifact.media_type,
                                 download_name=f"{artifact.kind}-{sha256[:12]}.{extension}", max_age=0,
                                 as_attachment=request.args.get("download") == "1")
    except ArtifactUnavailable:
        abort(404, description=f"artifact {sha256} is recorded but missing from the store")


class _PictureCache:
    """Pictures of content-addressed artifacts never change: keep the last few in memory."""

    def __init__(self, size: int = 64):
        self.size, self._lock = size, threading.Lock()
        self._items: OrderedDict[tuple, bytes] = OrderedDict()

    def get(self, key: tuple, make) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


_pictures = _PictureCache()


def _picture(sha256: str, kind: str, draw) -> Response:
    artifact = _artifact(sha256)
    store = open_store(settings())
    try:
        data = _pictures.get((sha256, kind), lambda: draw(artifact, store.get(sha256, artifact.kind)))
    except ArtifactIntegrityError as exc:
        abort(404, description=str(exc))
    except ValueError as exc:
        abort(404, description=f"cannot draw artifact {sha256}: {exc}")
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=86400, immutable"
    return response


@bp.route("/artifacts/<sha256>/tokens.png")
def token_picture(sha256: str):
    def draw(artifact: Artifact, data: bytes) -> bytes:
        if artifact.kind != "tokens":
            raise ValueError(f"it is a {artifact.kind} artifact, not tokens")
        return images.token_grid_png(images.load_tokens(data))
    return _picture(sha256, "tokens", draw)


@bp.route("/artifacts/<sha256>/waveform.png")
def waveform_picture(sha256: str):
    def draw(artifact: Artifact, data: bytes) -> bytes:
        if artifact.kind != "wav":
            raise ValueError(f"it is a {artifact.kind} artifact, not wav")
        return images.waveform_png(data)
    return _picture(sha256, "waveform", draw)
