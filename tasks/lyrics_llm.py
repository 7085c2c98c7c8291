"""The `llm` lyrics backend's prompt and the checks its answer must pass before anyone uses it.

The model may only add structure. Tolerance for changed words, stated: an answer line must be found in
the input (after case, punctuation and spacing are ignored), as a part of an input line (a line split
into phrases), as several input lines joined, or at least 80 % similar to one input line (a fixed typo
or apostrophe). Zero lines beyond that are accepted. In the other direction, at most 10 % of the input's
sung lines may be missing from the answer.
"""
from __future__ import annotations

import difflib
import re

from tasks.llm_client import InvalidAnswer, strip_code_fence
from tasks.lyrics_rules import SECTION_KINDS, normalise_text, refine

LINE_SIMILARITY = 0.8
MAX_DROPPED_FRACTION = 0.10
_MARKERS = {f"[{k}]" for k in SECTION_KINDS}

SYSTEM_PROMPT = (
    "You add structure to song lyrics for a music model. Rules:\n"
    "1. Keep the same language. Do not translate, rewrite, add, reorder or remove sung words.\n"
    "2. Put a section marker on its own line before each section, using only these markers: "
    "[intro] [verse] [prechorus] [chorus] [bridge] [outro].\n"
    "3. Delete stage directions such as (whispered), *laughs* or [guitar solo]; they would be sung.\n"
    "4. One phrase per line; exactly one blank line between sections.\n"
    "Answer with the structured lyrics only: no title, no commentary, no code fences."
)


def messages(lyrics: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": normalise_text(lyrics)}]


def _key(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", line.casefold())).strip()


def _found(key: str, keys: set[str], joined: str) -> bool:
    if key in keys or key in joined:
        return True
    return any(difflib.SequenceMatcher(None, key, k).ratio() >= LINE_SIMILARITY for k in keys)


def validate(answer: str, source: str) -> str:
    """The answer's lyrics if they pass every check; InvalidAnswer naming the first failure otherwise."""
    text = normalise_text(strip_code_fence(answer))
    lines = [ln for ln in text.split("\n") if ln]
    if not lines:
        raise InvalidAnswer("answer is empty")
    sung = []
    for line in lines:
        if line.startswith("["):
            if line.lower() not in _MARKERS:
                raise InvalidAnswer(f"answer line {line!r} is not one of the allowed markers {sorted(_MARKERS)}")
        elif re.search(r"[\[\]]", line):
            raise InvalidAnswer(f"answer line {line!r} contains brackets outside a marker line")
        else:
            sung.append(line)
    if not sung:
        raise InvalidAnswer("answer has markers but no sung lines")

    source_line_keys = [_key(ln) for ln in normalise_text(source).split("\n")]
    source_keys = {k for k in source_line_keys if k}
    source_joined = " ".join(source_line_keys)
    invented = [ln for ln in sung if _key(ln) and not _found(_key(ln), source_keys, source_joined)]
    if invented:
        raise InvalidAnswer(f"answer has {len(invented)} line(s) that are not in the input, "
                            f"e.g. {invented[0]!r}: the model may only add structure")

    answer_keys = {_key(ln) for ln in sung}
    answer_joined = " ".join(_key(ln) for ln in sung)
    expected = [ln for ln in refine(source).text.split("\n") if ln and ln not in _MARKERS]
    dropped = [ln for ln in expected if not _found(_key(ln), answer_keys, answer_joined)]
    if expected and len(dropped) / len(expected) > MAX_DROPPED_FRACTION:
        raise InvalidAnswer(f"answer lacks {len(dropped)} of the input's {len(expected)} sung lines "
                            f"(more than {MAX_DROPPED_FRACTION:.0%}), e.g. {dropped[0]!r}")
    return "\n".join(line.lower() if line.lower() in _MARKERS else line for line in text.split("\n"))
