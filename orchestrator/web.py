"""The public pages: the song form (GET /, POST /jobs), the live song page (GET /jobs/<id>) and
its cancel button (POST /jobs/<id>/cancel), plus styled error pages.

The form posts strings; `form_payload` turns them into the API's JSON shape so both paths share
one validator, and every error comes back at once next to the field that caused it, with the
user's values. `GET /?from=<id>` prefills the form from a job ("edit and resubmit"), and with
`&take=new` leaves the seed empty ("another take": same inputs, a new seed). The job id is the
capability: whoever has the song page's address may cancel it. "My songs" is kept in the
browser (localStorage), so no accounts are needed.
"""
from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf.csrf import generate_csrf, validate_csrf
from werkzeug.exceptions import HTTPException
from wtforms import ValidationError as CsrfInvalid

from orchestrator.api import QueueFull, accept_job
from orchestrator.job_views import (
    TERMINAL_JOB_STATUSES,
    TINY_CHECKPOINT_NOTICE,
    checkpoint_is_tiny,
    load_job_view,
)
from orchestrator.request_parsing import (
    RequestInvalid,
    error,
    max_audio_length_limit_ms,
    parse_job_request,
)
from tasks.contracts import JobRequest
from tasks.settings import Settings

bp = Blueprint("web", __name__)

DEFAULT_LENGTH_S = JobRequest.model_fields["max_audio_length_ms"].default / 1000
# form field -> JobRequest field, where they differ (the form asks for seconds)
FORM_TO_REQUEST = {"length_s": "max_audio_length_ms"}
REQUEST_TO_FORM = {v: k for k, v in FORM_TO_REQUEST.items()}


def _settings() -> Settings:
    return current_app.config["SONGPIPE_SETTINGS"]


def form_defaults(settings: Settings) -> dict[str, str]:
    """The model's defaults as form strings; the length is capped at what the checkpoint allows."""
    fields = JobRequest.model_fields
    length_s = DEFAULT_LENGTH_S
    limit = max_audio_length_limit_ms(settings.resolved_checkpoint_dir)
    if limit is not None and limit < DEFAULT_LENGTH_S * 1000:
        length_s = min(10.0, limit / 1000)  # the tiny checkpoint: a short noise clip is enough
    return {"lyrics": "", "style": "", "tags": "", "seed": "", "length_s": f"{length_s:g}",
            "lyrics_backend": "", "tags_backend": "",
            "temperature": f"{fields['temperature'].default:g}", "top_k": str(fields["top_k"].default),
            "cfg_scale": f"{fields['cfg_scale'].default:g}", "output_format": fields["output_format"].default}


def _number(form: dict[str, str], name: str, kind: type, errors: list[dict[str, str]]) -> Any:
    raw = form.get(name, "").strip()
    try:
        return kind(raw)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        errors.append(error(name, f"must be {noun}, got {raw!r}" if raw else "is required"))
        return None


