"""Property-based tests of the JSON API against its own OpenAPI document, on a running server.

Schemathesis reads /api/openapi.json from a live `songpipe web` process (gunicorn, real Redis,
SQLite) and sends schema-valid and schema-violating requests to every operation. The document is
generated from the pydantic request and response models and follows this deployment (the tiny
checkpoint's length limit, no LLM backend). For each call: no 5xx, the response matches the
document (status, content type, headers, body schema against the response models), every 4xx
names the field at fault, and a refused submission stores nothing (jobs counted around each call).
No workers run: accepted jobs simply stay queued. Examples are bounded to keep this under a minute.
"""
from __future__ import annotations

import json
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from orchestrator.openapi import deployment_backends, document
from orchestrator.openapi import spec as openapi_spec
from tasks.settings import Settings
from tests import reliability_fixtures as rf
from tests import stack_fixtures
from tests.stack_fixtures import count_rows

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, allow_header_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def live_api(tmp_path_factory, tiny_checkpoint_dir, redis_service):
    workdir = tmp_path_factory.mktemp("schemathesis")
    with stack_fixtures.database("sqlite", workdir / "db") as url:
        env = stack_fixtures.stack_environment(workdir, url, redis_service.claim_db(), tiny_checkpoint_dir,
                                               {"SONGPIPE_SUBMISSIONS_PER_MINUTE": "100000",
                                                "SONGPIPE_MAX_QUEUED_JOBS": "100000"})
        stack = stack_fixtures.Stack("schemathesis", workdir, env, url, env["REDIS_URL"], tiny_checkpoint_dir)
        port = stack_fixtures.free_port()
        stack.base_url = f"http://127.0.0.1:{port}"
        rf.spawn(stack, "web", [sys.executable, "-m", "orchestrator.cli", "web", "--host", "127.0.0.1",
                                "--port", str(port)])
        try:
            stack_fixtures.wait_until(lambda: stack_fixtures._web_answers(stack.base_url), 60, "web server")
            yield stack
        finally:
            stack_fixtures.kill_group(stack.processes["web"])


# The tests are made at collection time, from the document this deployment must serve: the tiny
# checkpoint's limit ((256 - 128) frames of 80 ms) and no LLM configured. The first test checks that
# the live server serves exactly this document, so the two cannot drift.
TINY_LENGTH_LIMIT_MS = (256 - 128) * 80
expected_document = document(TINY_LENGTH_LIMIT_MS, deployment_backends(Settings()))
schema = schemathesis.openapi.from_dict(expected_document)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES)


def test_the_server_serves_the_document_of_its_deployment(live_api):
    status, headers, body = live_api.http("GET", "/api/openapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Server"].startswith("gunicorn")  # `songpipe web` serves through the production server
    served = json.loads(body)
    assert served == json.loads(json.dumps(expected_document)) == json.loads(json.dumps(openapi_spec(live_api.settings)))
    assert served["components"]["schemas"]["JobRequest"]["properties"]["max_audio_length_ms"]["maximum"] == \
        TINY_LENGTH_LIMIT_MS


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_matches_its_openapi_document(case, live_api):
    before = count_rows(live_api.database_url)["jobs"]
    response = case.call(base_url=live_api.base_url, timeout=30)
    case.validate_response(response, checks=CHECKS)
    stored = count_rows(live_api.database_url)["jobs"] - before

    if 400 <= response.status_code < 500:
        errors = response.json()["errors"]
        assert errors and all(e["field"] and e["message"] for e in errors), response.text
        assert stored == 0, f"a refused request ({response.status_code}) stored {stored} job(s)"
    elif response.status_code == 201:
        assert stored == 1
