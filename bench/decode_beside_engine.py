"""One codec window decoded beside a running batching engine, with the codec's and the engine's CUDA stream
priorities varied: what a window costs the engine's frames, and the engine the window.

The streaming decode runs a window while the engine keeps stepping its songs on the same GPU
(docs/streaming.md). Beside 16 songs the codec is busy nearly all the time and the engine's frames slow
down (bench/RESULTS.md, "First sound after the fixes"). A song's first window is urgent; later windows are
not (their listeners have a window of audio in hand). This times one window of the bf16 compiled codec (the
production path: `WindowByWindow` through `batching.codec_turn`) with 1 and 16 songs in the engine and, for
the same time span, the engine's frame steps per second, in three arrangements:
* production: the engine on the default stream, the codec on its own stream of the same (lowest) priority;
* codec high: the codec's stream at the highest priority (what a first window could get);
* engine high: the engine's thread on a stream of the highest priority (what later windows could yield to);
* codec high, engine mid: a first window above the engine, the engine above the lowest priority.
The first row of each arrangement is the engine alone (no window): its frame steps per second.

    python bench/decode_beside_engine.py --checkpoint ROOT   # a real-size checkpoint (bench/e2e_celery.py)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_lm import random_prompt  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.generation import engine as engine_module  # noqa: E402
from gpu_worker.generation.generate import SamplingParams  # noqa: E402
from gpu_worker.model.heartcodec import WindowByWindow  # noqa: E402
from gpu_worker.worker import batching, model_cache  # noqa: E402
from tests.stack_fixtures import wait_until  # noqa: E402

# name -> (the codec stream's priority, the engine's stream priority or None for the default stream)
ARRANGEMENTS: dict[str, tuple[str, str | None]] = {
    "production": ("low", None),
    "codec high": ("high", None),
    "engine high": ("low", "high"),
    "codec high, engine mid": ("high", "mid"),
}


def decode_window(codec, fast) -> float:
    geometry = codec.config.windows
    codes = torch.randint(0, codec.config.codebook_size, (8, geometry.window_frames), device="cuda")
    torch.cuda.current_stream().synchronize()  # never a device-wide sync: the engine may be capturing a graph
    start = time.perf_counter()
    with torch.inference_mode(), batching.codec_turn():
        song = WindowByWindow(geometry, torch.Generator(device="cuda").manual_seed(1), geometry.window_frames,
                              device=codec.device, solve_window=fast.solve_window, decode_latents=fast.decode_latents)
        song.add(codes, last=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def arranged(name: str):
    """Set the codec's stream and the engine thread's stream for one arrangement (priority_range is static)."""
    greatest = torch.cuda.Stream.priority_range()[1]  # type: ignore[call-arg]
    codec_level, engine_level = ARRANGEMENTS[name]
    device = torch.cuda.current_device()
    batching._codec_streams[device] = torch.cuda.Stream(device, priority=_level(codec_level, greatest))
    original_run = engine_module.GenerationEngine._run
    if engine_level is not None:
        stream = torch.cuda.Stream(device, priority=_level(engine_level, greatest))

        def run_on_stream(self):
            with torch.cuda.stream(stream):
                original_run(self)

        engine_module.GenerationEngine._run = run_on_stream  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine_module.GenerationEngine._run = original_run  # type: ignore[method-assign]
        batching.shutdown_engines()


def _level(level: str, greatest: int) -> int:
    return {"low": 0, "mid": greatest // 2, "high": greatest}[level]


def steps_per_s(engine, seconds: float) -> float:
    before, start = engine.stats["frames_stepped"], time.perf_counter()
    time.sleep(seconds)
    return (engine.stats["frames_stepped"] - before) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--slots", type=int, default=32)
    args = parser.parse_args()
    batching.install_threads_mode_hooks()
    dev = torch.device("cuda")
    lm = model_cache.get_lm(args.checkpoint, dev, torch.bfloat16)
    codec = model_cache.get_codec(args.checkpoint, dev, torch.float32).model
    fast = model_cache.get_fast_codec(codec)
    first = decode_window(codec, fast)
    print(f"first window (compile): {first:.2f} s; {fast.describe()}", flush=True)
    prompt = random_prompt(lm.model.args, 300, seed=0)
    params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=240_000)
    rows = [{"arrangement": "no engine", "songs in the engine": 0,
             "window s (mean / min / max)": _spread([decode_window(codec, fast) for _ in range(args.windows)])}]
    for name in ARRANGEMENTS:
        with arranged(name):
            engine = batching.get_engine(lm.model, max_songs=args.slots)
            for songs in (1, 16):
                futures = [engine.submit(prompt, params, seed) for seed in range(songs)]
                stepped = engine.stats["frames_stepped"]  # then admitted, prefilled, kernels compiled, graphs captured:
                wait_until(lambda e=engine, s0=stepped: e.stats["frames_stepped"] - s0 >= 400, 180, "400 engine steps", 0.1)
                alone = steps_per_s(engine, 1.0)
                times, during = [], []
                for _ in range(args.windows):
                    before, start = engine.stats["frames_stepped"], time.perf_counter()
                    times.append(decode_window(codec, fast))
                    during.append((engine.stats["frames_stepped"] - before) / (time.perf_counter() - start))
                rows.append({"arrangement": name, "songs in the engine": songs,
                             "window s (mean / min / max)": _spread(times),
                             "engine steps/s alone": round(alone, 1),
                             "engine steps/s during the windows": round(sum(during) / len(during), 1)})
                print(rows[-1], flush=True)
                for future in futures:
                    engine.cancel(future)
                time.sleep(1.0)
            del engine, futures  # the engine's slot buffers go with it: the next arrangement makes its own
        gc.collect()
        torch.cuda.empty_cache()
    print_table(f"one bf16 codec window beside the batching engine ({args.slots} slots, 240 s songs, CFG 1.5)", rows)


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} / {min(values):.3f} / {max(values):.3f}"


if __name__ == "__main__":
    main()
