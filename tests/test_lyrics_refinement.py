"""Stage 1, lyrics refinement with the offline `rules` backend (and `off`): what comes out for real inputs."""
from __future__ import annotations

import pytest

from tasks.contracts import RefineLyricsInput
from tasks.lyrics_refinement import CONTEXT_TOKENS, LyricsError, estimate_prompt_tokens, refine_lyrics
from tasks.lyrics_rules import section_kind
from tasks.settings import Settings

SETTINGS = Settings()


def refine(lyrics: str, *, backend: str = "rules", max_frames: int = 3000):
    return refine_lyrics(RefineLyricsInput(lyrics=lyrics, backend=backend, allow_fallback=False,
                                           max_frames=max_frames), SETTINGS)


# (name, input, expected output lyrics)
CASES = [
    ("seed story: one line with slashes becomes one phrase per line",
     "de doo doo doo / de blaa blaa blaa / is all I want to sing to you",
     "[verse]\nde doo doo doo\nde blaa blaa blaa\nis all I want to sing to you"),
    ("mixed marker spellings, CRLF, tabs and trailing spaces",
     "[Verse 1]\r\nI woke up early\t \r\nthe sun was in my eyes  \r\n\r\nPre-Chorus:\r\nhere it comes\r\n\r\n"
     "(Chorus)\r\nOh oh we sing\r\nall night long\r\n\r\n[Verse 2: Guest]\r\nnew day\r\n\r\n[Hook]\r\nOh oh we sing\r\n",
     "[verse]\nI woke up early\nthe sun was in my eyes\n\n[prechorus]\nhere it comes\n\n"
     "[chorus]\nOh oh we sing\nall night long\n\n[verse]\nnew day\n\n[chorus]\nOh oh we sing"),
    ("refrain, middle 8, final chorus and coda spellings",
     "[Intro]\n\n[Refrain]\nla la\n\n[Middle 8]\nhere\n\n[Final Chorus]\nla la\n\n[Coda]\nbye",
     "[intro]\n\n[chorus]\nla la\n\n[bridge]\nhere\n\n[chorus]\nla la\n\n[outro]\nbye"),
    ("no markers: the repeated block is the chorus, the one-off after two choruses the bridge",
     "I walk the line\nI hold the key\n\nla la love me\nla la leave me\n\nthe morning came\nthe coffee cold\n\n"
     "la la love me\nla la leave me\n\nand then the rain\nwashed it away\n\nla la love me\nla la leave me",
     "[verse]\nI walk the line\nI hold the key\n\n[chorus]\nla la love me\nla la leave me\n\n"
     "[verse]\nthe morning came\nthe coffee cold\n\n[chorus]\nla la love me\nla la leave me\n\n"
     "[bridge]\nand then the rain\nwashed it away\n\n[chorus]\nla la love me\nla la leave me"),
    ("no markers: a block always right before the chorus is the prechorus",
     "one two\nthree four\n\nhere we go\nup we go\n\nsing it loud\nsing it proud\n\nfive six\nseven eight\n\n"
     "here we go\nup we go\n\nsing it loud\nsing it proud",
     "[verse]\none two\nthree four\n\n[prechorus]\nhere we go\nup we go\n\n[chorus]\nsing it loud\nsing it proud\n\n"
     "[verse]\nfive six\nseven eight\n\n[prechorus]\nhere we go\nup we go\n\n[chorus]\nsing it loud\nsing it proud"),
    ("an empty chorus marker repeats the last chorus's lines",
     "[Verse]\nhello\n\n[Chorus]\nyeah yeah\n\n[Verse]\nagain\n\n[Chorus]",
     "[verse]\nhello\n\n[chorus]\nyeah yeah\n\n[verse]\nagain\n\n[chorus]\nyeah yeah"),
    ("stage directions removed, sung parentheses kept, words and case kept",
     "[Verse]\nHello (whispered) World *laughs*\n[guitar solo]\nshe said (I love you)\n(spoken)\nyes *really*",
     "[verse]\nHello World\n\n[verse]\nshe said (I love you)\nyes really"),
    ("emoji removed, including skin tones, ZWJ sequences and flags",
     "[Chorus]\nfire 🔥 in the sky ❤️\n👍🏽 👨‍👩‍👧 🇯🇵 dance",
     "[chorus]\nfire in the sky\ndance"),
    ("zero-width and bidi marks, NBSP and NFD accents",
     "[Verse]\ncafe\u0301 au\u00a0lait\u200b\n\ufeffnai\u0308ve",
     "[verse]\ncafé au lait\nnaïve"),
    ("Japanese: 【サビ】/【Aメロ】 markers, full-width space, （笑） direction",
     "【Aメロ】\n夜の街を歩いて\n君のことを\u3000思う\n\n【サビ】\n愛してる（笑）",
     "[verse]\n夜の街を歩いて\n君のことを 思う\n\n[chorus]\n愛してる"),
    ("Cyrillic: [Куплет]/[Припев] markers, words untouched",
     "[Куплет 1]\nЯ иду по улице\nИ думаю о тебе\n\n[Припев]\nЛюбовь моя",
     "[verse]\nЯ иду по улице\nИ думаю о тебе\n\n[chorus]\nЛюбовь моя"),
    ("Arabic: right-to-left marks removed, letters untouched",
     "[Verse]\nأنا أحبك\u200f يا حبيبي\nفي الليل\n\n[Chorus]\nيا ليل يا عين",
     "[verse]\nأنا أحبك يا حبيبي\nفي الليل\n\n[chorus]\nيا ليل يا عين"),
    ("a marker and its first line on one line",
     "[Chorus] I love you\nyou love me",
     "[chorus]\nI love you\nyou love me"),
    ("lines that only look like markers stay sung",
     "[Verse]\nThe break of dawn:\n(break my heart)\nChorus of birds singing",
     "[verse]\nThe break of dawn:\n(break my heart)\nChorus of birds singing"),
]


