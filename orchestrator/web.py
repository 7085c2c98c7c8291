"""The public pages: the song form (GET /, POST /jobs) and the live job page (GET /jobs/<id>).

The form posts strings; `form_payload` turns them into the API's JSON shape so both paths share
one validator, and errors come back next to the field that caused them, with the user's values.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, abort, current_app, redirect, render_template, request, url_for
from flask_wtf.csrf import generate_csrf, validate_csrf
from wtforms import ValidationError as CsrfInvalid

from orchestrator.api import QueueFull, accept_job
from orchestrator.job_views import TINY_CHECKPOINT_NOTICE, checkpoint_is_tiny, load_job_view
from orchestrator.request_parsing import RequestInvalid, error, max_audio_length_limit_ms, parse_job_request
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
    payload: dict[str, Any] = {"lyrics": form.get("lyrics", ""), "output_format": form.get("output_format", "mp3")}
    if form.get("style", "").strip():
        payload["style"] = form["style"]
    if form.get("tags", "").strip():
        payload["tags"] = form["tags"]
    if form.get("seed", "").strip():
        payload["seed"] = _number(form, "seed", int, errors)
    payload["temperature"] = _number(form, "temperature", float, errors)
    payload["top_k"] = _number(form, "top_k", int, errors)
    payload["cfg_scale"] = _number(form, "cfg_scale", float, errors)
    length_s = _number(form, "length_s", float, errors)
    if length_s is not None:
        payload["max_audio_length_ms"] = round(length_s * 1000)
    return {k: v for k, v in payload.items() if v is not None}, errors


def _render_form(values: dict[str, str], errors: list[dict[str, str]], status: int = 200):
    settings = _settings()
    by_field: dict[str, list[str]] = {}
    for item in errors:
        name = item["field"].split(".")[0]
        by_field.setdefault(REQUEST_TO_FORM.get(name, name), []).append(item["message"])
    limit = max_audio_length_limit_ms(settings.resolved_checkpoint_dir)
    return render_template("form.html", values=values, errors=errors, field_errors=by_field,
                           csrf_token=generate_csrf(), max_length_s=limit / 1000 if limit else None,
                           tiny=checkpoint_is_tiny(settings), tiny_notice=TINY_CHECKPOINT_NOTICE), status


@bp.get("/")
def form():
    return _render_form(form_defaults(_settings()), [])


@bp.post("/jobs")
def submit():
    settings = _settings()
    values = {**form_defaults(settings), **{k: v for k, v in request.form.items() if k != "csrf_token"}}
    try:
        validate_csrf(request.form.get("csrf_token"))
    except CsrfInvalid:
        return _render_form(values, [error("form", "the form expired; please submit it again")], 400)
    payload, errors = form_payload(values)
    if errors:
        return _render_form(values, errors, 422)
    try:
        submitted = accept_job(parse_job_request(payload, settings), settings, source="form")
    except RequestInvalid as exc:
        return _render_form(values, exc.errors, 422)
    except QueueFull as exc:  # 503 queue full, 429 rate limited (RateLimited): the page says why, and when
        page, status = _render_form(values, [error("form", str(exc))], exc.status)
        return page, status, {"Retry-After": str(exc.retry_after_s)}
    return redirect(url_for("web.job_page", job_id=submitted.id), code=303)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str):
    view = load_job_view(_settings(), job_id)
    if view is None:
        abort(404, description=f"no job with id {job_id}")
    return render_template("job.html", job=view, tiny_notice=TINY_CHECKPOINT_NOTICE)


def register(app: Flask) -> None:
    app.register_blueprint(bp)
