"""The batching engine at real size (HeartMuLa-3B shapes, random bf16 weights): frame steps and determinism.

What it measures, all through `GenerationEngine` (the production path of the GPU worker: CUDA graphs,
fused kernels, the production sampler, no logits hook; random weights have a zero EOS logit, so every
song runs its full length):

* `copy`: the card's copy bandwidth in this run (read + write bytes of a 4 GiB copy / time), which
  sets the floor: bytes one frame step must read / bandwidth.
* `table`: for N songs at once (CFG on), ms per frame step at a short context (prompt of 300 tokens,
  timed between read-backs 2 and last of 150 frames: frames counted = the frames in that window) and
  averaged over whole songs (admission, prefill and every frame of `--frames` frames, divided by the
  frames generated); real-time factor per song, seconds of audio per second over all songs, bytes
  per step (weights + the live songs' KV cache) and the fraction of the floor reached.
* `determinism`: reference songs alone in the engine and inside batches of 4, 16 and 64 (random
  companions, other slots), then the same with eager execution instead of graphs: identical tokens?
  Companions' prompts are up to 400 tokens longer, so the key-length bucket of a shared step often
  differs from the reference song's own.
* `resume`: songs of `--frames` frames run whole, then each again from a random frame k of its own
  tokens (what a token checkpoint holds after a lost worker): identical tokens? and the time of the
  replay of those k frames (GenerationEngine resume, prefill excluded).

    python bench/engine_batching.py --only copy,table --songs 1,8,64 --slots 64
    SONGPIPE_BENCH_SRC=/path/to/old/checkout python bench/engine_batching.py ...   # another version's code
(the other checkout must have the gpu_worker/ subpackage layout: main after 2026-12-01's split)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

# SONGPIPE_BENCH_SRC: time another checkout's gpu_worker with this same script (old vs new, one run)
sys.path.insert(0, os.environ.get("SONGPIPE_BENCH_SRC") or str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_lm import bytes_per_frame, random_model, random_prompt  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.generation.engine import GenerationEngine  # noqa: E402
from gpu_worker.generation.generate import SamplingParams  # noqa: E402
from gpu_worker.model.heartmula import PRESETS  # noqa: E402

PROMPT = 300
SHORT_FRAMES = 150
SYNC_EVERY = 25
COMPANION_EXTRA = 400  # determinism: companions' prompts reach this far past PROMPT
CACHE_LEN: int | None = None  # --cache-len: the engines' KV length (unset: what the songs need)


def copy_bandwidth(device: torch.device, gib: int = 4) -> float:
    """Bytes per second of a device-to-device copy, read plus write counted."""
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / best


def params(frames: int, cfg: float = 1.5, temperature: float = 1.0, top_k: int = 50) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, cfg_scale=cfg, max_audio_length_ms=frames * 80)


def submit_together(engine: GenerationEngine, jobs: list[tuple]) -> list:
    """Hold the engine's lock while submitting, so every song is admitted in the same step."""
    with engine._cond:
        return [engine.submit(prompt, p, seed, progress=progress) for prompt, p, seed, progress in jobs]


def run_short(engine: GenerationEngine, prompts: list, songs: int) -> float:
    """ms per frame step with `songs` live, between the 2nd and the last read-back of 150-frame songs."""
    stamps: list[tuple[int, float]] = []
    jobs = [(prompts[i % len(prompts)], params(SHORT_FRAMES), 1000 + i,
             (lambda done, total: stamps.append((done, time.perf_counter()))) if i == 0 else None)
            for i in range(songs)]
    for future in submit_together(engine, jobs):
        future.result()
    marks = [s for s in stamps if s[0] < SHORT_FRAMES]  # read-backs during the run
    marks = marks[1:] if len(marks) > 2 else marks  # the first interval holds the graph replays' warm-up
    (f0, t0), (f1, t1) = marks[0], marks[-1]
    return (t1 - t0) / (f1 - f0) * 1e3


def run_whole(engine: GenerationEngine, prompts: list, songs: int, frames: int) -> float:
    """ms per frame step averaged over whole songs: admission to retirement / frames generated."""
    jobs = [(prompts[i % len(prompts)], params(frames), 2000 + i, None) for i in range(songs)]
    results = [f.result() for f in submit_together(engine, jobs)]
    assert all(r.frames.shape[1] == frames for r in results), "a song ended early"
    return max(r.generation_s for r in results) / frames * 1e3


