"""The `llm` backends of both text stages against a real HTTP server speaking the OpenAI chat API.

The server (Flask, in a thread on 127.0.0.1) picks its behaviour from the request's model name, so each
test names the answer it wants: valid, malformed, empty, slow, HTTP 500 then success, invented lines,
unknown tags. Every case must end in a validated result or a clear error, with the exchanges recorded,
and must fall back to the offline backend only when the input allows it.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from tasks.contracts import GenerateTagsInput, RefineLyricsInput
from tasks.llm_client import BACKOFF_S
from tasks.lyrics_refinement import LyricsError, refine_lyrics
from tasks.settings import Settings
from tasks.tags_generation import TagsError, generate_tags

LYRICS = "I walk the line\nI hold the key\n\nla la love me (whispered)\nla la leave me"
STRUCTURED = "[verse]\nI walk the line\nI hold the key\n\n[chorus]\nla la love me\nla la leave me"
API_KEY = "sk-test-secret-123"


def completion(content: object) -> dict:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


# model name -> (call number from 1) -> (HTTP status, JSON body or raw text, delay in seconds)
Answer = tuple[int, object, float]
SCENARIOS: dict[str, Callable[[int], Answer]] = {
    "lyrics-valid": lambda n: (200, completion(STRUCTURED), 0),
    "lyrics-fenced": lambda n: (200, completion(f"```\n{STRUCTURED}\n```"), 0),
    "lyrics-invented": lambda n: (200, completion(STRUCTURED + "\nand a brand new line nobody wrote"), 0),
    "lyrics-dropped": lambda n: (200, completion("[verse]\nI walk the line"), 0),
    "lyrics-bad-marker": lambda n: (200, completion("[Guitar Solo]\n" + STRUCTURED), 0),
    "lyrics-translated": lambda n: (200, completion("[verse]\nJe marche sur la ligne\nJ'ai la clé"), 0),
    "empty": lambda n: (200, completion(""), 0),
    "null-content": lambda n: (200, completion(None), 0),
    "not-json": lambda n: (200, "Sure! Here you go: ska, brass", 0),
    "no-choices": lambda n: (200, {"error": "model overloaded"}, 0),
    "slow": lambda n: (200, completion(STRUCTURED), 2.0),
    "500-then-ok": lambda n: (500, {"error": "boom"}, 0) if n == 1 else (200, completion(STRUCTURED), 0),
    "always-500": lambda n: (500, {"error": "boom"}, 0),
    "400": lambda n: (400, {"error": "bad request"}, 0),
    "tags-valid": lambda n: (200, completion('{"genre": "ska", "tags": ["upbeat", "horn section", "Female Vocals"]}'), 0),
    "tags-fenced": lambda n: (200, completion('```json\n{"genre": "Ska", "tags": ["brass"]}\n```'), 0),
    "tags-malformed": lambda n: (200, completion('{"genre": "ska", "tags": ["brass",'), 0),
    "tags-prose": lambda n: (200, completion("I would suggest ska with brass."), 0),
    "tags-unknown-some": lambda n: (200, completion('{"genre": "ska", "tags": ["brass", "sparkly vibes", "upbeat"]}'), 0),
    "tags-unknown-most": lambda n: (200, completion('{"genre": "ska", "tags": ["zorp", "blip", "flarn"]}'), 0),
    "tags-unknown-genre": lambda n: (200, completion('{"genre": "space ska", "tags": ["brass"]}'), 0),
    "tags-two-genres": lambda n: (200, completion('{"genre": "ska", "tags": ["reggae", "brass"]}'), 0),
    "tags-wrong-shape": lambda n: (200, completion('["ska", "brass"]'), 0),
    "tags-500-then-ok": lambda n: ((500, {"error": "boom"}, 0) if n == 1
                                   else (200, completion('{"genre": "ska", "tags": ["brass"]}'), 0)),
}


class FakeLlm:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.headers: list[dict] = []
        app = Flask(__name__)

        @app.post("/v1/chat/completions")
        def completions() -> Response:
            body = request.get_json(force=True)
            self.headers.append(dict(request.headers))
            model = body["model"]
            self.calls[model] += 1
            status, payload, delay = SCENARIOS[model](self.calls[model])
            time.sleep(delay)
            if isinstance(payload, str):
                return Response(payload, status=status, mimetype="text/plain")
            return jsonify(payload), status

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLlm]:
    fake = FakeLlm()
    yield fake
    fake.server.shutdown()


def settings(llm: FakeLlm, model: str, **overrides) -> Settings:
    values = {"llm_url": llm.url, "llm_model": model, "llm_timeout_s": 0.5, "llm_max_retries": 1,
              "llm_api_key": API_KEY} | overrides
    return Settings(**values)


def refine(llm: FakeLlm, model: str, *, allow_fallback: bool = False, **overrides):
    return refine_lyrics(RefineLyricsInput(lyrics=LYRICS, backend="llm", allow_fallback=allow_fallback,
                                           max_frames=3000), settings(llm, model, **overrides))


def tags(llm: FakeLlm, model: str, *, allow_fallback: bool = False, user_tags: list[str] | None = None):
    return generate_tags(GenerateTagsInput(style="upbeat ska with a horn section", user_tags=user_tags,
                                           lyrics=STRUCTURED, backend="llm", allow_fallback=allow_fallback),
                         settings(llm, model))


# --- lyrics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["lyrics-valid", "lyrics-fenced"])
def test_valid_lyrics_answer_is_used_and_recorded(llm: FakeLlm, model: str) -> None:
    out = refine(llm, model)
    assert out.lyrics == STRUCTURED and out.backend_used == "llm" and not out.fell_back
    assert out.sections == ["verse", "chorus"]
    [exchange] = out.llm_exchanges
    assert exchange.status == 200 and exchange.error is None and exchange.url == f"{llm.url}/chat/completions"
    assert exchange.request["model"] == model and LYRICS.split("\n")[0] in json.dumps(exchange.request)
    assert "[verse]" in exchange.answer


def test_the_api_key_is_sent_but_never_recorded(llm: FakeLlm) -> None:
    out = refine(llm, "lyrics-valid")
    assert llm.headers[-1]["Authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in out.model_dump_json()


@pytest.mark.parametrize("model,reason", [
    ("lyrics-invented", "not in the input"),
    ("lyrics-translated", "not in the input"),
    ("lyrics-dropped", "lacks 3 of the input's 4 sung lines"),
    ("lyrics-bad-marker", "not one of the allowed markers"),
    ("empty", "content is empty"),
    ("null-content", "content is empty"),
    ("not-json", "answer body is not JSON"),
    ("no-choices", "no choices"),
])
def test_bad_lyrics_answer_is_an_error_without_fallback(llm: FakeLlm, model: str, reason: str) -> None:
    with pytest.raises(LyricsError, match=reason) as err:
        refine(llm, model)
    assert "allow_fallback is false" in str(err.value)
    assert err.value.llm_exchanges and err.value.llm_exchanges[-1].answer is not None


@pytest.mark.parametrize("model", ["lyrics-invented", "not-json", "always-500"])
def test_bad_lyrics_answer_falls_back_to_rules_when_allowed(llm: FakeLlm, model: str) -> None:
    out = refine(llm, model, allow_fallback=True)
    assert out.fell_back and out.backend_used == "rules" and out.fallback_reason
    assert out.lyrics == "[verse]\nI walk the line\nI hold the key\n\n[verse]\nla la love me\nla la leave me"
    assert out.llm_exchanges  # what the LLM said is kept with the fallback result


def test_slow_answer_times_out_and_is_retried_a_bounded_number_of_times(llm: FakeLlm) -> None:
    t0 = time.perf_counter()
    with pytest.raises(LyricsError, match="timed out") as err:
        refine(llm, "slow", llm_timeout_s=0.3, llm_max_retries=1)
    assert len(err.value.llm_exchanges) == 2
    assert all("timed out after 0.3 s" in e.error and e.status is None for e in err.value.llm_exchanges)
    assert time.perf_counter() - t0 < 2 * 0.3 + BACKOFF_S + 1.0


def test_http_500_is_retried_then_the_answer_is_used(llm: FakeLlm) -> None:
    out = refine(llm, "500-then-ok")
    assert out.lyrics == STRUCTURED and [e.status for e in out.llm_exchanges] == [500, 200]
    assert out.llm_exchanges[0].error == "HTTP 500"


def test_http_400_is_not_retried(llm: FakeLlm) -> None:
    before = llm.calls["400"]
    with pytest.raises(LyricsError, match="HTTP 400"):
        refine(llm, "400", llm_max_retries=3)
    assert llm.calls["400"] == before + 1


def test_retries_stop_at_llm_max_retries(llm: FakeLlm) -> None:
    with pytest.raises(LyricsError) as err:
        refine(llm, "always-500", llm_max_retries=2)
    assert [e.status for e in err.value.llm_exchanges] == [500, 500, 500]


def test_unconfigured_llm_is_a_clear_error_or_a_fallback(llm: FakeLlm) -> None:
    with pytest.raises(LyricsError, match="SONGPIPE_LLM_URL"):
        refine(llm, "lyrics-valid", llm_url=None)
    out = refine(llm, "lyrics-valid", llm_url=None, allow_fallback=True)
    assert out.fell_back and "SONGPIPE_LLM_URL" in out.fallback_reason and out.llm_exchanges == []


def test_unreachable_server_is_retried_and_reported(llm: FakeLlm) -> None:
    with pytest.raises(LyricsError, match="ConnectionError") as err:
        refine(llm, "lyrics-valid", llm_url="http://127.0.0.1:9/v1", llm_max_retries=1)
    assert len(err.value.llm_exchanges) == 2


# --- tags -----------------------------------------------------------------------------------------

def test_valid_tags_answer_is_mapped_onto_the_vocabulary_and_ordered(llm: FakeLlm) -> None:
    out = tags(llm, "tags-valid")
    assert out.tags == ["ska", "female", "upbeat", "brass"]  # genre, gender, mood, instrument
    assert out.tags_string == "ska,female,upbeat,brass" and out.backend_used == "llm"
    [exchange] = out.llm_exchanges
    assert exchange.request["response_format"] == {"type": "json_object"}
    assert json.loads(exchange.answer)["choices"][0]["message"]["content"].startswith('{"genre": "ska"')


def test_fenced_json_answer_is_accepted(llm: FakeLlm) -> None:
    assert tags(llm, "tags-fenced").tags == ["ska", "brass"]


def test_unknown_tags_are_dropped_when_most_tags_are_known(llm: FakeLlm) -> None:
    out = tags(llm, "tags-unknown-some")
    assert out.tags == ["ska", "upbeat", "brass"]


def test_user_genre_wins_over_the_llm_genre(llm: FakeLlm) -> None:
    out = tags(llm, "tags-valid", user_tags=["Reggae"])
    assert out.tags[0] == "reggae" and "ska" not in out.tags


@pytest.mark.parametrize("model,reason", [
    ("tags-malformed", "not JSON"),
    ("tags-prose", "not JSON"),
    ("tags-wrong-shape", 'object with a "genre"'),
    ("tags-unknown-most", "more tags outside the vocabulary"),
    ("tags-unknown-genre", "not a genre of the vocabulary"),
    ("tags-two-genres", "second genre"),
    ("empty", "content is empty"),
])
def test_bad_tags_answer_is_an_error_without_fallback(llm: FakeLlm, model: str, reason: str) -> None:
    with pytest.raises(TagsError, match=reason) as err:
        tags(llm, model)
    assert err.value.llm_exchanges


def test_bad_tags_answer_falls_back_to_embedding_when_allowed(llm: FakeLlm) -> None:
    out = tags(llm, "tags-malformed", allow_fallback=True)
    assert out.fell_back and out.backend_used == "embedding" and "not JSON" in out.fallback_reason
    assert out.tags[0] == "ska" and "brass" in out.tags and len(out.llm_exchanges) == 1


def test_tags_http_500_is_retried(llm: FakeLlm) -> None:
    out = tags(llm, "tags-500-then-ok")
    assert out.tags == ["ska", "brass"] and [e.status for e in out.llm_exchanges] == [500, 200]
