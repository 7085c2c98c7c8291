"""Turning a submitted payload into a JobRequest, or into field errors a person can act on.

Every entry point (web form, JSON API, CLI) goes through `parse_job_request`, so the same input
gets the same answer everywhere. Errors have one shape: [{"field": ..., "message": ...}].
Besides the request model itself, the length is checked against the configured checkpoint's
context window (`max_audio_length_limit_ms`), so a song that cannot fit is refused before anything
is stored rather than failing minutes later on the GPU.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.contracts import FRAME_MS, JobRequest
from tasks.settings import Settings

log = logging.getLogger(__name__)

LM_FOLDER_PATTERN = "HeartMuLa-oss-*"  # the published LM folder name (model-spec.md section 1.1)
# The prompt (tags + lyrics tokens) shares the context with the audio frames: L + N <= max_seq_len.
# L is only known after lyrics refinement, so at submission we reserve room for a prompt of up to
# min(2048, max_seq_len / 2) tokens (2048 tokens is roughly 8000 characters of lyrics). The token stage
# checks the exact L + N <= max_seq_len again before prefill, with L known.
MAX_PROMPT_RESERVE = 2048


class RequestInvalid(Exception):
    """A submission that was refused; `errors` is the list returned to the client."""

    def __init__(self, errors: list[dict[str, str]], status: int = 422):
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors
        self.status = status


def error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def error_body(errors: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    return {"errors": errors}


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _message(item: Mapping[str, Any]) -> str:
    kind = item.get("type", "")
    field = str(item["loc"][-1]) if item.get("loc") else ""
    if kind == "extra_forbidden":
        known = list(JobRequest.model_fields)
        close = difflib.get_close_matches(field, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(known)}"
        return f"unknown field{hint}"
    message = str(item.get("msg", "is invalid"))
    message = message.removeprefix("Value error, ")
    if kind in ("int_type", "float_type", "string_type", "bool_type", "list_type") and "input" in item:
        message = f"{message} (got {json.dumps(item['input'])[:60]})"
    return message


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as [{"field", "message"}], one per problem, field paths dotted."""
    return [error(_field_name(tuple(item["loc"])), _message(item)) for item in exc.errors()]


# Characters no database here can store: PostgreSQL refuses NUL in text and JSON, and a lone
# surrogate cannot be encoded as UTF-8 by any driver. Refused by name, before the model runs.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _describe(char: str) -> str:
    return "a NUL character (\\u0000)" if char == "\x00" else f"a lone surrogate (\\u{ord(char):04x})"