def table(model, args, device, slots: int, song_counts: list[int], frames: int, bandwidth: float) -> None:
    prompts = [random_prompt(args, PROMPT, seed=i) for i in range(8)]
    engine = GenerationEngine(model, max_songs=slots, cache_len=CACHE_LEN or PROMPT + frames + 1,
                              sync_every=SYNC_EVERY)
    try:
        run_short(engine, prompts, 1)  # warm-up: buffers, first graph captures
        rows = []
        for songs in song_counts:
            for setting, ms, filled in (
                    (f"short (prompt {PROMPT})", run_short(engine, prompts, songs), PROMPT + SHORT_FRAMES // 2),
                    (f"whole song ({frames} frames)", run_whole(engine, prompts, songs, frames), PROMPT + frames // 2)):
                weights, kv = bytes_per_frame(model, 2 * songs, filled)
                floor_ms = (weights + kv) / bandwidth * 1e3
                rows.append({"setting": setting, "songs": songs, "slots": slots, "ms/step": ms,
                             "x real time/song": 80 / ms, "audio s/s total": songs * 80 / ms,
                             "GB/step": (weights + kv) / 1e9, "floor ms": floor_ms, "floor/measured": floor_ms / ms})
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print_table(f"engine frame steps, {slots} slots, CFG on, {card}", rows)
    finally:
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def determinism(model, args, device, slots: int, references: int, frames: int, graphs: bool,
                against: list | None = None) -> list:
    """Reference songs alone, then inside batches; returns the alone tokens. `against`: another mode's
    alone tokens of the same songs (graph vs eager), compared frame for frame."""
    rng = random.Random(7)
    prompts = [random_prompt(args, PROMPT - 11 * i, seed=100 + i) for i in range(references)]
    settings = [params(frames, cfg=rng.choice([1.0, 1.5, 2.0]), temperature=rng.choice([0.8, 1.0, 1.2]),
                       top_k=rng.choice([20, 50, 200])) for _ in range(references)]
    engine = GenerationEngine(model, max_songs=slots, cache_len=CACHE_LEN or PROMPT + COMPANION_EXTRA + frames + 1,
                              use_graphs=graphs and device.type == "cuda")
    try:
        alone = [engine.submit(prompts[i], settings[i], 500 + i).result().frames for i in range(references)]
        rows = []
        for batch in (4, 16, 64):
            if batch > slots:
                continue
            same = 0
            per_batch = max(1, batch // 4)  # a quarter of each batch are reference songs, the rest companions
            for first in range(0, references, per_batch):
                chosen = list(range(first, min(first + per_batch, references)))
                jobs = [(prompts[i], settings[i], 500 + i, None) for i in chosen]
                jobs += [(random_prompt(args, rng.randint(PROMPT // 2, PROMPT + COMPANION_EXTRA),
                                        seed=rng.randint(0, 10**6)),
                          params(rng.randint(frames // 2, frames), cfg=rng.choice([1.0, 1.5, 3.0]),
                                 temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([10, 50, 500])),
                          rng.randint(0, 2**62), None) for _ in range(batch - len(chosen))]
                order = list(range(len(jobs)))
                rng.shuffle(order)  # the reference songs land in varying slots
                futures = submit_together(engine, [jobs[k] for k in order])
                results = {k: f.result().frames for k, f in zip(order, futures)}
                same += sum(torch.equal(results[j], alone[i]) for j, i in enumerate(chosen))
            rows.append({"compared with the song alone": f"inside batches of {batch}", "songs": references,
                         "identical tokens": same, "fraction": same / references})
        if against is not None:
            same = sum(torch.equal(a, b[:, :a.shape[1]]) for a, b in zip(alone, against))
            rows.append({"compared with the song alone": "alone with CUDA graphs", "songs": len(alone),
                         "identical tokens": same, "fraction": same / len(alone)})
        mode = "CUDA graphs" if graphs else "eager"
        print_table(f"determinism, {references} songs of {frames} frames, {slots} slots, {mode}", rows)
        return alone
    finally:
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def resume(model, args, device, slots: int, songs: int, frames: int) -> None:
    """Whole songs, then each resumed from a random frame of its own tokens: identical? replay seconds?"""
    rng = random.Random(11)
    prompts = [random_prompt(args, PROMPT - 7 * i, seed=300 + i) for i in range(songs)]
    settings = [params(frames, cfg=rng.choice([1.0, 1.5, 2.0]), temperature=rng.choice([0.8, 1.0, 1.2]),
                       top_k=rng.choice([20, 50, 200])) for _ in range(songs)]
    engine = GenerationEngine(model, max_songs=slots, cache_len=CACHE_LEN or PROMPT + frames + 1)
    try:
        started = time.perf_counter()
        runs = [f.result() for f in submit_together(
            engine, [(prompts[i], settings[i], 700 + i, None) for i in range(songs)])]
        whole_s = time.perf_counter() - started
        whole = [r.frames for r in runs]
        cut = [rng.randint(1, frames - 1) for _ in range(songs)]
        with engine._cond:
            futures = [engine.submit(prompts[i], settings[i], 700 + i, resume=whole[i][:, :cut[i]].clone())
                       for i in range(songs)]
        results = [f.result() for f in futures]
        rows = [{"song": i, "killed at frame": cut[i], "identical tokens": torch.equal(r.frames, whole[i]),
                 "replay s": r.resume_s, "replay ms/frame": r.resume_s / max(cut[i] - 1, 1) * 1e3,
                 "generating them took s": runs[i].generation_s * cut[i] / frames} for i, r in enumerate(results)]
        same = sum(r["identical tokens"] for r in rows)
        print_table(f"resume, {songs} songs of {frames} frames, {slots} slots ({same}/{songs} identical; "
                    f"the whole batch took {whole_s:.1f} s)", rows)
    finally:
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="copy,table,determinism")
    parser.add_argument("--songs", default="1,2,4,8,16,32,64")
    parser.add_argument("--slots", default="64", help="engine slot counts, comma-separated")
    parser.add_argument("--frames", type=int, default=3000, help="frames of a whole song (3000: 240 s)")
    parser.add_argument("--references", type=int, default=20)
    parser.add_argument("--det-frames", type=int, default=200)
    parser.add_argument("--eager", action="store_true", help="also check determinism without CUDA graphs")
    parser.add_argument("--tiny", action="store_true", help="a dry run of the script: tiny model, CPU, fp32")
    parser.add_argument("--resume-songs", type=int, default=10)
    parser.add_argument("--cache-len", type=int, default=None,
                        help="the engines' KV length (the production engine: the model's max_seq_len)")
    parser.add_argument("--attention-programs", type=int, default=None,
                        help="fused_ops.ATTENTION_TARGET_PROGRAMS for the engines built here (tuning)")
    opts = parser.parse_args()
    global PROMPT, SHORT_FRAMES, COMPANION_EXTRA, CACHE_LEN
    CACHE_LEN = opts.cache_len
    if opts.attention_programs is not None:
        from gpu_worker.kernels import fused_ops
        fused_ops.ATTENTION_TARGET_PROGRAMS = opts.attention_programs
        print(f"attention: {opts.attention_programs} target programs at a full cache")
    only = set(opts.only.split(","))
    started = time.perf_counter()
    if opts.tiny:
        from gpu_worker.checkpoints.heartmula_checkpoint import TINY_CONFIG, heartmula_args_from_config

        device, args, dtype, bandwidth = torch.device("cpu"), heartmula_args_from_config(TINY_CONFIG, Path("tiny")), \
            torch.float32, 1e11
        PROMPT, SHORT_FRAMES, COMPANION_EXTRA = 40, 90, 30
    else:
        device, args, dtype = torch.device("cuda", 0), PRESETS["3B"], torch.bfloat16
        torch.cuda.set_device(device)
        bandwidth = copy_bandwidth(device)
    if "copy" in only:
        print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write of a 4 GiB copy, best of 5)")
    model = random_model(args, device, dtype)
    print(f"model ready after {time.perf_counter() - started:.1f} s; code from {sys.path[0]}", flush=True)
    for slots in (int(s) for s in opts.slots.split(",")):
        if "table" in only:
            counts = [n for n in (int(s) for s in opts.songs.split(",")) if n <= slots]
            table(model, args, device, slots, counts, opts.frames, bandwidth)
        if "determinism" in only:
            graphed = determinism(model, args, device, slots, opts.references, opts.det_frames, graphs=True)
            if opts.eager:
                few = min(opts.references, 4)
                determinism(model, args, device, slots, few, opts.det_frames, graphs=False, against=graphed[:few])
        if "resume" in only:
            resume(model, args, device, slots, opts.resume_songs, opts.frames)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
