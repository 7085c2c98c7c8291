"""The bf16 codec compiled whole or block by block: compile time on a new machine and on a restart, window
speed and audio against fp32.

`FastCodec(compile_scope=...)`: "model" hands the whole estimator to torch.compile (the production default),
"blocks" each transformer block (regional compilation: one compile per stack's block shape, reused by the
stack's other blocks). Each row is a fresh process with the published codec sizes and random weights (seed
0): "new machine" with empty inductor and Triton caches, "restart" with the caches the row before it left.
Columns: the first one-window decode (compile, autotune, capture, the window), the estimator's first compiled
call, the median of 5 more windows, a 240 s song, and the SNR of a window against the fp32 eager decode.

    python bench/codec_compile_scope.py            # on the GPU machine
    python bench/codec_compile_scope.py --quick    # tiny sizes on the CPU (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.table import print_table  # noqa: E402

SCOPES = ("model", "blocks")


def child(scope: str, quick: bool) -> dict:
    import torch

    from bench.bench_fast import _random_codec_and_song, _timed
    from gpu_worker.codec.fast_codec import FastCodec, snr_db

    dev = torch.device("cpu" if quick else "cuda")
    codec, codes = _random_codec_and_song(dev, quick)  # seeded: the same weights and song in every process
    window = codes[:, :372]
    gen = lambda: torch.Generator(device=dev).manual_seed(0)  # noqa: E731
    with torch.inference_mode():
        reference = codec.decode(window, generator=gen())
        fast = FastCodec(codec, precision="bf16", compile=True, compile_scope=scope)
        first_s, audio = _timed(dev, lambda: fast.decode(window, generator=gen()))
        windows = [_timed(dev, lambda: fast.decode(window, generator=gen()))[0] for _ in range(5)]
        song_s, _ = _timed(dev, lambda: fast.decode(codes, generator=gen()))
    return {"first window s": round(first_s, 2), "estimator compile s": fast.compile_seconds and round(fast.compile_seconds, 2),
            "window s (median of 5)": round(statistics.median(windows), 4),
            f"{codes.shape[1] * 0.08:.0f} s song s": round(song_s, 3),
            "window SNR dB vs fp32": round(snr_db(reference, audio), 2), "compiled": fast.compiled,
            "sq compiled": fast.sq_compiled, "error": fast.compile_error or fast.sq_compile_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=SCOPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quick)))
        return
    rows = []
    for scope in SCOPES:
        caches = Path(tempfile.mkdtemp(prefix=f"codec-compile-{scope}-"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
        for run in ("new machine", "restart"):
            command = [sys.executable, __file__, "--child", scope] + (["--quick"] if args.quick else [])
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"scope": scope, "run": run, "error": f"exit {done.returncode}"})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"scope": scope, "run": run, "process s": round(time.perf_counter() - started, 1), **result})
            print(rows[-1], flush=True)
    print_table("bf16 codec compiled whole ('model') or block by block ('blocks'), published sizes, random weights", rows)


if __name__ == "__main__":
    main()
