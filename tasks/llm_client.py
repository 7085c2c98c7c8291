"""A small client for OpenAI-compatible chat completions (Ollama, vLLM, llama.cpp server, hosted APIs).

POST {llm_url}/chat/completions with a Bearer key when one is set. Every HTTP attempt is recorded as an
LlmExchange (request body, status, raw answer body, error, duration - never the key), and the list is
returned with the answer or carried by the LlmError, so the caller can record failures as well.
Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried up to llm_max_retries
times with a short backoff; anything else fails at once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import requests

from tasks.contracts import LlmExchange
from tasks.settings import Settings

BACKOFF_S = 0.25  # doubled per retry; short: the stage's own time limit bounds the whole call
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


class InvalidAnswer(ValueError):
    """An answer arrived but fails the caller's validation (shape, vocabulary, invented content)."""


class LlmError(RuntimeError):
    def __init__(self, message: str, exchanges: list[LlmExchange]) -> None:
        super().__init__(message)
        self.exchanges = exchanges


class LlmStageError(ValueError):
    """A text stage's failure that carries its LLM exchanges, so the stage wrapper records them too."""

    def __init__(self, message: str, llm_exchanges: list[LlmExchange] | None = None) -> None:
        super().__init__(message)
        self.llm_exchanges = llm_exchanges or []


@dataclass(frozen=True)
class ChatAnswer:
    content: str  # the assistant message's text, exactly as sent
    exchanges: list[LlmExchange]


def _endpoint(settings: Settings) -> tuple[str, str]:
    if not settings.llm_url:
        raise LlmError("the llm backend needs SONGPIPE_LLM_URL (an OpenAI-compatible base URL, e.g. "
                       "http://127.0.0.1:11434/v1); it is not set", [])
    if not settings.llm_model:
        raise LlmError("the llm backend needs SONGPIPE_LLM_MODEL (the model name); it is not set", [])
    return settings.llm_url.rstrip("/") + "/chat/completions", settings.llm_model


def _content(body: str) -> str:
    """The first choice's message text; a clear error for any other shape."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"answer body is not JSON ({exc}): {body[:200]!r}") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"answer has no choices[0].message.content: {body[:200]!r}") from None
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"choices[0].message.content is empty or not text: {content!r}")
    return content


def chat(settings: Settings, messages: list[dict], *, json_mode: bool = False,
         temperature: float = 0.0) -> ChatAnswer:
    """One chat completion; raises LlmError (with every attempt recorded) when no usable answer came."""
    url, model = _endpoint(settings)
    body: dict = {"model": model, "messages": messages, "temperature": temperature, "stream": False}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    headers = {"Content-Type": "application/json"}
    if settings.llm_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.llm_api_key.get_secret_value()}"

    exchanges: list[LlmExchange] = []
    attempts = settings.llm_max_retries + 1
    for attempt in range(attempts):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        t0 = time.perf_counter()
        status, text, error, retry = None, None, None, False
        try:
            response = requests.post(url, json=body, headers=headers, timeout=settings.llm_timeout_s)
            status, text = response.status_code, response.text
            if status != 200:
                error, retry = f"HTTP {status}", status in _RETRY_STATUSES
        except requests.Timeout:
            error, retry = f"timed out after {settings.llm_timeout_s} s", True
        except requests.RequestException as exc:
            error, retry = f"{type(exc).__name__}: {exc}", True
        content = None
        if error is None:
            assert text is not None  # no error: the request answered 200
            try:
                content = _content(text)
            except ValueError as exc:
                error = str(exc)
        exchanges.append(LlmExchange(url=url, model=model, request=body, status=status, answer=text,
                                     error=error, duration_s=round(time.perf_counter() - t0, 4)))
        if content is not None:
            return ChatAnswer(content=content, exchanges=exchanges)
        if not retry:
            break
    raise LlmError(f"LLM at {url} (model {model!r}) gave no usable answer after {len(exchanges)} "
                   f"attempt(s); last: {exchanges[-1].error}", exchanges)


def strip_code_fence(content: str) -> str:
    """Chat models often wrap an answer in ```...``` despite being asked not to; the fence is not content."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3]
        first, _, rest = text.partition("\n")
        text = rest if first.strip().isalpha() or not first.strip() else text  # '```json' header line
    return text.strip()