def unstorable_text_errors(value: Any, field: str = "") -> list[dict[str, str]]:
    """Errors for every string (keys included) in a decoded payload that a database would refuse."""
    errors: list[dict[str, str]] = []
    stack: list[tuple[Any, str]] = [(value, field)]
    while stack:  # iterative: the payload's depth is bounded by the caller, but no recursion is needed
        item, path = stack.pop()
        if isinstance(item, str):
            bad = _UNSTORABLE.search(item)
            if bad:
                errors.append(error(path or "body", f"contains {_describe(bad.group())}, which cannot be stored"))
        elif isinstance(item, dict):
            for key, child in item.items():
                key_text = str(key)
                bad = _UNSTORABLE.search(key_text)
                if bad:
                    errors.append(error(path or "body", f"a field name contains {_describe(bad.group())}"))
                    continue
                stack.append((child, f"{path}.{key_text}" if path else key_text))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item))
    return sorted(errors, key=lambda e: e["field"])


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether a JSON text nests objects/arrays deeper than `limit`, decided before decoding it.

    The decoder recurses per level (a RecursionError near 1000 levels), so depth is counted on the
    raw bytes; brackets inside strings do not count.
    """
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def _lm_config_path(checkpoint_dir: Path) -> Path | None:
    candidates = sorted(p for p in checkpoint_dir.glob(LM_FOLDER_PATTERN) if (p / "config.json").is_file())
    return candidates[0] / "config.json" if candidates else None


@functools.lru_cache(maxsize=8)
def _backbone_max_seq_len(config_path: str, _mtime_ns: int) -> int:
    config = json.loads(Path(config_path).read_text())
    flavor = config.get("backbone_flavor", "llama-3B")
    custom = config.get("flavors") or {}
    if flavor in custom:  # tiny checkpoints define their own flavour, so no torch import is needed
        return int(custom[flavor]["max_seq_len"])
    from gpu_worker.model.model_flavors import flavor_args  # published flavours: the model's own table (torch-free)

    return int(flavor_args(flavor, custom).max_seq_len)


@functools.lru_cache(maxsize=32)
def _warn_once(message: str) -> None:
    log.warning(message)  # every form render asks; one line in the log is enough


def max_audio_length_limit_ms(checkpoint_dir: Path) -> int | None:
    """Longest song the checkpoint's backbone context allows, or None when its config is not readable.

    A web host without the checkpoint files (GPU workers elsewhere) cannot know the limit; the token
    stage then enforces it, with the exact prompt length.
    """
    path = _lm_config_path(Path(checkpoint_dir))
    if path is None:
        _warn_once(f"no {LM_FOLDER_PATTERN}/config.json under {checkpoint_dir}: "
                   "the length limit is checked at the token stage only")
        return None
    try:
        max_seq_len = _backbone_max_seq_len(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # FlavorError is a ValueError
        _warn_once(f"cannot read max_seq_len from {path} ({exc}): the length limit is checked at the token stage only")
        return None
    reserve = min(MAX_PROMPT_RESERVE, max_seq_len // 2)
    return (max_seq_len - reserve) * FRAME_MS


def default_max_audio_length_ms(settings: Settings) -> int:
    """The length a request gets when it names none: the contract's default, capped at what the
    deployed model allows (the embedded tiny model: 10.24 s)."""
    default = JobRequest.model_fields["max_audio_length_ms"].default
    limit = max_audio_length_limit_ms(settings.resolved_checkpoint_dir)
    return default if limit is None else min(default, limit)


def parse_job_request(payload: Any, settings: Settings) -> JobRequest:
    """Validate a decoded payload into a JobRequest or raise RequestInvalid with every field error."""
    if not isinstance(payload, dict):
        raise RequestInvalid([error("body", f"must be a JSON object, got {type(payload).__name__}")], status=400)
    errors = unstorable_text_errors(payload)
    if errors:  # the model's own messages would echo the character back; these name the field
        raise RequestInvalid(errors)
    if "max_audio_length_ms" not in payload:
        # the stored request then records the length used, not a default the model would refuse
        payload = {**payload, "max_audio_length_ms": default_max_audio_length_ms(settings)}
    request: JobRequest | None = None
    try:
        request = JobRequest.model_validate(payload)
    except ValidationError as exc:
        errors = field_errors(exc)
    length = request.max_audio_length_ms if request is not None else payload.get("max_audio_length_ms")
    if not any(e["field"] == "max_audio_length_ms" for e in errors):
        errors.extend(_length_errors(length, settings))
    if request is not None:
        errors.extend(_backend_errors(request, settings))
    if errors or request is None:
        raise RequestInvalid(errors)
    return request


def _backend_errors(request: JobRequest, settings: Settings) -> list[dict[str, str]]:
    """Refuse combinations that could only fail later: 'given' tags with no tags, 'llm' with no endpoint."""
    from orchestrator.submission import resolve_defaults

    resolved = resolve_defaults(request, settings)
    errors = []
    if resolved.tags_backend == "given" and not request.tags:
        errors.append(error("tags", "no tags given and tags_backend is 'given'; give tags, or a style "
                                    "description with tags_backend 'embedding' or 'llm'"))
    for field in ("lyrics_backend", "tags_backend"):
        if getattr(resolved, field) == "llm" and not (settings.llm_url and settings.llm_model):
            errors.append(error(field, "'llm' needs SONGPIPE_LLM_URL and SONGPIPE_LLM_MODEL to be configured "
                                       "on this deployment"))
    return errors


def _length_errors(length: Any, settings: Settings) -> list[dict[str, str]]:
    """The model's context limit, reported together with any other field errors."""
    if not isinstance(length, int) or isinstance(length, bool):
        return []
    limit = max_audio_length_limit_ms(settings.resolved_checkpoint_dir)
    if limit is None or length <= limit:
        return []
    return [error("max_audio_length_ms",
                  f"{length} ms is longer than the configured model allows ({limit} ms = {limit / 1000:g} s "
                  f"for checkpoint {settings.resolved_checkpoint_dir.name!r})")]
