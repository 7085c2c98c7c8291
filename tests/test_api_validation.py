"""POST /api/jobs refuses bad input with a 4xx naming the field, and stores nothing when it does.

Runs the Flask app in-process (test client) against SQLite and PostgreSQL; no broker is needed
because a refused request never reaches the chain. The tiny checkpoint's context (max_seq_len 256)
gives a length limit of (256 - 128) * 80 ms = 10240 ms.
"""
from __future__ import annotations

import pytest

from orchestrator.app import create_app
from orchestrator.request_parsing import max_audio_length_limit_ms
from tests.stack_fixtures import count_rows

VALID = {"lyrics": "de doo doo doo\nde blaa blaa blaa", "tags": "ska", "max_audio_length_ms": 2000}
NOTHING_STORED = {"jobs": 0, "stage_runs": 0, "artifacts": 0}


@pytest.fixture
def client(app_settings):
    return create_app(app_settings).test_client()


def post(client, body: dict):
    return client.post("/api/jobs", json=body)


def fields(response) -> list[str]:
    return [item["field"] for item in response.get_json()["errors"]]


def refused(response, field: str, database_url: str, status: int = 422) -> str:
    """The response is `status` with an error for `field`, and no row was written; returns its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"errors"} and all(set(e) == {"field", "message"} for e in body["errors"])
    assert field in fields(response), body
    assert count_rows(database_url) == NOTHING_STORED
    return next(e["message"] for e in body["errors"] if e["field"] == field)


def test_empty_lyrics_are_refused(client, database_url):
    refused(post(client, {**VALID, "lyrics": ""}), "lyrics", database_url)


def test_whitespace_only_lyrics_are_refused(client, database_url):
    refused(post(client, {**VALID, "lyrics": "  \n\t "}), "lyrics", database_url)


def test_missing_lyrics_are_refused(client, database_url):
    body = {k: v for k, v in VALID.items() if k != "lyrics"}
    refused(post(client, body), "lyrics", database_url)


def test_empty_tags_are_refused_not_treated_as_absent(client, database_url):
    refused(post(client, {**VALID, "tags": ""}), "tags", database_url)


def test_tags_with_an_empty_entry_are_refused(client, database_url):
    refused(post(client, {**VALID, "tags": "ska,,brass"}), "tags", database_url)


def test_misspelled_tag_field_is_refused_and_suggests_tags(client, database_url):
    body = {k: v for k, v in VALID.items() if k != "tags"} | {"tag": "ska"}
    message = refused(post(client, body), "tag", database_url)
    assert "tags" in message


def test_unknown_field_is_refused(client, database_url):
    refused(post(client, {**VALID, "colour": "blue"}), "colour", database_url)


@pytest.mark.parametrize("value", [0, -0.5])
def test_temperature_must_be_positive(client, database_url, value):
    refused(post(client, {**VALID, "temperature": value}), "temperature", database_url)


def test_top_k_zero_is_refused(client, database_url):
    refused(post(client, {**VALID, "top_k": 0}), "top_k", database_url)


def test_cfg_scale_below_one_is_refused(client, database_url):
    refused(post(client, {**VALID, "cfg_scale": 0.5}), "cfg_scale", database_url)


def test_length_above_the_models_context_is_refused_with_the_limit(client, database_url, app_settings):
    limit = max_audio_length_limit_ms(app_settings.resolved_checkpoint_dir)
    assert limit == (256 - 128) * 80
    message = refused(post(client, {**VALID, "max_audio_length_ms": limit + 80}), "max_audio_length_ms", database_url)
    assert str(limit) in message


def test_omitted_length_defaults_to_what_the_model_holds_and_is_recorded(app_settings):
    from orchestrator.request_parsing import parse_job_request

    body = {k: v for k, v in VALID.items() if k != "max_audio_length_ms"}  # the contract default: 240000 ms
    limit = max_audio_length_limit_ms(app_settings.resolved_checkpoint_dir)
    request = parse_job_request(body, app_settings)
    assert request.max_audio_length_ms == limit < 240_000
    assert request.model_dump()["max_audio_length_ms"] == limit  # what the job row stores


def test_length_below_one_frame_is_refused(client, database_url):
    refused(post(client, {**VALID, "max_audio_length_ms": 79}), "max_audio_length_ms", database_url)


def test_seed_as_a_string_is_refused(client, database_url):
    refused(post(client, {**VALID, "seed": "7"}), "seed", database_url)


def test_negative_seed_is_refused(client, database_url):
    refused(post(client, {**VALID, "seed": -1}), "seed", database_url)


def test_unknown_output_format_is_refused(client, database_url):
    refused(post(client, {**VALID, "output_format": "ogg"}), "output_format", database_url)


def test_lyrics_over_the_character_limit_are_refused(client, database_url):
    refused(post(client, {**VALID, "lyrics": "la " * 10_000}), "lyrics", database_url)


def test_one_megabyte_of_lyrics_is_refused_as_too_large(client, database_url):
    message = refused(post(client, {**VALID, "lyrics": "a" * 1_000_000}), "body", database_url, status=413)
    assert "bytes" in message


def test_every_bad_field_is_reported_at_once(client, database_url):
    response = post(client, {**VALID, "lyrics": "", "temperature": 0, "top_k": 0, "max_audio_length_ms": 10**7})
    refused(response, "lyrics", database_url)
    assert {"lyrics", "temperature", "top_k", "max_audio_length_ms"} <= set(fields(response))


def test_non_json_body_is_refused(client, database_url):
    response = client.post("/api/jobs", data="lyrics=hello", content_type="application/x-www-form-urlencoded")
    refused(response, "body", database_url, status=400)


def test_malformed_json_is_refused(client, database_url):
    response = client.post("/api/jobs", data="{not json", content_type="application/json")
    refused(response, "body", database_url, status=400)


def test_json_that_is_not_an_object_is_refused(client, database_url):
    response = client.post("/api/jobs", json=["lyrics"])
    refused(response, "body", database_url, status=400)


def test_unknown_job_id_is_404_json(client):
    response = client.get(f"/api/jobs/{'f' * 32}")
    assert response.status_code == 404 and fields(response) == ["id"]


def test_malformed_job_id_is_404_json(client):
    response = client.get("/api/jobs/..%2F..%2Fetc%2Fpasswd/audio")
    assert response.status_code == 404 and response.get_json()["errors"]


def test_valid_request_is_accepted_with_id_seed_and_links(tiny_checkpoint_dir, tmp_path, monkeypatch):
    from db.schema import upgrade
    from tasks.settings import Settings

    sent: list[tuple] = []
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda job_id, attempts, *_: sent.append((job_id, attempts)))
    settings = Settings(data_dir=tmp_path, checkpoint_dir=tiny_checkpoint_dir)
    upgrade(settings.resolved_database_url)
    response = post(create_app(settings).test_client(), {**VALID, "seed": 7})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["seed"] == 7 and body["status"] == "queued" and len(body["id"]) == 32
    assert body["links"]["audio"] == f"/api/jobs/{body['id']}/audio"
    assert sent and sent[0][0] == body["id"]
    assert count_rows(settings.resolved_database_url)["stage_runs"] == 5


def _broker_refuses(*_args):
    from kombu.exceptions import OperationalError

    raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def _serializer_explodes(*_args):
    raise RuntimeError("serializer exploded")


@pytest.mark.parametrize("publish", [_broker_refuses, _serializer_explodes], ids=["broker-down", "any-error"])
def test_a_publish_error_after_the_commit_answers_201_and_leaves_the_job_for_the_reconciler(
        tiny_checkpoint_dir, tmp_path, monkeypatch, publish):
    """L2: the job is stored; a 5xx would make a retrying client submit a duplicate."""
    from db.schema import upgrade
    from tasks.settings import Settings

    monkeypatch.setattr("tasks.pipeline.chain.send_chain", publish)
    settings = Settings(data_dir=tmp_path, checkpoint_dir=tiny_checkpoint_dir)
    upgrade(settings.resolved_database_url)
    response = post(create_app(settings).test_client(), VALID)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["dispatched"] is False  # a retrying client would only duplicate the job
    rows = count_rows(settings.resolved_database_url)
    assert rows["jobs"] == 1 and rows["stage_runs"] == 5


def test_form_error_is_shown_next_to_the_field_with_the_users_values(client, database_url):
    page = client.get("/").get_data(as_text=True)
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    response = client.post("/jobs", data={"csrf_token": token, "lyrics": "my words", "tags": "ska", "length_s": "2",
                                          "temperature": "0", "top_k": "50", "cfg_scale": "1.5",
                                          "output_format": "mp3"})
    html = response.get_data(as_text=True)
    assert response.status_code == 422
    assert 'id="temperature-error"' in html and "greater than 0" in html
    assert "my words" in html
    assert count_rows(database_url) == NOTHING_STORED


def test_given_tags_backend_without_tags_is_refused(client, database_url):
    body = {k: v for k, v in VALID.items() if k != "tags"} | {"tags_backend": "given"}
    refused(post(client, body), "tags", database_url)


@pytest.mark.parametrize("field", ["lyrics_backend", "tags_backend"])
def test_llm_backend_on_a_deployment_without_an_llm_is_refused(client, database_url, field):
    refused(post(client, {**VALID, field: "llm"}), field, database_url)


# -- characters the databases refuse, nesting, strict numbers, methods (issue 13) ----------------

@pytest.mark.parametrize("field", ["lyrics", "style"])
def test_a_nul_character_is_refused_naming_the_field(client, database_url, field):
    message = refused(post(client, {**VALID, field: "de doo\u0000doo"}), field, database_url)
    assert "NUL" in message


def test_a_nul_character_in_a_tag_list_is_refused_naming_the_entry(client, database_url):
    refused(post(client, {**VALID, "tags": ["ska", "bra\u0000ss"]}), "tags.1", database_url)


def test_a_lone_surrogate_is_refused_naming_the_field(client, database_url):
    # "\ud800" is valid JSON text but no UTF-8 database can store what it decodes to
    raw = '{"lyrics": "de doo \\ud800 doo", "tags": "ska", "max_audio_length_ms": 2000}'
    response = client.post("/api/jobs", data=raw, content_type="application/json")
    assert "surrogate" in refused(response, "lyrics", database_url)


def test_a_nul_character_in_a_field_name_is_refused(client, database_url):
    refused(post(client, {**VALID, "ly\u0000rics": "x"}), "body", database_url)


@pytest.mark.parametrize("depth", [17, 1000, 100_000])
def test_deeply_nested_json_is_refused_as_400(client, database_url, depth):
    raw = '{"lyrics": "la", "tags": ' + "[" * depth + "]" * depth + "}"
    response = client.post("/api/jobs", data=raw, content_type="application/json")
    assert "nested" in refused(response, "body", database_url, status=400)


def test_brackets_inside_strings_do_not_count_as_nesting(tiny_checkpoint_dir, tmp_path, monkeypatch):
    from db.schema import upgrade
    from tasks.settings import Settings

    sent: list = []
    monkeypatch.setattr("tasks.pipeline.chain.send_chain", lambda *args: sent.append(args))
    settings = Settings(data_dir=tmp_path, checkpoint_dir=tiny_checkpoint_dir)
    upgrade(settings.resolved_database_url)
    client = create_app(settings).test_client()
    response = post(client, {**VALID, "lyrics": "[verse]" + "[[[{{{" * 50 + "\\\"["})
    assert response.status_code == 201, response.get_json()
    assert sent


@pytest.mark.parametrize("field,value", [
    ("temperature", True), ("temperature", "1.0"), ("cfg_scale", False), ("cfg_scale", "1.5"),
    ("top_k", 50.0), ("top_k", True), ("top_k", "50"), ("max_audio_length_ms", 2000.0),
    ("max_audio_length_ms", "2000"), ("seed", 7.0), ("seed", True), ("allow_fallback", 1),
    ("allow_fallback", "true")])
def test_loose_numbers_and_booleans_are_refused_not_coerced(client, database_url, field, value):
    refused(post(client, {**VALID, field: value}), field, database_url)


def test_an_unrouted_method_is_405_json_with_allow(client, database_url):
    response = client.put("/api/jobs", json=VALID)
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"POST"}
    assert fields(response) == ["request"]
    assert count_rows(database_url) == NOTHING_STORED


def test_form_with_a_nul_character_is_refused_next_to_the_field(client, database_url):
    page = client.get("/").get_data(as_text=True)
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    response = client.post("/jobs", data={"csrf_token": token, "lyrics": "my\u0000words", "tags": "ska",
                                          "length_s": "2", "temperature": "1", "top_k": "50", "cfg_scale": "1.5",
                                          "output_format": "mp3"})
    assert response.status_code == 422
    assert 'id="lyrics-error"' in response.get_data(as_text=True)
    assert count_rows(database_url) == NOTHING_STORED


def test_a_rerun_override_is_validated_like_a_submission(app_settings):
    """L9: re-runs validate the merged request through parse_job_request (context and backends too)."""
    from orchestrator.request_parsing import RequestInvalid, parse_job_request

    merged = {**VALID, "max_audio_length_ms": 10**6, "lyrics_backend": "llm"}
    with pytest.raises(RequestInvalid) as refused_:
        parse_job_request(merged, app_settings)
    assert {e["field"] for e in refused_.value.errors} >= {"max_audio_length_ms", "lyrics_backend"}
