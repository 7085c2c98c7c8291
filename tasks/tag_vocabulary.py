"""The tag vocabulary (tasks/data/tag_vocabulary.json): canonical tags per category, their aliases, conflicts.

Loaded once per process and validated as a whole: every problem is listed in one VocabularyError, so a bad
edit of the data file fails at start-up with all its mistakes named, never at the first odd request.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tasks.contracts import TAG_PATTERN, normalise_tag

VOCABULARY_PATH = Path(__file__).with_name("data") / "tag_vocabulary.json"
CATEGORIES: tuple[str, ...] = ("genre", "timbre", "gender", "mood", "instrument", "scene", "region", "topic")
# Words that negate the phrase right after them ("no drums", "without vocals"): such a tag is excluded.
_NEGATIONS = ("no", "without", "not", "non", "zero", "minus", "never")


class VocabularyError(ValueError):
    pass


def phrase_key(text: str) -> str:
    """The form in which aliases and free text are compared: 'Hip-Hop' == 'hip hop' == 'hip_hop'."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    text = re.sub(r"[_\-/]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class PhraseMatch:
    tag: str
    category: str
    phrase: str  # the alias as found
    start: int  # offset in phrase_key(text)
    negated: bool


@dataclass(frozen=True)
class ScoredTag:
    tag: str
    category: str
    score: float
    source: str  # "keyword" | "embedding" | "llm"


@dataclass(frozen=True)
class TagVocabulary:
    category_order: tuple[str, ...]
    tags: dict[str, tuple[str, ...]]  # category -> canonical tags, in file order
    category_of: dict[str, str]  # canonical tag -> category
    phrases_of: dict[str, tuple[str, ...]]  # canonical tag -> its own words first, then its aliases
    alias_to_tag: dict[str, str]  # phrase_key -> canonical tag
    descriptions: dict[str, str]  # canonical tag -> text only the embedding tagger reads
    max_generated: dict[str, int]
    conflicts: frozenset[frozenset[str]]
    _matcher: re.Pattern[str]

    def canonical(self, text: str) -> str | None:
        """The canonical tag that a tag or alias stands for ('female_vocals' -> 'female'), else None."""
        return self.alias_to_tag.get(phrase_key(text))

    def category(self, tag: str) -> str | None:
        canonical = self.canonical(tag)
        return self.category_of.get(canonical) if canonical else None

    def conflict(self, a: str, b: str) -> bool:
        ca, cb = self.canonical(a) or a, self.canonical(b) or b
        return frozenset((ca, cb)) in self.conflicts

    def find_in_text(self, text: str) -> list[PhraseMatch]:
        """Every alias named in free text, left to right; the longest alias wins at each place."""
        key = phrase_key(text)
        matches = []
        for m in self._matcher.finditer(key):
            tag = self.alias_to_tag[m.group(1)]
            before = key[:m.start()].split()[-2:]
            matches.append(PhraseMatch(tag=tag, category=self.category_of[tag], phrase=m.group(1),
                                       start=m.start(), negated=any(w in _NEGATIONS for w in before)))
        return matches

    def __len__(self) -> int:
        return len(self.category_of)


def load_vocabulary(path: Path = VOCABULARY_PATH) -> TagVocabulary:
    raw = json.loads(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    order = tuple(raw.get("category_order", ()))
    if order != CATEGORIES:
        problems.append(f"category_order must be {list(CATEGORIES)}, got {list(order)}")
    categories = raw.get("categories", {})
    if set(categories) != set(CATEGORIES):
        problems.append(f"categories must be exactly {sorted(CATEGORIES)}, got {sorted(categories)}")

    tags: dict[str, tuple[str, ...]] = {}
    category_of: dict[str, str] = {}
    phrases_of: dict[str, tuple[str, ...]] = {}
    alias_to_tag: dict[str, str] = {}
    for category, entries in categories.items():
        tags[category] = tuple(entries)
        for tag, aliases in entries.items():
            if not TAG_PATTERN.match(tag) or normalise_tag(tag) != tag:
                problems.append(f"{category}: tag {tag!r} is not a normalised tag (pattern {TAG_PATTERN.pattern})")
            if tag in category_of:
                problems.append(f"tag {tag!r} is in two categories: {category_of[tag]} and {category}")
            category_of[tag] = category
            phrases = [phrase_key(tag)] + [phrase_key(a) for a in aliases]
            phrases_of[tag] = tuple(dict.fromkeys(phrases))
            for phrase in phrases_of[tag]:
                owner = alias_to_tag.setdefault(phrase, tag)
                if owner != tag:
                    problems.append(f"alias {phrase!r} points at two tags: {owner!r} and {tag!r}")

    max_generated = raw.get("max_generated", {})
    if set(max_generated) != set(CATEGORIES) or any(not isinstance(v, int) or v < 0 for v in max_generated.values()):
        problems.append(f"max_generated needs a non-negative int for each of {list(CATEGORIES)}: {max_generated}")
    elif max_generated["genre"] != 1:
        problems.append("max_generated.genre must be 1 (exactly one genre)")

    descriptions = raw.get("descriptions", {})
    for tag in descriptions:
        if tag not in category_of:
            problems.append(f"descriptions: {tag!r} is not a tag of any category")

    conflicts = set()
    for pair in raw.get("conflicts", []):
        unknown = [t for t in pair if t not in category_of]
        if len(pair) != 2 or unknown:
            problems.append(f"conflict {pair!r} must name two known tags (unknown: {unknown})")
        conflicts.add(frozenset(pair))

    if problems:
        raise VocabularyError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    # Longest alias first so that 'hip hop' wins over 'hip' and 'heavy metal' over 'heavy'.
    alternation = "|".join(re.escape(p) for p in sorted(alias_to_tag, key=len, reverse=True))
    matcher = re.compile(rf"(?<![\w&])({alternation})(?![\w&])")
    return TagVocabulary(category_order=CATEGORIES, tags=tags, category_of=category_of, phrases_of=phrases_of,
                         alias_to_tag=alias_to_tag, descriptions=dict(descriptions),
                         max_generated=dict(max_generated),
                         conflicts=frozenset(conflicts), _matcher=matcher)


@functools.lru_cache(maxsize=1)
def get_vocabulary() -> TagVocabulary:
    return load_vocabulary()
