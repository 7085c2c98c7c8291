"""Bench: the CPU text stages with their offline defaults, refine_lyrics(rules) + generate_tags(embedding).

Prints the one-time model load (all-MiniLM-L6-v2 + embedding the tag vocabulary, what a worker pays in
warm_up()) and p50/p95 over N runs after warm-up for a 40-line lyric.
Run: .venv/bin/python -m bench.text_stages [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from tasks import embedding_tagger
from tasks.contracts import GenerateTagsInput, RefineLyricsInput
from tasks.lyrics_refinement import refine_lyrics
from tasks.settings import Settings
from tasks.tags_generation import generate_tags

VERSE = ["I walk along the empty road", "the night is cold and I'm alone", "the city lights are fading out",
         "I hear your voice, I hear you shout"]
CHORUS = ["Oh carry me home (carry me home)", "across the water, over the stone", "oh carry me home",
          "I never wanted to be alone"]


def forty_line_lyric() -> str:
    """Unmarked blocks with a repeated chorus, a direction, CRLF and an emoji: the rules do real work."""
    blocks = []
    for i in range(5):
        blocks.append("\r\n".join(f"{line} {i}" for line in VERSE))
        blocks.append("\r\n".join(CHORUS + (["[guitar solo] 🔥"] if i == 2 else [])))
    return "\r\n\r\n".join(blocks)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    settings = Settings()
    lyrics = forty_line_lyric()
    assert len([ln for ln in lyrics.splitlines() if ln.strip()]) >= 40

    t0 = time.perf_counter()
    embedding_tagger.warm_up()
    load_s = time.perf_counter() - t0

    def once() -> tuple[float, float]:
        t = time.perf_counter()
        refined = refine_lyrics(RefineLyricsInput(lyrics=lyrics, backend="rules", allow_fallback=False,
                                                  max_frames=3000), settings)
        t_mid = time.perf_counter()
        generate_tags(GenerateTagsInput(style="melancholic indie folk with cello, sung by a woman",
                                        user_tags=None, lyrics=refined.lyrics, extra_tags=refined.direction_tags,
                                        backend="embedding", allow_fallback=False), settings)
        return t_mid - t, time.perf_counter() - t_mid

    for _ in range(3):
        once()
    runs = [once() for _ in range(args.runs)]
    rows = [("refine_lyrics (rules)", [r[0] for r in runs]), ("generate_tags (embedding)", [r[1] for r in runs]),
            ("both", [r[0] + r[1] for r in runs])]
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, runs {args.runs} after 3 warm-up")
    print(f"one-time model load + vocabulary embedding (warm_up): {load_s:.2f} s")
    print(f"{'stage':28} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    for name, values in rows:
        ms = [v * 1000 for v in values]
        print(f"{name:28} {percentile(ms, 0.5):8.1f} {percentile(ms, 0.95):8.1f} {statistics.mean(ms):8.1f}")


if __name__ == "__main__":
    main()