@pytest.mark.parametrize("name,lyrics,expected", CASES, ids=[c[0] for c in CASES])
def test_rules_output(name: str, lyrics: str, expected: str) -> None:
    assert refine(lyrics).lyrics == expected


def test_rules_records_removed_directions_and_turns_instrument_words_into_tags() -> None:
    out = refine("[Verse]\nHello (whispered) world *laughs*\n[Guitar Solo]\n(softly) goodbye")
    assert out.removed_directions == ["*laughs*", "(whispered)", "[Guitar Solo]", "(softly)"]
    assert out.direction_tags == ["whispery", "electric_guitar", "soft"]


def test_rules_records_removed_emoji_verbatim() -> None:
    assert refine("[Verse]\nfire 🔥 ok 👍🏽").removed_directions == ["🔥", "👍🏽"]


def test_rules_lists_sections_in_order() -> None:
    out = refine("[Intro]\n\n[Verse]\na\n\n[Chorus]\nb\n\n[Outro]\nc")
    assert out.sections == ["intro", "verse", "chorus", "outro"]
    assert out.backend_used == "rules" and not out.fell_back


def test_rules_is_idempotent() -> None:
    once = refine(CASES[3][1]).lyrics
    assert refine(once).lyrics == once


@pytest.mark.parametrize("label,kind", [
    ("Verse 1", "verse"), ("VERSE TWO", "verse"), ("Pre-Chorus", "prechorus"), ("pre chorus 2", "prechorus"),
    ("Hook", "chorus"), ("Refrain", "chorus"), ("Post-Chorus", "chorus"), ("Chorus x2", "chorus"),
    ("Bridge", "bridge"), ("Middle 8", "bridge"), ("Outro", "outro"), ("Intro", "intro"),
    ("Verse 2: Kendrick Lamar", "verse"), ("Interlude", "instrumental"), ("Guitar Solo", "instrumental"),
    ("Break", "instrumental"), ("Estribillo", "chorus"), ("Produced by X", None), ("love me", None),
])
def test_section_kind_maps_marker_spellings(label: str, kind: str | None) -> None:
    assert section_kind(label) == kind


def test_only_directions_and_emoji_is_an_error_naming_what_was_removed() -> None:
    with pytest.raises(LyricsError, match="nothing singable.*guitar solo"):
        refine("[Intro]\n[guitar solo]\n🔥🔥")


def test_budget_estimate_is_utf8_bytes_plus_specials_and_tag_reserve() -> None:
    assert estimate_prompt_tokens("abc") == 3 + 2 + 256
    assert estimate_prompt_tokens("愛") == 3 + 2 + 256  # 3 UTF-8 bytes: an upper bound on its tokens


def test_over_long_lyrics_fail_with_the_numbers() -> None:
    lyrics = "\n".join(f"this is line number {i} of a song that never ends" for i in range(120))
    with pytest.raises(LyricsError) as err:
        refine(lyrics, max_frames=3000)
    message = str(err.value)
    assert "max_frames=3000" in message and f"> {CONTEXT_TOKENS}" in message and "estimated prompt tokens" in message


def test_same_lyrics_fit_a_shorter_song() -> None:
    lyrics = "\n".join(f"this is line number {i} of a song that never ends" for i in range(120))
    out = refine(lyrics, max_frames=500)
    assert out.estimated_prompt_tokens + 500 <= CONTEXT_TOKENS


def test_off_passes_text_through_but_still_checks_the_budget() -> None:
    out = refine("Verse one\n  keep   as is ", backend="off")
    assert out.lyrics == "Verse one\n  keep   as is " and out.backend_used == "off"
    with pytest.raises(LyricsError, match="too long"):
        refine("x" * 6000, backend="off")
