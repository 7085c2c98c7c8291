"""Summarise py-spy raw folded stacks (`py-spy record --threads --format raw`): samples per thread and, per
thread, the frames where its samples end (the innermost `depth` frames), most first.

    python bench/spy_summary.py FILE [--depth 3] [--top 8]
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME_FILE = re.compile(r" \((?:.*/)?([^/]+:\d+)\)$")


def parse(path: Path) -> dict[str, collections.Counter]:
    """thread name -> Counter of innermost-frames tuples."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ?", "", frames[0]) or frames[0]
        threads[thread][tuple(_FRAME_FILE.sub(r" \1", f) for f in frames[1:])] += int(count)
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    threads = parse(args.file)
    total = sum(sum(c.values()) for c in threads.values())
    print(f"{args.file.name}: {total} samples")
    for thread, stacks in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        samples = sum(stacks.values())
        print(f"\n## {thread}: {samples} samples ({100 * samples / max(total, 1):.1f} %)")
        leaves: collections.Counter = collections.Counter()
        for frames, count in stacks.items():
            leaves[" < ".join(reversed(frames[-args.depth:]))] += count
        for leaf, count in leaves.most_common(args.top):
            print(f"  {count:6d}  {leaf}")


if __name__ == "__main__":
    main()
