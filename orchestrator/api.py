"""JSON API: submit a job, read back its public view, fetch its audio.

Errors are always {"errors": [{"field", "message"}]}. A refused submission writes nothing to SQL:
validation and admission run completely before `submit_job` opens its transaction. Every body is
built through a response model of orchestrator/schemas.py, which the OpenAPI document describes.
"""
from __future__ import annotations

import logging

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from db.engine import session_scope
from db.models import Job
from orchestrator import stream_serving
from orchestrator.admission import QueueFull, RateLimited, admit  # noqa: F401  (QueueFull: web.py imports it here)
from orchestrator.artifact_serving import artifact_response
from orchestrator.job_views import audio_artifact, job_exists, links, load_job_view
from orchestrator.request_parsing import RequestInvalid, error, error_body, json_depth_exceeds, parse_job_request
from orchestrator.schemas import Errors, JobCreated, PublicJobView
from orchestrator.submission import SubmittedJob, submit_job
from tasks.artifact_store import ArtifactUnavailable, open_store
from tasks.audio_files import song_filename
from tasks.contracts import JobRequest
from tasks.settings import Settings
from tasks.stage_inputs import song_title

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")


def _settings() -> Settings:
    return current_app.config["SONGPIPE_SETTINGS"]


def errors_response(errors: list[dict[str, str]], status: int) -> tuple[Response, int]:
    return jsonify(Errors.model_validate(error_body(errors)).model_dump(mode="json")), status


def accept_job(job_request: JobRequest, settings: Settings, *, source: str) -> SubmittedJob:
    """Admission shared by the API and the form (queue cap, per-client rate), then store and send.

    Nothing is held between the admission check and the commit/publish (admission.py).
    """
    admit(request.remote_addr)  # behind a proxy, ProxyFix (create_app) makes this the client's address
    return submit_job(job_request, settings, source=source, client_id=request.remote_addr)


def _json_body(settings: Settings) -> object:
    """The decoded body, or RequestInvalid (400) for non-JSON, malformed or too deeply nested bodies."""
    if not request.is_json:
        raise RequestInvalid([error("body", "send a JSON object with Content-Type: application/json")], 400)
    raw = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: 413 before anything is read
    if json_depth_exceeds(raw, settings.max_json_depth):
        raise RequestInvalid([error("body", f"JSON nested deeper than {settings.max_json_depth} levels")], 400)
    try:
        payload = request.get_json(silent=True)
    except RecursionError:  # cannot happen below the depth bound; kept so it never becomes a 500
        payload = None
    if payload is None:
        raise RequestInvalid([error("body", "is not valid JSON")], 400)
    return payload


@bp.post("/jobs")
def create_job():
    settings = _settings()
    try:
        job_request = parse_job_request(_json_body(settings), settings)
        submitted = accept_job(job_request, settings, source="api")
    except RequestInvalid as exc:
        return errors_response(exc.errors, exc.status)
    except QueueFull as exc:  # RateLimited (429) is a QueueFull too
        response, status = errors_response([error(exc.field, str(exc))], exc.status)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response, status
    body = JobCreated(id=submitted.id, seed=submitted.seed, seed_source=submitted.seed_source,  # type: ignore[arg-type]
                      status="queued", dispatched=submitted.dispatched, links=links(submitted.id))  # type: ignore[arg-type]
    return jsonify(body.model_dump(mode="json")), 201, {"Location": f"/api/jobs/{submitted.id}"}


def _unknown_job(job_id: str) -> tuple[Response, int]:
    return errors_response([error("id", f"no job with id {job_id!r}")], 404)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    view = load_job_view(_settings(), job_id)
    if view is None:
        return _unknown_job(job_id)
    return jsonify(PublicJobView.from_view(view).model_dump(mode="json"))  # the full record: /admin/api/jobs/<id>


@bp.get("/jobs/<job_id>/audio")
def get_audio(job_id: str):
    # The path comes from SQL (job id -> stage output sha256 -> store key), never from the client.
    settings = _settings()
    with session_scope(settings.resolved_database_url) as session:
        if not job_exists(session, job_id):
            return _unknown_job(job_id)
        artifact = audio_artifact(session, job_id)
        title = song_title((session.get_one(Job, job_id).request or {}).get("lyrics", ""))
    if artifact is None:
        return errors_response([error("audio", f"job {job_id} has no finished audio yet")], 404)
    extension = {"audio/mpeg": "mp3", "audio/wav": "wav"}.get(artifact.media_type, artifact.kind)
    try:
        return artifact_response(open_store(settings), artifact.sha256, kind=artifact.kind,
                                 media_type=artifact.media_type, download_name=song_filename(title, job_id, extension),
                                 max_age=3600)
    except ArtifactUnavailable as exc:
        log.error("job %s: %s", job_id, exc)
        return errors_response([error("audio", f"audio artifact {artifact.sha256} is missing from the store")], 410)


# the song while it is decoded: chunked WAV (orchestrator/stream_serving.py, docs/streaming.md)
bp.add_url_rule("/jobs/<job_id>/stream", view_func=stream_serving.get_stream, methods=["GET"])


def _api_http_error(exc: HTTPException):
    """JSON for HTTP errors under /api (413, 405, 404 of unknown routes ...); HTML elsewhere."""
    if not request.path.startswith("/api/"):
        return exc
    field = "body" if isinstance(exc, RequestEntityTooLarge) else "request"
    message = exc.description or exc.name
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"request body is larger than the limit of {limit} bytes"
    response, status = errors_response([error(field, message)], exc.code or 500)
    for name, value in exc.get_headers():  # keep Allow (405), Retry-After (429/503)
        if name.lower() in ("allow", "retry-after"):
            response.headers[name] = value
    return response, status


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
    stream_serving.init_app(app)
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _api_http_error)
