"""The OpenAPI 3.1 description of the JSON API, served at /api/openapi.json.

Every schema is generated: the request body from tasks.contracts.JobRequest (what the server
validates with), the responses from orchestrator.schemas (what the views build their bodies
with). OpenAPI 3.1 uses JSON Schema 2020-12, pydantic's own dialect, so nothing is converted.

The document follows the deployment it is served by: the length limit of the configured
checkpoint (an omitted length gets the longest that checkpoint allows, so the default shown is
that), and the lyrics/tags backends this deployment can run.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Literal

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from orchestrator.request_parsing import max_audio_length_limit_ms
from orchestrator.schemas import RESPONSE_MODELS
from tasks.contracts import MAX_TAGS, JobRequest
from tasks.settings import Settings

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
JOB_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$",
          "description": "32 lower-case hex digits (uuid4); unknown ids answer 404"}


def _generated_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (JobRequest, "validation"), *[(m, "serialization") for m in RESPONSE_MODELS]]
    _, top = models_json_schema(models, ref_template=REF)
    return top["$defs"]


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strip_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}


def job_request_schema(schema: dict[str, Any], length_limit_ms: int | None, backends: dict[str, list[str]]
                       ) -> dict[str, Any]:
    """The generated request schema, narrowed to what this deployment accepts."""
    props = schema["properties"]
    props["lyrics"].update(pattern=r"\S", description="required; one phrase per line, [verse]/[chorus] markers")
    props["tags"] = {
        "description": "comma-separated string or list; omit to have tags generated",
        "anyOf": [{"type": "string", "minLength": 1, "pattern": r"[^,\s]"},
                  {"type": "array", "minItems": 1, "maxItems": MAX_TAGS,
                   "items": {"type": "string", "minLength": 1, "pattern": r"\S"}},
                  {"type": "null"}]}
    length = props["max_audio_length_ms"]
    length["description"] = "song length in ms; the configured checkpoint's context caps it"
    if length_limit_ms is not None:
        length["maximum"] = length_limit_ms
        # request_parsing gives an omitted length min(model default, this limit) and stores it
        length["default"] = min(length.get("default", length_limit_ms), length_limit_ms)
    for field, allowed in backends.items():
        props[field] = {"anyOf": [{"enum": allowed, "type": "string"}, {"type": "null"}], "default": None,
                        "description": "null: this deployment's default"}
    return schema


def deployment_backends(settings: Settings) -> dict[str, list[str]]:
    llm = bool(settings.llm_url and settings.llm_model)
    return {"lyrics_backend": ["rules", "off", *(["llm"] if llm else [])],
            "tags_backend": ["embedding", "given", *(["llm"] if llm else [])]}


def _errors(description: str, retry_after: bool = False, allow: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": {"$ref": REF.format(model="Errors")}}}}
    headers = {}
    if retry_after:
        headers["Retry-After"] = {"schema": {"type": "integer", "minimum": 1}, "description": "seconds"}
    if allow:
        headers["Allow"] = {"schema": {"type": "string"}, "description": "the methods this path serves"}
    if headers:
        response["headers"] = headers
    return response


def _json(model: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


@functools.lru_cache(maxsize=8)
def _spec(length_limit_ms: int | None, backends: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, Any]:
    schemas = _strip_titles(_generated_schemas())
    schemas["JobRequest"] = job_request_schema(schemas["JobRequest"], length_limit_ms,
                                               {k: list(v) for k, v in backends})
    job_id_param = {"name": "job_id", "in": "path", "required": True, "schema": JOB_ID}
    return {
        "openapi": "3.1.0",
        "info": {"title": "songpipe JSON API", "version": "2",
                 "description": "Submit a song job, read it back with every stage attempt, fetch its audio. "
                                "Errors are always {\"errors\": [{\"field\", \"message\"}]}; a refused "
                                "submission stores nothing."},
        "paths": {
            "/api/jobs": {"post": {
                "operationId": "createJob", "summary": "Submit a job",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="JobRequest")}}}},
                "responses": {
                    "201": {**_json("JobCreated", "accepted and queued"),
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                    "400": _errors("not a JSON object, or nested too deeply"),
                    "405": _errors("method not allowed", allow=True),
                    "413": _errors("body larger than the configured limit"),
                    "422": _errors("a field is invalid; each error names it"),
                    "429": _errors("this client submits too often", retry_after=True),
                    "503": _errors("queue full or broker unavailable", retry_after=True),
                }}},
            "/api/jobs/{job_id}": {"get": {
                "operationId": "getJob", "summary": "A job with every stage attempt (public view)",
                "parameters": [job_id_param],
                "responses": {"200": _json("PublicJobView", "the job"),
                              "404": _errors("no job with this id")}}},
            "/api/jobs/{job_id}/audio": {"get": {
                "operationId": "getJobAudio", "summary": "The finished song (mp3 or wav)",
                "parameters": [job_id_param],
                "responses": {"200": {"description": "the audio file",
                                      "content": {"audio/mpeg": {"schema": {"type": "string", "format": "binary"}},
                                                  "audio/wav": {"schema": {"type": "string", "format": "binary"}}}},
                              "304": {"description": "not modified (conditional request)"},
                              "404": _errors("no such job, or no finished audio yet"),
                              "410": _errors("the recorded artifact is missing from the store")}}},
            "/api/jobs/{job_id}/stream": {"get": {
                "operationId": "getJobStream", "summary": "The song as it is decoded: chunked WAV of unknown length",
                "description": "A 44-byte WAV header (48 kHz, 2 channels, 16-bit PCM, RIFF and data sizes "
                               "0xFFFFFFFF), then the song's final samples in order as they are recorded. "
                               "Ends when the whole song was sent, or when the job ended without one.",
                "parameters": [job_id_param,
                               {"name": "start", "in": "query", "required": False,
                                "description": "the first sample to send (a reconnecting player's position)",
                                "schema": {"type": "integer", "minimum": 0, "maximum": 10**15 - 1, "default": 0}}],
                "responses": {"200": {"description": "WAV header, then 16-bit little-endian stereo samples",
                                      "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": _errors("no job with this id"),
                              "422": _errors("start is not a whole number of samples"),
                              "503": _errors("this server streams to as many listeners as it can",
                                             retry_after=True)}}},
            "/api/openapi.json": {"get": {
                "operationId": "getOpenApi", "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": schemas},
    }


def document(length_limit_ms: int | None, backends: dict[str, list[str]]) -> dict[str, Any]:
    """The document for a deployment with this length limit and these backends (a copy)."""
    return copy.deepcopy(_spec(length_limit_ms, tuple((k, tuple(v)) for k, v in backends.items())))


def spec(settings: Settings) -> dict[str, Any]:
    """The document for the deployment `settings` describe."""
    return document(max_audio_length_limit_ms(settings.resolved_checkpoint_dir), deployment_backends(settings))


@bp.get("/api/openapi.json")
def openapi_json():
    return jsonify(spec(current_app.config["SONGPIPE_SETTINGS"]))


def register(app: Flask) -> None:
    app.register_blueprint(bp)