def form_payload(form: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Form strings -> JobRequest-shaped payload, plus errors for values that are not numbers at all."""
    errors: list[dict[str, str]] = []
    # browsers send textarea line breaks as CRLF; the API's lyrics use LF
    payload: dict[str, Any] = {"lyrics": form.get("lyrics", "").replace("\r\n", "\n"),
                               "output_format": form.get("output_format", "mp3")}
    for name in ("style", "tags", "lyrics_backend", "tags_backend"):
        if form.get(name, "").strip():
            payload[name] = form[name]
    if form.get("seed", "").strip():
        payload["seed"] = _number(form, "seed", int, errors)
    payload["temperature"] = _number(form, "temperature", float, errors)
    payload["top_k"] = _number(form, "top_k", int, errors)
    payload["cfg_scale"] = _number(form, "cfg_scale", float, errors)
    length_s = _number(form, "length_s", float, errors)
    if length_s is not None:
        payload["max_audio_length_ms"] = round(length_s * 1000)
    return {k: v for k, v in payload.items() if v is not None}, errors


def all_form_errors(payload: dict[str, Any], number_errors: list[dict[str, str]],
                    settings: Settings) -> tuple[Any, list[dict[str, str]]]:
    """Every problem at once: the fields that are not numbers plus what the validator says of the rest."""
    broken = {item["field"] for item in number_errors}
    try:
        return parse_job_request(payload, settings), number_errors
    except RequestInvalid as exc:
        rest = [item for item in exc.errors if REQUEST_TO_FORM.get(item["field"].split(".")[0],
                                                                    item["field"].split(".")[0]) not in broken]
        return None, number_errors + rest


def prefill_from_job(job: dict[str, Any], new_take: bool) -> dict[str, str]:
    """Form values from a job's stored request: "edit and resubmit" keeps the seed, "another take" drops it."""
    req = job["request"] or {}
    values = {"lyrics": req.get("lyrics", ""), "style": req.get("style") or "", "tags": ", ".join(req.get("tags") or []),
              "seed": "" if new_take else str(job["seed"]), "length_s": f"{req.get('max_audio_length_ms', 0) / 1000:g}",
              "temperature": f"{req.get('temperature'):g}", "top_k": str(req.get("top_k")),
              "cfg_scale": f"{req.get('cfg_scale'):g}", "output_format": req.get("output_format", "mp3"),
              "lyrics_backend": req.get("lyrics_backend") or "", "tags_backend": req.get("tags_backend") or ""}
    return values


def _render_form(values: dict[str, str], errors: list[dict[str, str]], status: int = 200,
                 prefilled_from: dict[str, Any] | None = None, new_take: bool = False):
    settings = _settings()
    by_field: dict[str, list[str]] = {}
    for item in errors:
        name = item["field"].split(".")[0]
        by_field.setdefault(REQUEST_TO_FORM.get(name, name), []).append(item["message"])
    limit = max_audio_length_limit_ms(settings.resolved_checkpoint_dir)
    return render_template("form.html", values=values, errors=errors, field_errors=by_field,
                           csrf_token=generate_csrf(), max_length_s=limit / 1000 if limit else None,
                           tiny=checkpoint_is_tiny(settings), tiny_notice=TINY_CHECKPOINT_NOTICE,
                           prefilled_from=prefilled_from, new_take=new_take), status


@bp.get("/")
def form():
    settings = _settings()
    source_id = request.args.get("from")
    if not source_id:
        return _render_form(form_defaults(settings), [])
    job = load_job_view(settings, source_id)
    if job is None:
        abort(404, description=f"no song with id {source_id} to start from")
    new_take = request.args.get("take") == "new"
    return _render_form(prefill_from_job(job, new_take), [], prefilled_from=job, new_take=new_take)


@bp.post("/jobs")
def submit():
    settings = _settings()
    values = {**form_defaults(settings), **{k: v for k, v in request.form.items() if k != "csrf_token"}}
    try:
        validate_csrf(request.form.get("csrf_token"))
    except CsrfInvalid:
        return _render_form(values, [error("form", "the form expired; please submit it again")], 400)
    payload, number_errors = form_payload(values)
    parsed, errors = all_form_errors(payload, number_errors, settings)
    if errors:
        return _render_form(values, errors, 422)
    try:
        submitted = accept_job(parsed, settings, source="form")
    except RequestInvalid as exc:
        return _render_form(values, exc.errors, 422)
    except QueueFull as exc:  # 503 queue full, 429 rate limited (RateLimited): the page says why, and when
        page, status = _render_form(values, [error("form", str(exc))], exc.status)
        return page, status, {"Retry-After": str(exc.retry_after_s)}
    return redirect(url_for("web.job_page", job_id=submitted.id), code=303)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    settings = _settings()
    view = load_job_view(settings, job_id)
    if view is None:
        abort(404, description=f"There is no song with id {job_id}.")
    from orchestrator.song_page import song_facts

    return render_template("job.html", job=view, facts=song_facts(view, settings), tiny_notice=TINY_CHECKPOINT_NOTICE,
                           csrf_token=generate_csrf(), terminal=view["status"] in TERMINAL_JOB_STATUSES)


@bp.get("/jobs/<job_id>/waiting")
def waiting(job_id: str):
    """Why a queued job has not started yet, for the song page to show while it polls."""
    from orchestrator.song_page import waiting_reason

    settings = _settings()
    view = load_job_view(settings, job_id)
    if view is None:
        abort(404, description=f"There is no song with id {job_id}.")
    return {"waiting": waiting_reason(view, settings)}


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """The song page's Cancel button: knowing the job id is the permission to cancel it."""
    from orchestrator import replay

    try:
        validate_csrf(request.form.get("csrf_token"))
    except CsrfInvalid:
        abort(400, description="The page expired; reload it and press Cancel again.")
    try:
        replay.cancel(job_id, reason="cancelled from the song page", requested_by="song page", settings=_settings())
    except replay.JobNotFound:
        abort(404, description=f"There is no song with id {job_id}.")
    except replay.ReplayConflict:
        pass  # already finished: the page says so
    return redirect(url_for("web.job_page", job_id=job_id), code=303)


def _error_page(exc: HTTPException):
    """Styled HTML for errors on the public pages; /api and /admin keep their own handlers."""
    if request.path.startswith("/api/"):
        from orchestrator.api import _api_http_error

        return _api_http_error(exc)  # JSON errors, as the API's own handler gives them
    if request.path.startswith("/admin"):
        return exc
    return render_template("error.html", code=exc.code, title=exc.name, message=exc.description), exc.code


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    for code in (400, 404, 405, 500):
        app.register_error_handler(code, _error_page)
