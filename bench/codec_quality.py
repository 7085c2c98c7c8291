"""The quality check that must pass before the bf16 codec becomes the default (model-spec section 8).

Decodes songs with the fp32 codec and with the fast codec on the same checkpoint, seed and tokens, and
prints the waveform SNR against fp32 and the seconds of each. Run it on the published weights:

    python bench/codec_quality.py --checkpoint /models/heartmula   # the folder holding HeartCodec-oss/
    python bench/codec_quality.py --checkpoint ckpt --tokens job1.npy --tokens job2.npy

`--tokens` takes token artifacts ([8, T] int .npy, as the token stage stores them; the admin dashboard
links each job's); without it, random codes of `--seconds` seconds are used (random codes are not
music: prefer real songs' tokens). If every song reaches `--min-snr` dB (30 by default, the target of
issue 7), setting SONGPIPE_CODEC_DTYPE=bfloat16 on the GPU workers is backed by this measurement.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.table import print_table  # noqa: E402
from gpu_worker.checkpoints.heartcodec_checkpoint import load_heartcodec  # noqa: E402
from gpu_worker.codec.fast_codec import FastCodec, snr_db  # noqa: E402


def _timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, action="append", default=[])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the random songs")
    parser.add_argument("--songs", type=int, default=3, help="random songs when no --tokens are given")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "bf16-mixed", "tf32"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-snr", type=float, default=30.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    codec = load_heartcodec(args.checkpoint, device=device, dtype=torch.float32).model
    fast = FastCodec(codec, precision=args.precision, compile=False if args.no_compile else None)
    if args.tokens:
        songs = {path.name: torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
                 for path in args.tokens}
    else:
        frames = max(1, round(args.seconds * 12.5))
        songs = {f"random {i}": torch.randint(0, codec.config.codebook_size, (codec.config.num_quantizers, frames),
                                              generator=torch.Generator().manual_seed(i)) for i in range(args.songs)}
    fast.decode(next(iter(songs.values()))[:, :372], generator=torch.Generator(device=device).manual_seed(0))
    rows, worst = [], float("inf")
    for name, codes in songs.items():
        fp32_s, reference = _timed(device, lambda codes=codes: codec.decode(
            codes, generator=torch.Generator(device=device).manual_seed(args.seed)))
        fast_s, audio = _timed(device, lambda codes=codes: fast.decode(
            codes, generator=torch.Generator(device=device).manual_seed(args.seed)))
        snr = snr_db(reference, audio)
        worst = min(worst, snr)
        rows.append({"song": name, "seconds of audio": codes.shape[1] * 0.08, "fp32 s": fp32_s,
                     f"{args.precision} s": fast_s, "SNR dB": snr})
    print_table(f"codec {args.precision} vs fp32, {args.checkpoint} ({fast.describe()})", rows)
    verdict = "passes" if worst >= args.min_snr else "FAILS"
    print(f"worst SNR {worst:.1f} dB: {verdict} the {args.min_snr:.0f} dB check")
    return 0 if worst >= args.min_snr else 1


if __name__ == "__main__":
    sys.exit(main())
