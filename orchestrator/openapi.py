"""The OpenAPI 3 description of the JSON API, served at /api/openapi.json.

The request body schema is generated from the same pydantic model the API validates with
(tasks.contracts.JobRequest), so the document cannot drift from what the server accepts;
it is written as OpenAPI 3.0 (nullable instead of JSON Schema's null type) for the widest tooling.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from flask import Blueprint, Flask, jsonify

from db.models import JOB_STATUSES, STAGE_STATUSES
from tasks.contracts import MAX_TAGS, JobRequest

bp = Blueprint("openapi", __name__)

JOB_ID = {"type": "string", "description": "32 lower-case hex digits (uuid4); unknown ids answer 404"}
ERRORS = {
    "type": "object", "required": ["errors"], "additionalProperties": False,
    "properties": {"errors": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["field", "message"], "additionalProperties": False,
        "properties": {"field": {"type": "string", "minLength": 1,
                                 "description": "the request field at fault (dotted path), or body/client/id"},
                       "message": {"type": "string", "minLength": 1}}}}},
}
LINKS = {"type": "object", "properties": {k: {"type": "string"} for k in ("self", "page", "audio")}}
STAGE_RUN = {
    "type": "object", "required": ["stage", "attempt", "status", "queue"],
    "properties": {
        "stage": {"type": "string"}, "attempt": {"type": "integer", "minimum": 1},
        "status": {"type": "string", "enum": list(STAGE_STATUSES)}, "queue": {"type": "string"},
        "inputs": {"type": "object", "nullable": True}, "outputs": {"type": "object", "nullable": True},
        "error_type": {"type": "string", "nullable": True}, "error_message": {"type": "string", "nullable": True},
        "progress": {"type": "object", "nullable": True}, "deliveries": {"type": "integer"},
    },
}
JOB = {
    "type": "object", "required": ["id", "status", "seed", "request", "stages", "links"],
    "properties": {
        "id": JOB_ID, "status": {"type": "string", "enum": list(JOB_STATUSES)},
        "seed": {"type": "integer"}, "seed_source": {"type": "string"},
        "request": {"type": "object"}, "pipeline": {"type": "string"},
        "failed_stage": {"type": "string", "nullable": True},
        "error_type": {"type": "string", "nullable": True}, "error_message": {"type": "string", "nullable": True},
        "links": LINKS, "stages": {"type": "array", "items": {"$ref": "#/components/schemas/StageRun"}},
    },
}
CREATED = {
    "type": "object", "required": ["id", "seed", "seed_source", "status", "links"],
    "properties": {"id": JOB_ID, "seed": {"type": "integer"}, "seed_source": {"type": "string"},
                   "status": {"type": "string", "enum": ["queued"]}, "links": LINKS,
                   "dispatched": {"type": "boolean",
                                  "description": "false: stored, broker unavailable; the reconciler sends it"}},
}


def _openapi30(schema: Any) -> Any:
    """JSON Schema 2020-12 as pydantic writes it -> the OpenAPI 3.0 dialect."""
    if isinstance(schema, list):
        return [_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi30(v) for k, v in schema.items() if k not in ("title", "default")}
    options = out.get("anyOf")
    if options and any(o == {"type": "null"} for o in options):
        rest = [o for o in options if o != {"type": "null"}]
        del out["anyOf"]
        out.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        out["nullable"] = True
    if isinstance(out.get("exclusiveMinimum"), (int, float)) and not isinstance(out["exclusiveMinimum"], bool):
        out["minimum"], out["exclusiveMinimum"] = out["exclusiveMinimum"], True
    return out


def job_request_schema() -> dict[str, Any]:
    schema = _openapi30(copy.deepcopy(JobRequest.model_json_schema()))
    props = schema["properties"]
    props["lyrics"].update(pattern=r"\S", description="required; one phrase per line, [verse]/[chorus] markers")
    props["tags"] = {
        "nullable": True,
        "description": "comma-separated string or list; omit to have tags generated",
        "anyOf": [{"type": "string", "minLength": 1},
                  {"type": "array", "minItems": 1, "maxItems": MAX_TAGS, "items": {"type": "string", "minLength": 1}}],
    }
    props["max_audio_length_ms"]["description"] = "song length; the configured checkpoint's context caps it (422)"
    return schema


def _error_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


@functools.lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    job_id_param = {"name": "job_id", "in": "path", "required": True, "schema": JOB_ID}
    not_found = _error_response("no job with this id")
    return {
        "openapi": "3.0.3",
        "info": {"title": "songpipe JSON API", "version": "1",
                 "description": "Submit a song job, read it back with every stage attempt, fetch its audio. "
                                "Errors are always {\"errors\": [{\"field\", \"message\"}]}; a refused "
                                "submission stores nothing."},
        "paths": {
            "/api/jobs": {"post": {
                "operationId": "createJob", "summary": "Submit a job",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
                "responses": {
                    "201": {"description": "accepted and queued",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreated"}}}},
                    "400": _error_response("not a JSON object"),
                    "413": _error_response("body larger than the configured limit"),
                    "422": _error_response("a field is invalid; each error names it"),
                    "429": _error_response("this client submits too often", retry_after=True),
                    "503": _error_response("queue full or broker unavailable", retry_after=True),
                }}},
            "/api/jobs/{job_id}": {"get": {
                "operationId": "getJob", "summary": "A job with every stage attempt",
                "parameters": [job_id_param],
                "responses": {"200": {"description": "the job",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                              "404": not_found}}},
            "/api/jobs/{job_id}/audio": {"get": {
                "operationId": "getJobAudio", "summary": "The finished song (mp3 or wav)",
                "parameters": [job_id_param],
                "responses": {"200": {"description": "the audio file",
                                      "content": {"audio/mpeg": {"schema": {"type": "string", "format": "binary"}},
                                                  "audio/wav": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": _error_response("no such job, or no finished audio yet"),
                              "410": _error_response("the recorded artifact is missing from the store")}}},
            "/api/openapi.json": {"get": {
                "operationId": "getOpenApi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": {"JobRequest": job_request_schema(), "JobCreated": CREATED, "Job": JOB,
                                   "StageRun": STAGE_RUN, "Errors": ERRORS}},
    }


@bp.get("/api/openapi.json")
def openapi_json():
    return jsonify(spec())


def register(app: Flask) -> None:
    app.register_blueprint(bp)
