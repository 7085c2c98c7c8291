"""Stage 2, tags generation: pick the backend, keep the user's tags, order and check the result.

Backends: `embedding` (tasks/embedding_tagger.py, offline), `llm` (an OpenAI-compatible endpoint, answer
checked by tasks/tags_llm.py), `given` (only the user's tags). In every backend the user's tags are
kept exactly as normalised and never contradicted: a user genre means no second genre, a user gender
no other gender, and a generated tag that conflicts with a user tag (vocabulary 'conflicts') is dropped.
Output order: genre first, then timbre, gender, mood, instrument, scene, region, topic (design.md §6);
tags outside the vocabulary (only ever the user's) last. The output is never empty.
"""
from __future__ import annotations

from tasks import embedding_tagger, tags_llm
from tasks.contracts import MAX_TAGS, GenerateTagsInput, GenerateTagsOutput, LlmExchange, TagsBackend, parse_tags
from tasks.llm_client import InvalidAnswer, LlmError, LlmStageError, chat
from tasks.settings import Settings
from tasks.tag_vocabulary import ScoredTag, get_vocabulary

_EXCLUSIVE = ("genre", "gender")  # categories where a user tag leaves no room for a generated one


class TagsError(LlmStageError):
    """Stage 2 failed; carries the LLM exchanges of a failed `llm` run."""


def _normalised(field: str, values: list[str] | None) -> list[str]:
    if not values:
        return []
    try:
        return parse_tags(values)
    except ValueError as exc:
        raise TagsError(f"{field}={values!r}: {exc}") from None


def _fixed_tags(inp: GenerateTagsInput) -> tuple[list[str], list[str]]:
    """The user's tags, and stage 1's tags that neither repeat nor contradict them."""
    vocab = get_vocabulary()
    user = _normalised("user_tags", inp.user_tags)
    extra: list[str] = []
    for tag in _normalised("extra_tags", inp.extra_tags):
        seen = {vocab.canonical(t) or t for t in user + extra}
        if (vocab.canonical(tag) or tag) not in seen and not any(vocab.conflict(tag, t) for t in user + extra):
            extra.append(tag)
    return user, extra


def _assemble(user: list[str], extra: list[str], generated: list[ScoredTag], backend: TagsBackend,
              **fields) -> GenerateTagsOutput:
    vocab = get_vocabulary()
    chosen: dict[str, float] = {}
    for tag in user + extra:
        chosen.setdefault(tag, 1.0)
    fixed_categories = {vocab.category(t) for t in user} - {None}
    for item in generated:
        taken = {vocab.canonical(t) or t for t in chosen}
        if item.category in _EXCLUSIVE and item.category in fixed_categories:
            continue
        if item.tag in taken or any(vocab.conflict(item.tag, t) for t in chosen):
            continue
        chosen[item.tag] = item.score

    def rank(tag: str) -> int:
        category = vocab.category(tag)
        return vocab.category_order.index(category) if category else len(vocab.category_order)

    ordered = sorted(chosen, key=rank)  # stable: the user's first within a category
    user_set = set(user)
    while len(ordered) > MAX_TAGS:  # the user's tags (at most MAX_TAGS) are the last to go
        ordered.remove(next(t for t in reversed(ordered) if t not in user_set))
    if not ordered:
        raise TagsError(f"tags_backend={backend}: no tag could be chosen")
    return GenerateTagsOutput(tags=ordered, tags_string=",".join(ordered), backend_used=backend,
                              scores={t: chosen[t] for t in ordered}, **fields)


def _given(inp: GenerateTagsInput) -> GenerateTagsOutput:
    user = _normalised("user_tags", inp.user_tags)
    if not user:
        raise TagsError(f"tags_backend=given needs the user's tags (field 'tags'), got {inp.user_tags!r}")
    return _assemble(user, [], [], "given")


def _embedding(inp: GenerateTagsInput, **fields) -> GenerateTagsOutput:
    user, extra = _fixed_tags(inp)
    try:
        generated = embedding_tagger.choose_tags(inp.style or "", inp.lyrics, user + extra)
    except (embedding_tagger.EmbeddingUnavailable, ValueError) as exc:
        raise TagsError(f"tags_backend=embedding could not choose tags: {exc}") from exc
    return _assemble(user, extra, generated, "embedding", **fields)


def _llm(inp: GenerateTagsInput, settings: Settings) -> GenerateTagsOutput:
    vocab = get_vocabulary()
    user, extra = _fixed_tags(inp)
    exchanges: list[LlmExchange] = []
    try:
        answer = chat(settings, tags_llm.messages(inp.style or "", user, inp.lyrics, vocab), json_mode=True)
        exchanges = answer.exchanges
        return _assemble(user, extra, tags_llm.parse(answer.content, vocab), "llm", llm_exchanges=exchanges)
    except LlmError as exc:
        reason, exchanges = str(exc), exc.exchanges
    except InvalidAnswer as exc:
        reason = f"LLM answer rejected: {exc}"
    if not inp.allow_fallback:
        raise TagsError(f"tags_backend=llm failed and allow_fallback is false: {reason}", exchanges)
    return _embedding(inp, fell_back=True, fallback_reason=reason, llm_exchanges=exchanges)


def generate_tags(inp: GenerateTagsInput, settings: Settings) -> GenerateTagsOutput:
    if inp.backend == "given":
        return _given(inp)
    if inp.backend == "embedding":
        return _embedding(inp)
    return _llm(inp, settings)
