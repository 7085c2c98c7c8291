"""The `llm` tags backend's prompt and the checks its JSON answer must pass.

Accepted shape: {"genre": "<one genre>", "tags": ["<tag>", ...]}. Every tag is mapped through the
vocabulary (canonical tags and aliases: "hip hop" -> hip_hop, "horn section" -> brass); unknown tags are
dropped, but an answer with more unknown than known tags is rejected as not following the instructions.
The genre must be a known genre and the only one named.
"""
from __future__ import annotations

import json

from tasks.llm_client import InvalidAnswer, strip_code_fence
from tasks.tag_vocabulary import ScoredTag, TagVocabulary

LYRICS_CHARS = 1500  # enough to see the theme; the vocabulary is the long part of the prompt


def messages(style: str, user_tags: list[str], lyrics: str, vocab: TagVocabulary) -> list[dict]:
    listing = "\n".join(f"{category} (at most {vocab.max_generated[category]}): {', '.join(vocab.tags[category])}"
                        for category in vocab.category_order if category != "gender")
    system = (
        "You choose style tags for a music generation model, only from this vocabulary:\n"
        f"{listing}\ngender: male, female (only if the description says who sings)\n"
        'Answer with one JSON object and nothing else: {"genre": "<exactly one genre>", "tags": ["<other tags>"]}. '
        "Write tags exactly as listed. Never contradict the user's tags."
    )
    user = (f"Style description: {style or '(none)'}\n"
            f"User tags (kept as they are): {', '.join(user_tags) or '(none)'}\n"
            f"Lyrics:\n{lyrics[:LYRICS_CHARS]}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse(answer: str, vocab: TagVocabulary) -> list[ScoredTag]:
    """The answer's tags, canonical, genre first; InvalidAnswer naming the problem otherwise."""
    try:
        data = json.loads(strip_code_fence(answer))
    except ValueError as exc:
        raise InvalidAnswer(f"answer is not JSON ({exc}): {answer[:200]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("genre"), str):
        raise InvalidAnswer(f'answer must be an object with a "genre" string, got {answer[:200]!r}')
    raw_tags = data.get("tags", [])
    if not isinstance(raw_tags, list) or not all(isinstance(t, str) for t in raw_tags):
        raise InvalidAnswer(f'answer "tags" must be a list of strings, got {raw_tags!r}')
    genre = vocab.canonical(data["genre"])
    if genre is None or vocab.category_of[genre] != "genre":
        raise InvalidAnswer(f"answer genre {data['genre']!r} is not a genre of the vocabulary")

    chosen = [ScoredTag(genre, "genre", 1.0, "llm")]
    unknown = []
    for raw in raw_tags:
        tag = vocab.canonical(raw)
        if tag is None:
            unknown.append(raw)
        elif vocab.category_of[tag] == "genre" and tag != genre:
            raise InvalidAnswer(f"answer names a second genre {raw!r} besides {genre!r}: exactly one is allowed")
        elif tag not in {c.tag for c in chosen}:
            chosen.append(ScoredTag(tag, vocab.category_of[tag], 1.0, "llm"))
    if len(unknown) > len(chosen):
        raise InvalidAnswer(f"answer has more tags outside the vocabulary than in it: {unknown}")
    return chosen
