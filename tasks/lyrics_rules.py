"""Deterministic lyrics clean-up into HeartMuLa's layout (design.md §6): the `rules` backend.

What it does, in order:
1. Text: Unicode NFC; CRLF/CR and other line breaks -> '\\n'; zero-width and bidi control characters and
   other invisible controls removed (ZWNJ/ZWJ are kept where they join letters, as in Persian or Hindi);
   tabs and exotic spaces -> one space; lines trimmed; ' / ' splits a line into phrases (one per line).
2. Emoji are removed (the model was trained on text; an emoji is sung as byte noise) and every removed
   emoji is listed verbatim in `removed_directions`, like stage directions.
3. Section markers in any common spelling ('[Verse 1]', '(Chorus)', 'Pre-Chorus:', '[Hook]', '[Refrain]',
   '[Verse 2: Artist]', '【サビ】', '[Припев]') become exactly [intro] [verse] [prechorus] [chorus] [bridge]
   [outro]. Instrumental markers ('[Interlude]', '[Guitar Solo]', '[Break]', '[Drop]') are removed as
   directions; lines right after one form an unmarked block (step 5).
4. Stage directions would be sung, so they are removed and recorded: any other [..] / {..} / 【..】 text,
   *..* and (..) whose words are all direction words ('(whispered)', '*laughs*', '(x2)'). Other
   parentheses ('(ooh ooh)', '(I love you)') are sung backing lines and stay. Instrument, timbre and
   mood words in removed directions become `direction_tags` ('[guitar solo]' -> electric_guitar).
5. Blocks (separated by blank lines or markers) without a marker get one: a block that repeats is the
   [chorus], a repeated block always right before the chorus is the [prechorus], a one-off block after
   two choruses and before another is the [bridge], a short first/last block of a longer song is the
   [intro]/[outro], anything else a [verse]. An empty '[Chorus]' (or 'Repeat chorus') repeats the last
   chorus's lines - the user's own words, never new ones; an empty [intro]/[outro] stays (instrumental).
Words, case and language are never changed.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import regex

from tasks.tag_vocabulary import get_vocabulary

SECTION_KINDS: tuple[str, ...] = ("intro", "verse", "prechorus", "chorus", "bridge", "outro")
_INSTRUMENTAL = "instrumental"  # marker of a section without singing: removed, never emitted

# Label words -> kind. Multi-word keys are matched before single words ('pre chorus' before 'chorus').
_MARKER_WORDS: dict[str, str] = {
    **dict.fromkeys(["intro", "introduction", "opening", "prelude", "イントロ", "вступление"], "intro"),
    **dict.fromkeys(["verse", "couplet", "strophe", "verso", "strofa", "estrofa", "куплет", "a melo", "aメロ",
                     "stanza"], "verse"),
    **dict.fromkeys(["pre chorus", "prechorus", "pre hook", "prehook", "pre refrain", "build up", "buildup",
                     "build", "lift", "channel", "b melo", "bメロ", "предприпев"], "prechorus"),
    **dict.fromkeys(["chorus", "hook", "refrain", "post chorus", "postchorus", "coro", "estribillo", "ritornello",
                     "refrão", "sabi", "サビ", "припев", "副歌", "후렴"], "chorus"),
    **dict.fromkeys(["bridge", "middle 8", "middle eight", "puente", "ponte", "pont", "brücke", "c melo", "cメロ",
                     "бридж"], "bridge"),
    **dict.fromkeys(["outro", "ending", "coda", "end", "アウトロ", "концовка", "кода"], "outro"),
    **dict.fromkeys(["interlude", "break", "instrumental", "instrumental break", "solo", "drop", "breakdown",
                     "beat drop", "music break", "間奏", "проигрыш", "riff"], _INSTRUMENTAL),
}
# Only these may stand as a bare line without brackets or colon ('Chorus', 'Verse 2'): a lyric line
# that is just 'End' or 'Break' is more likely sung than meant as a marker.
_BARE_MARKER_WORDS = {"intro", "verse", "pre chorus", "prechorus", "chorus", "hook", "refrain", "bridge", "outro",
                      "post chorus"}
# Qualifiers that do not change the kind ('Final Chorus', 'Chorus x2', 'Verse 1').
_QUALIFIERS = re.compile(r"\b(final|last|first|second|third|fourth|1st|2nd|3rd|4th|double|half|short|long|"
                         r"extended|repeat|repeats|reprise|again|part|one|two|three|four|\d+|[ivx]+|x\s?\d+|\d+\s?x)\b")

# Words that make a parenthesised or starred fragment a direction rather than a sung line.
_DIRECTION_WORDS = set("""
whisper whispers whispered whispering spoken speaking speaks spoken-word talking laugh laughs laughing laughter
sigh sighs sighing breath breaths breathe breathes breathing inhale inhales exhale exhales scream screams screaming
shout shouts shouting yell yells yelling clap claps clapping applause cheer cheers cheering crowd instrumental solo
interlude break repeat fade fades fading out in pause silence beat drop music humming hums hum ad lib libs adlib
adlibs backing background vocal vocals harmony harmonies echo echoes softly quietly loudly slowly gently falsetto
rap rapping singing sung sings sing all together both male female choir the a and with of to gets builds rises
intro verse chorus prechorus pre-chorus hook refrain bridge outro x2 x3 x4 2x 3x 4x times twice guitar piano drums
bass synth strings sax saxophone violin cello trumpet horns organ riff riffs plays playing starts stops ends
笑 間奏 セリフ
""".split())
_INLINE_BRACKETS = re.compile(r"\[[^\[\]\n]*\]|\{[^{}\n]*\}|【[^【】\n]*】")
_INLINE_PARENS = re.compile(r"\([^()\n]*\)|（[^（）\n]*）")
_INLINE_STARS = re.compile(r"\*[^*\n]+\*")
_WHOLE_BRACKETED = re.compile(r"^([\[\{【])(.+)[\]\}】]:?$")
_WHOLE_PARENS = re.compile(r"^[(（](.+)[)）]:?$")
_LEADING_MARKER = re.compile(r"^[\[【]([^\]】]{1,40})[\]】]\s*(\S.*)$")
_COLON_LABEL = re.compile(r"^([^:：]{1,40})[:：]$")

_EMOJI = regex.compile(r"[0-9#*]\ufe0f?\u20e3|(?:\p{Extended_Pictographic}|\p{Regional_Indicator})"
                       r"(?:[\ufe0f\p{Emoji_Modifier}]|\u200d(?:\p{Extended_Pictographic}))*\ufe0f?")
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad\u200e\u200f\u202a-\u202e\u2066-\u2069\u180e]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\u0085\x0b\x0c]")
_SPACES = re.compile("[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_PHRASE_SPLIT = re.compile(r"\s+/{1,2}\s+")
_DIRECTION_TAG_CATEGORIES = ("instrument", "timbre", "mood")


@dataclass(frozen=True)
class RefinedLyrics:
    text: str
    sections: list[str]
    removed_directions: list[str]
    direction_tags: list[str]


@dataclass
class _Block:
    kind: str | None  # None: to be inferred
    lines: list[str] = field(default_factory=list)
    explicit: bool = False


def normalise_text(text: str) -> str:
    """Step 1 of the module doc: invisible and layout characters only; words stay as they are."""
    text = unicodedata.normalize("NFC", _LINE_BREAKS.sub("\n", text))
    text = _INVISIBLE.sub("", text)
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc" or ch == "\t")
    lines: list[str] = []
    for line in text.split("\n"):
        lines.extend(p.strip() for p in _PHRASE_SPLIT.split(_SPACES.sub(" ", line).strip()))
    return "\n".join(lines)


def _label_keys(label: str) -> tuple[str, str]:
    """The label as written and without qualifiers: ('middle 8', 'middle'), ('verse 2', 'verse')."""
    key = unicodedata.normalize("NFKC", label).casefold()
    key = key.split(":")[0].split("：")[0]  # '[Verse 2: Artist]' -> 'verse 2'
    key = re.sub(r"\s+", " ", re.sub(r"[\-_/.,()\[\]#!?]+", " ", key)).strip()
    return key, re.sub(r"\s+", " ", _QUALIFIERS.sub(" ", key)).strip()


def section_kind(label: str, *, exact: bool = False) -> str | None:
    """The kind a marker label names ('Pre-Chorus 2' -> 'prechorus'), or None if it names none.

    exact: the label must be a marker word (plus qualifiers) and nothing else - for forms where a
    sung line could look like a label ('(break my heart)', 'And she said:').
    """
    written, key = _label_keys(label)
    for candidate in (written, key):
        if candidate in _MARKER_WORDS:
            return _MARKER_WORDS[candidate]
    words = key.split()
    if exact or not words or len(words) > 4:
        return None
    for n in (3, 2, 1):  # 'guitar solo' -> 'solo'; 'rap verse' -> 'verse'
        for i in range(len(words) - n + 1):
            kind = _MARKER_WORDS.get(" ".join(words[i:i + n]))
            if kind:
                return kind
    if any(ch in key for ch in ("サビ", "メロ")):
        return "chorus" if "サビ" in key else "verse"
    return None


def _marker(line: str) -> str | None:
    """The section kind if the whole line is a marker, in any of the accepted forms."""
    if m := _WHOLE_BRACKETED.match(line):  # [..] is never sung: any marker word inside counts
        return section_kind(m.group(2))
    if m := _WHOLE_PARENS.match(line):  # (..) may be a sung line: exact, or all direction words
        return section_kind(m.group(1), exact=not _is_direction(m.group(1)))
    if m := _COLON_LABEL.match(line):
        return section_kind(m.group(1), exact=True)
    written, key = _label_keys(line)
    if key in _BARE_MARKER_WORDS and len(written.split()) <= 3:
        return _MARKER_WORDS[key]
    return None


def _is_direction(fragment: str) -> bool:
    words = re.findall(r"[^\W_]+(?:-[^\W_]+)*", fragment.casefold().replace("×", "x"))
    return bool(words) and all(w in _DIRECTION_WORDS or re.fullmatch(r"x\d+|\d+x", w) for w in words)


def _strip_directions(line: str, removed: list[str]) -> str:
    def drop(m: re.Match[str]) -> str:
        removed.append(m.group(0))
        return " "

    def maybe(m: re.Match[str]) -> str:
        return drop(m) if _is_direction(m.group(0)[1:-1]) else m.group(0)

    def stars(m: re.Match[str]) -> str:  # '*laughs*' is a direction; '*really*' is emphasis: keep the word
        return drop(m) if _is_direction(m.group(0)[1:-1]) else m.group(0)[1:-1]

    line = _INLINE_BRACKETS.sub(drop, line)
    line = _INLINE_STARS.sub(stars, line)
    line = _INLINE_PARENS.sub(maybe, line)
    return _SPACES.sub(" ", line).strip()


def _line_key(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s']", " ", line.casefold())).strip()


def _similar(a: _Block, b: _Block) -> bool:
    ka, kb = [_line_key(x) for x in a.lines], [_line_key(x) for x in b.lines]
    if not ka or not kb:
        return False
    if ka == kb:
        return True
    shared = len(set(ka) & set(kb))
    return min(len(ka), len(kb)) >= 2 and shared / min(len(set(ka)), len(set(kb))) >= 0.6


def _infer_kinds(blocks: list[_Block]) -> None:
    n = len(blocks)
    group = list(range(n))
    for i in range(n):
        for j in range(i):
            if _similar(blocks[i], blocks[j]):
                group[i] = group[j]
                break
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    repeated = {g: idx for g, idx in members.items() if len(idx) > 1}
    for idx in repeated.values():  # a repeat of an explicitly marked block is that kind again
        known = [blocks[i].kind for i in idx if blocks[i].explicit]
        if known:
            for i in idx:
                blocks[i].kind = blocks[i].kind or max(set(known), key=known.count)
    open_groups = [g for g, idx in repeated.items() if all(blocks[i].kind is None for i in idx)]
    if open_groups:
        # Most repeated, then longest; on a tie the later one (a prechorus leads into its chorus).
        chorus = max(open_groups, key=lambda g: (len(repeated[g]), len(blocks[repeated[g][0]].lines), g))
        for i in repeated[chorus]:
            blocks[i].kind = "chorus"
        for g in open_groups:
            if g == chorus:
                continue
            precedes = all(i + 1 < n and group[i + 1] == chorus for i in repeated[g])
            for i in repeated[g]:
                blocks[i].kind = "prechorus" if precedes else "chorus"
    sizes = sorted(len(b.lines) for b in blocks)
    median = sizes[len(sizes) // 2] if sizes else 0
    for i, block in enumerate(blocks):
        if block.kind is not None:
            continue
        choruses_before = sum(b.kind == "chorus" for b in blocks[:i])
        if n >= 3 and median >= 4 and len(block.lines) <= 2 and i in (0, n - 1):
            block.kind = "intro" if i == 0 else "outro"
        elif choruses_before >= 2 and i + 1 < n and blocks[i + 1].kind == "chorus":
            block.kind = "bridge"
        else:
            block.kind = "verse"


def _direction_tags(removed: list[str]) -> list[str]:
    vocab = get_vocabulary()
    tags: list[str] = []
    for fragment in removed:
        for m in vocab.find_in_text(fragment):
            if m.category in _DIRECTION_TAG_CATEGORIES and not m.negated and m.tag not in tags:
                tags.append(m.tag)
    return tags


def refine(lyrics: str) -> RefinedLyrics:
    """Clean and structure lyrics (see the module doc). The text may come out empty: the caller checks."""
    removed: list[str] = []
    text = normalise_text(lyrics)

    def remove_emoji(m: re.Match[str]) -> str:
        removed.append(m.group(0))
        return ""

    text = _EMOJI.sub(remove_emoji, text)
    blocks: list[_Block] = []
    current: _Block | None = None
    for line in text.split("\n"):
        kind = _marker(line) if line else None
        if kind is None and (lead := _LEADING_MARKER.match(line)):
            kind = section_kind(lead.group(1))
            if kind is not None:  # '[Chorus] I love you': a marker, then its first line
                blocks.append(current := _Block(kind=kind, explicit=True))
                line, kind = lead.group(2), None
        if kind is not None:
            if kind == _INSTRUMENTAL:
                removed.append(line)
            blocks.append(current := _Block(kind=kind, explicit=True))
            continue
        if not line:
            if current is not None and (current.lines or not current.explicit):
                current = None  # a blank line ends a block; right after a marker it is just spacing
            continue
        line = _strip_directions(line, removed)
        if not line:
            continue  # a line that was only a direction
        if current is None:
            blocks.append(current := _Block(kind=None))
        current.lines.append(line)

    kept: list[_Block] = []
    for block in blocks:
        if block.kind == _INSTRUMENTAL:
            if block.lines:  # words sung after '[Guitar Solo]': a section like any unmarked one
                kept.append(_Block(kind=None, lines=block.lines))
            continue
        if not block.lines and block.kind not in ("intro", "outro"):
            earlier = [b for b in kept if b.kind == block.kind and b.lines]
            if not earlier:
                continue  # an empty marker with nothing to repeat says nothing
            block.lines = list(earlier[-1].lines)
        kept.append(block)
    _infer_kinds(kept)
    # An empty intro/outro marker only makes sense around sung sections.
    if not any(b.lines for b in kept):
        kept = []
    body = "\n\n".join("\n".join([f"[{b.kind}]", *b.lines]) for b in kept)
    sections = [b.kind for b in kept if b.kind is not None]
    assert len(sections) == len(kept), "_infer_kinds names every block"
    return RefinedLyrics(text=body, sections=sections, removed_directions=removed,
                         direction_tags=_direction_tags(removed))
