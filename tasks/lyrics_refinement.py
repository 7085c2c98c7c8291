"""Stage 1, lyrics refinement: pick the backend, enforce the prompt budget, fall back only when allowed.

Backends: `rules` (tasks/lyrics_rules.py, offline, deterministic), `llm` (an OpenAI-compatible endpoint,
answer checked by tasks/lyrics_llm.py, then passed through the rules for canonical layout), `off` (the
text as given). Every result is non-empty and within the budget, or this stage fails with LyricsError.
"""
from __future__ import annotations

from tasks import lyrics_llm, lyrics_rules
from tasks.contracts import LlmExchange, LyricsBackend, RefineLyricsInput, RefineLyricsOutput
from tasks.llm_client import InvalidAnswer, LlmError, LlmStageError, chat
from tasks.settings import Settings

CONTEXT_TOKENS = 8192  # HeartMuLa's RoPE table and KV cache: prompt + frames must fit (model-spec §4)
TEXT_SPECIALS = 2  # BOS + EOS around the lyrics
# The tags are unknown at this stage: room for a '<tag>...</tag>' prompt of up to 32 tags, its BOS/EOS
# and the MuQ slot. The token stage checks the exact length before prefill.
TAG_PROMPT_RESERVE = 256


class LyricsError(LlmStageError):
    """Stage 1 failed; carries the LLM exchanges of a failed `llm` run."""


def estimate_prompt_tokens(lyrics: str) -> int:
    """An upper bound on the prompt's length in tokens.

    The tokenizer is byte-level BPE: every token covers at least one UTF-8 byte, so the byte count of the
    lower-cased lyrics (what the prompt builder encodes) bounds their token count from above. Real counts
    are about 4x lower for English and 1-2x for CJK; being over is safe, being under would crash.
    """
    return len(lyrics.lower().encode("utf-8")) + TEXT_SPECIALS + TAG_PROMPT_RESERVE


def check_budget(lyrics: str, max_frames: int) -> int:
    tokens = estimate_prompt_tokens(lyrics)
    if tokens + max_frames > CONTEXT_TOKENS:
        over = tokens + max_frames - CONTEXT_TOKENS
        raise LyricsError(
            f"lyrics too long for max_frames={max_frames}: estimated prompt tokens {tokens} (upper bound: "
            f"{tokens - TEXT_SPECIALS - TAG_PROMPT_RESERVE} UTF-8 bytes of lyrics + {TEXT_SPECIALS} BOS/EOS + "
            f"{TAG_PROMPT_RESERVE} reserved for tags) + {max_frames} frames = {tokens + max_frames} > "
            f"{CONTEXT_TOKENS}; shorten the lyrics by at least {over} bytes or lower max_audio_length_ms")
    return tokens


def _rules(inp: RefineLyricsInput, text: str, backend: LyricsBackend, **extra) -> RefineLyricsOutput:
    refined = lyrics_rules.refine(text)
    if not refined.text.strip():
        raise LyricsError(f"lyrics: nothing singable is left after removing markers, stage directions and "
                          f"emoji (removed: {refined.removed_directions}); input was {inp.lyrics[:200]!r}")
    tokens = check_budget(refined.text, inp.max_frames)
    return RefineLyricsOutput(lyrics=refined.text, backend_used=backend, sections=refined.sections,
                              removed_directions=refined.removed_directions,
                              direction_tags=refined.direction_tags, estimated_prompt_tokens=tokens, **extra)


def _off(inp: RefineLyricsInput) -> RefineLyricsOutput:
    tokens = check_budget(inp.lyrics, inp.max_frames)
    return RefineLyricsOutput(lyrics=inp.lyrics, backend_used="off", estimated_prompt_tokens=tokens)


def _llm(inp: RefineLyricsInput, settings: Settings) -> RefineLyricsOutput:
    exchanges: list[LlmExchange] = []
    try:
        answer = chat(settings, lyrics_llm.messages(inp.lyrics))
        exchanges = answer.exchanges
        structured = lyrics_llm.validate(answer.content, inp.lyrics)
        return _rules(inp, structured, "llm", llm_exchanges=exchanges)
    except LlmError as exc:
        reason, exchanges = str(exc), exc.exchanges
    except (InvalidAnswer, LyricsError) as exc:
        reason = f"LLM answer rejected: {exc}"
    if not inp.allow_fallback:
        raise LyricsError(f"lyrics_backend=llm failed and allow_fallback is false: {reason}", exchanges)
    return _rules(inp, inp.lyrics, "rules", fell_back=True, fallback_reason=reason, llm_exchanges=exchanges)


def refine_lyrics(inp: RefineLyricsInput, settings: Settings) -> RefineLyricsOutput:
    if inp.backend == "rules":
        return _rules(inp, inp.lyrics, "rules")
    if inp.backend == "off":
        return _off(inp)
    return _llm(inp, settings)
