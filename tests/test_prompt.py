"""Prompt construction (spec §3) and the synthetic tokenizer it is tested with (spec §10)."""
from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from gpu_worker.checkpoints.synthetic_tokenizer import BOS_ID, EOS_ID, build_synthetic_tokenizer
from gpu_worker.model.prompt import GenConfig, PromptError, build_prompt

# deliberately not the published ids: nothing may hard-code 128000/128001
GEN = GenConfig(text_bos_id=BOS_ID, text_eos_id=EOS_ID, audio_eos_id=8193, empty_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


def text_column(prompt) -> list[int]:
    return prompt.tokens[:, 8].tolist()


# ---- strings ----

def test_tags_are_lower_cased_and_wrapped(tokenizer):
    assert build_prompt(tokenizer, GEN, "Pop,PIANO,Happy", "la").tags_text == "<tag>pop,piano,happy</tag>"


def test_already_wrapped_tags_are_not_wrapped_again(tokenizer):
    assert build_prompt(tokenizer, GEN, "<TAG>rock</TAG>", "la").tags_text == "<tag>rock</tag>"


def test_half_wrapped_tags_get_only_the_missing_end(tokenizer):
    assert build_prompt(tokenizer, GEN, "<tag>rock", "la").tags_text == "<tag>rock</tag>"
    assert build_prompt(tokenizer, GEN, "rock</tag>", "la").tags_text == "<tag>rock</tag>"


def test_tags_are_not_stripped_so_a_trailing_newline_stays_inside(tokenizer):
    assert build_prompt(tokenizer, GEN, "rock\n", "la").tags_text == "<tag>rock\n</tag>"


def test_lyrics_are_lower_cased_and_otherwise_unchanged(tokenizer):
    lyrics = "[Verse]\nHello World\n\n[Chorus]\nLa La  "
    assert build_prompt(tokenizer, GEN, "pop", lyrics).lyrics_text == "[verse]\nhello world\n\n[chorus]\nla la  "


# ---- ids and grid ----

def test_text_column_is_tags_then_muq_slot_then_lyrics_each_with_one_bos_and_eos(tokenizer):
    prompt = build_prompt(tokenizer, GEN, "pop", "[verse] hi")
    tag_ids = tokenizer.encode("<tag>pop</tag>").ids + [EOS_ID]
    lyric_ids = tokenizer.encode("[verse] hi").ids + [EOS_ID]
    assert tag_ids[0] == BOS_ID and tag_ids[1] != BOS_ID  # the tokenizer added BOS; not added twice
    assert text_column(prompt) == tag_ids + [GEN.empty_id] + lyric_ids
    assert prompt.muq_idx == len(tag_ids)
    assert prompt.length == len(tag_ids) + 1 + len(lyric_ids)


def test_bos_is_prepended_when_the_tokenizer_does_not_add_it(tokenizer):
    plain = build_synthetic_tokenizer()
    plain.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    ours = build_prompt(plain, GEN, "pop", "hi")
    assert text_column(ours) == text_column(build_prompt(tokenizer, GEN, "pop", "hi"))


def test_grid_has_9_columns_audio_columns_empty_and_mask_only_on_text(tokenizer):
    prompt = build_prompt(tokenizer, GEN, "pop", "hi")
    assert prompt.tokens.shape == (prompt.length, 9) and prompt.tokens.dtype == torch.long
    assert torch.all(prompt.tokens[:, :8] == GEN.empty_id)
    assert prompt.mask.dtype == torch.bool
    assert prompt.mask[:, 8].all() and not prompt.mask[:, :8].any()


def test_muq_slot_holds_empty_id_and_is_masked_in(tokenizer):
    prompt = build_prompt(tokenizer, GEN, "pop", "hi")
    assert prompt.tokens[prompt.muq_idx, 8] == GEN.empty_id
    assert prompt.mask[prompt.muq_idx, 8]


def test_special_ids_come_from_gen_config(tokenizer):
    other = GenConfig(text_bos_id=BOS_ID, text_eos_id=EOS_ID, audio_eos_id=8195, empty_id=3)
    prompt = build_prompt(tokenizer, other, "pop", "hi")
    assert prompt.audio_eos_id == 8195 and prompt.empty_id == 3
    assert prompt.tokens[prompt.muq_idx, 8] == 3 and torch.all(prompt.tokens[:, :8] == 3)


# ---- refusals ----

@pytest.mark.parametrize("tags", ["", "   ", "\n\t"])
def test_empty_or_whitespace_tags_are_refused_naming_tags(tokenizer, tags):
    with pytest.raises(PromptError, match="^tags") as info:
        build_prompt(tokenizer, GEN, tags, "la la")
    assert info.value.field == "tags"


@pytest.mark.parametrize("lyrics", ["", "  \n "])
def test_empty_or_whitespace_lyrics_are_refused_naming_lyrics(tokenizer, lyrics):
    with pytest.raises(PromptError, match="^lyrics") as info:
        build_prompt(tokenizer, GEN, "pop", lyrics)
    assert info.value.field == "lyrics"


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)


# ---- the synthetic tokenizer ----

def test_synthetic_tokenizer_is_deterministic():
    assert build_synthetic_tokenizer().to_str() == build_synthetic_tokenizer().to_str()


def test_synthetic_tokenizer_has_specials_at_256_and_257_and_fits_384_ids(tokenizer):
    assert tokenizer.token_to_id("<|begin_of_text|>") == 256
    assert tokenizer.token_to_id("<|end_of_text|>") == 257
    assert tokenizer.get_vocab_size() <= 384


def test_synthetic_tokenizer_prepends_bos_only_and_round_trips_any_text(tokenizer):
    text = "<tag>pop</tag> [verse] héllo wörld 🎵"
    ids = tokenizer.encode(text).ids
    assert ids[0] == BOS_ID and EOS_ID not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_synthetic_tokenizer_has_learned_merges(tokenizer):
    assert len(tokenizer.encode("<tag>").ids) < len("<tag>") + 1
