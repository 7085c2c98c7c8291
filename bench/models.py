"""Model benchmarks at the real sizes with random weights: plain and fast paths in the same run.

    python bench/models.py            # on a GPU: real sizes
    python bench/models.py --quick    # on a CPU: tiny sizes, a smoke run of the same code
Prints one table per model; copy it into bench/RESULTS.md with card, command and date.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_fast import run_codec_comparison, run_cold_start, run_lm_comparison  # noqa: E402
from bench.table import print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--only", choices=["lm", "codec", "cold"], default=None)
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    if args.only in (None, "lm"):
        checks, rows = run_lm_comparison(device=device, quick=args.quick)
        print_table("Token agreement, plain vs fast (same seeds)", checks)
        print_table("HeartMuLa token generation, plain vs fast", rows)
    if args.only in (None, "codec"):
        print_table("HeartCodec decoding, fp32 vs fast", run_codec_comparison(device=device, quick=args.quick))
    if args.only in (None, "cold"):
        print_table("Cold start (LM)", run_cold_start(device=device, quick=args.quick))


if __name__ == "__main__":
    main()
