"""One codec window decoded beside a running batching engine: what the other songs cost the stream.

The streaming decode runs a window while the engine keeps stepping its songs on the same GPU
(docs/streaming.md). This times one window of the bf16 compiled codec (the production path:
`WindowByWindow` through `batching.codec_turn`, the codec's own CUDA stream) with 0, 1 and 16 songs in
the engine, and the same on the default stream, and the engine's frame step meanwhile.

    python bench/decode_beside_engine.py --checkpoint ROOT   # a real-size checkpoint (bench/e2e_celery.py)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_lm import random_prompt  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.generation.generate import SamplingParams  # noqa: E402
from gpu_worker.model.heartcodec import WindowByWindow  # noqa: E402
from gpu_worker.worker import batching, model_cache  # noqa: E402


def decode_window(codec, fast, turn) -> float:
    geometry = codec.config.windows
    codes = torch.randint(0, codec.config.codebook_size, (8, geometry.window_frames), device="cuda")
    torch.cuda.current_stream().synchronize()  # never a device-wide sync: the engine may be capturing a graph
    start = time.perf_counter()
    with torch.inference_mode(), turn():
        song = WindowByWindow(geometry, torch.Generator(device="cuda").manual_seed(1), geometry.window_frames,
                              device=codec.device, solve_window=fast.solve_window, decode_latents=fast.decode_latents)
        song.add(codes, last=True)
        torch.cuda.current_stream().synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    batching.install_threads_mode_hooks()
    dev = torch.device("cuda")
    lm = model_cache.get_lm(args.checkpoint, dev, torch.bfloat16)
    codec = model_cache.get_codec(args.checkpoint, dev, torch.float32).model
    fast = model_cache.get_fast_codec(codec)
    first = decode_window(codec, fast, batching.codec_turn)
    print(f"first window (compile): {first:.2f} s; {fast.describe()}", flush=True)
    engine = batching.get_engine(lm.model, max_songs=32)
    prompt = random_prompt(lm.model.args, 300, seed=0)
    params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=240_000)
    rows = []
    for songs in (0, 1, 16):
        futures = [engine.submit(prompt, params, seed) for seed in range(songs)]
        if songs:
            time.sleep(4.0)  # admitted, prefilled, stepping
        for name, turn in (("codec stream (codec_turn)", batching.codec_turn), ("default stream", contextlib.nullcontext)):
            t0 = time.perf_counter()
            times = [decode_window(codec, fast, turn) for _ in range(args.windows)]
            rows.append({"songs in the engine": songs, "codec on": name, "window s (mean)": sum(times) / len(times),
                         "window s (min)": min(times), "window s (max)": max(times),
                         "wall s": time.perf_counter() - t0})
            print(rows[-1], flush=True)
        for future in futures:
            engine.cancel(future)
        time.sleep(1.0)
    print_table("one bf16 codec window beside the batching engine (H200, 240 s songs, CFG 1.5)", rows)


if __name__ == "__main__":
    main()
