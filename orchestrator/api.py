"""JSON API: submit a job, read it back with every stage row, fetch its audio.

Errors are always {"errors": [{"field", "message"}]}. A refused submission writes nothing to SQL:
validation runs completely before `submit_job` opens its transaction.
"""
from __future__ import annotations

import logging

from flask import Blueprint, Flask, Response, current_app, jsonify, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from db.engine import session_scope
from db.models import Job
from orchestrator.admission import QueueFull, RateLimited, admitted  # noqa: F401  (QueueFull: web.py imports it here)
from orchestrator.job_views import audio_artifact, job_exists, links, load_job_view
from orchestrator.request_parsing import RequestInvalid, error, error_body, parse_job_request
from orchestrator.submission import SubmittedJob, submit_job
from tasks.artifact_store import open_store
from tasks.audio_files import song_filename
from tasks.contracts import JobRequest
from tasks.settings import Settings
from tasks.stage_inputs import song_title

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")


def _settings() -> Settings:
    return current_app.config["SONGPIPE_SETTINGS"]


def errors_response(errors: list[dict[str, str]], status: int) -> tuple[Response, int]:
    return jsonify(error_body(errors)), status


def accept_job(job_request: JobRequest, settings: Settings, *, source: str) -> SubmittedJob:
    """Admission control shared by the API and the form: queue cap and per-client rate (admission.py)."""
    with admitted(settings, request.remote_addr):
        return submit_job(job_request, settings, source=source, client_id=request.remote_addr)


@bp.post("/jobs")
def create_job():
    if not request.is_json:
        return errors_response([error("body", "send a JSON object with Content-Type: application/json")], 400)
    payload = request.get_json(silent=True)
    if payload is None:
        return errors_response([error("body", "is not valid JSON")], 400)
    settings = _settings()
    try:
        job_request = parse_job_request(payload, settings)
        submitted = accept_job(job_request, settings, source="api")
    except RequestInvalid as exc:
        return errors_response(exc.errors, exc.status)
    except QueueFull as exc:  # RateLimited (429) is a QueueFull too
        response, status = errors_response([error(exc.field, str(exc))], exc.status)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response, status
    body = {"id": submitted.id, "seed": submitted.seed, "seed_source": submitted.seed_source,
            "status": "queued", "dispatched": submitted.dispatched, "links": links(submitted.id)}
    return jsonify(body), 201, {"Location": f"/api/jobs/{submitted.id}"}


def _unknown_job(job_id: str) -> tuple[Response, int]:
    return errors_response([error("id", f"no job with id {job_id!r}")], 404)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    view = load_job_view(_settings(), job_id)
    if view is None:
        return _unknown_job(job_id)
    return jsonify(view)


@bp.get("/jobs/<job_id>/audio")
def get_audio(job_id: str):
    # The path comes from SQL (job id -> stage output sha256 -> store key), never from the client.
    settings = _settings()
    with session_scope(settings.resolved_database_url) as session:
        if not job_exists(session, job_id):
            return _unknown_job(job_id)
        artifact = audio_artifact(session, job_id)
        title = song_title((session.get(Job, job_id).request or {}).get("lyrics", ""))
    if artifact is None:
        return errors_response([error("audio", f"job {job_id} has no finished audio yet")], 404)
    path = open_store(settings.resolved_artifact_dir).local_path(artifact.sha256)
    if not path.is_file():
        log.error("job %s: audio artifact %s is recorded but missing at %s", job_id, artifact.sha256, path)
        return errors_response([error("audio", f"audio artifact {artifact.sha256} is missing from the store")], 410)
    extension = {"audio/mpeg": "mp3", "audio/wav": "wav"}.get(artifact.media_type, artifact.kind)
    return send_file(path, mimetype=artifact.media_type, conditional=True, etag=artifact.sha256,
                     download_name=song_filename(title, job_id, extension), max_age=3600)


def _api_http_error(exc: HTTPException):
    """JSON for HTTP errors under /api (413, 405, 404 of unknown routes ...); HTML elsewhere."""
    if not request.path.startswith("/api/"):
        return exc
    field = "body" if isinstance(exc, RequestEntityTooLarge) else "request"
    message = exc.description or exc.name
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"request body is larger than the limit of {limit} bytes"
    return errors_response([error(field, message)], exc.code or 500)


@bp.errorhandler(Exception)
def _api_unexpected_error(exc: Exception):
    """Anything else raised in an API view still answers JSON; the details go to the log."""
    if isinstance(exc, HTTPException):
        return _api_http_error(exc)
    from kombu.exceptions import OperationalError

    if isinstance(exc, OperationalError):
        log.error("broker unavailable while sending a chain: %s", exc)
        return errors_response([error("broker", "the task queue is unavailable; try again shortly")], 503)
    log.exception("unexpected error in %s %s", request.method, request.path)
    return errors_response([error("server", f"internal error ({type(exc).__name__}); see the server log")], 500)


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _api_http_error)
