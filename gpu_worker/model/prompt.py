"""HeartMuLa prompt construction (spec §3): tags and lyrics -> a token grid with its mask.

Applies exactly the reference's transformations (lower-casing, the `<tag>` wrapper, BOS/EOS) and
no more, except that empty tags or lyrics are refused: an empty tag string would otherwise become a
valid-looking `<tag></tag>` prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

GRID_COLUMNS = 9  # 8 audio codebooks + 1 text column
TEXT_COLUMN = 8


class PromptError(ValueError):
    """Unusable prompt input; `field` names it ("tags" or "lyrics")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GenConfig:
    """Special ids of `gen_config.json` (spec §1.4); never hard-coded elsewhere."""

    text_bos_id: int
    text_eos_id: int
    audio_eos_id: int
    empty_id: int


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor  # [L, 9] int64: audio columns 0..7 = empty_id, text column = tags | empty | lyrics
    mask: torch.Tensor  # [L, 9] bool: True only in the text column (MuQ slot included)
    muq_idx: int  # position of the MuQ slot, right after the tags
    tags_text: str  # the exact strings that were tokenised, for recording
    lyrics_text: str
    audio_eos_id: int  # carried along so generation needs no separate gen_config
    empty_id: int

    @property
    def length(self) -> int:
        return self.tokens.shape[0]


def _require_text(field: str, value: str) -> None:
    if not isinstance(value, str):
        raise PromptError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise PromptError(field, "is empty or whitespace only")


def wrap_tags(tags: str) -> str:
    """Lower-case and wrap in `<tag>...</tag>` unless already wrapped; no stripping, no spaces added."""
    text = tags.lower()
    if not text.startswith("<tag>"):
        text = "<tag>" + text
    if not text.endswith("</tag>"):
        text = text + "</tag>"
    return text


def encode_with_bos_eos(tokenizer: Tokenizer, text: str, gen_config: GenConfig) -> list[int]:
    """Encode with the tokenizer's own special-token handling, then make sure BOS leads and EOS ends."""
    ids = tokenizer.encode(text).ids
    if not ids or ids[0] != gen_config.text_bos_id:
        ids = [gen_config.text_bos_id, *ids]
    if ids[-1] != gen_config.text_eos_id:
        ids = [*ids, gen_config.text_eos_id]
    return ids


def build_prompt(tokenizer: Tokenizer, gen_config: GenConfig, tags: str, lyrics: str) -> Prompt:
    # checked before wrapping: "<tag></tag>" must never pass as a real prompt
    _require_text("tags", tags)
    _require_text("lyrics", lyrics)
    tags_text = wrap_tags(tags)
    lyrics_text = lyrics.lower()
    tag_ids = encode_with_bos_eos(tokenizer, tags_text, gen_config)
    lyric_ids = encode_with_bos_eos(tokenizer, lyrics_text, gen_config)

    text = torch.tensor([*tag_ids, gen_config.empty_id, *lyric_ids], dtype=torch.long)
    tokens = torch.full((text.shape[0], GRID_COLUMNS), gen_config.empty_id, dtype=torch.long)
    tokens[:, TEXT_COLUMN] = text
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, TEXT_COLUMN] = True
    return Prompt(tokens=tokens, mask=mask, muq_idx=len(tag_ids), tags_text=tags_text, lyrics_text=lyrics_text,
                  audio_eos_id=gen_config.audio_eos_id, empty_id=gen_config.empty_id)
