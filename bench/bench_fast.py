"""Plain vs fast path, same run, same card: HeartMuLa-oss-3B tokens and HeartCodec audio, random weights.

    python bench/bench_fast.py                 # GPU: 3B bf16 LM, published-size fp32 codec, cold start
    python bench/bench_fast.py --quick         # CPU: tiny sizes, a smoke run of the same code
    python bench/bench_fast.py --only lm       # or codec, cold; repeatable
    python bench/bench_fast.py --only checks --only variants --only codec-variants   # fast-path validation

LM rows: ms/frame (median-free: wall time between two device read-backs of the fast loop, or the
median of per-frame stamps of the plain loop) and achieved GB/s (bytes one frame must read: weights
once per frame, the decoder once per codebook, plus the filled KV cache of every row) for B songs with
CFG (2 rows each) and B=1 without CFG; the plain path runs songs one after another, so its B-song
frame costs B single-song frames. A correctness block compares the tokens of the two paths for the
same seed (bf16, so a rounding flip may make them diverge after some frames) and a song alone vs inside
a batch. Codec rows: seconds for a 240 s song (3000 frames, 10 windows), fp32 baseline vs the fast
precisions, eager and compiled (torch.compile of the estimator, inductor; `--compile-backend`), with the
waveform SNR against the baseline, the SNR of a single estimator call, the first call's seconds (compile,
graph capture and one window) and the per-window split between the estimator solve and the SQ decoder.
Cold start: load the 3B weights from fp32 safetensors (warm page cache) into bf16 on the GPU, then
the first frame (and the second, which includes capturing the CUDA graph).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_lm import (  # noqa: E402
    AUDIO_EOS_ID,
    H100_COPY_BANDWIDTH,
    REAL_GEN_CONFIG,
    bytes_per_frame,
    random_model,
    random_prompt,
    write_published_layout,
)
from bench.table import print_table  # noqa: E402
from gpu_worker.checkpoints.heartmula_checkpoint import (  # noqa: E402
    TINY_CONFIG,
    TINY_GEN_CONFIG,
    heartmula_args_from_config,
    load_heartmula,
)
from gpu_worker.codec.fast_codec import FastCodec, snr_db  # noqa: E402
from gpu_worker.generation.fast_generate import generate_fast, release_engines  # noqa: E402
from gpu_worker.generation.generate import SamplingParams, generate  # noqa: E402
from gpu_worker.model.heartcodec import HeartCodecConfig, build_random_heartcodec, plan_windows  # noqa: E402
from gpu_worker.model.heartmula import PRESETS  # noqa: E402

REAL_CONFIG = {"model_type": "heartmula", "backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M",
               "text_vocab_size": 128256, "audio_vocab_size": 8197, "audio_num_codebooks": 8, "muq_dim": 512}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _params(cfg: float, frames: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=50, cfg_scale=cfg, max_audio_length_ms=frames * 80)


def _plain_no_eos(device):
    eos = torch.tensor([AUDIO_EOS_ID], device=device)
    return lambda frame, codebook, logits: logits.index_fill(-1, eos, float("-inf"))


def _fast_no_eos(device):
    eos = torch.tensor([AUDIO_EOS_ID], device=device)
    return lambda frame_index, codebook, logits: logits.index_fill(-1, eos, float("-inf"))


def _setup(device: torch.device, quick: bool):
    if quick:
        return heartmula_args_from_config(TINY_CONFIG, Path("tiny config.json")), torch.float32
    return PRESETS["3B"], torch.bfloat16


def _row(setting: str, path: str, songs: int, rows: int, ms: float, model, filled: int) -> dict[str, Any]:
    weights, kv = bytes_per_frame(model, rows, filled)
    return {"setting": setting, "path": path, "songs": songs, "ms/frame": ms,
            "ms/frame/song": ms / songs, "frames/s (all songs)": songs * 1e3 / ms,
            "GB/frame": (weights + kv) / 1e9, "GB/s": (weights + kv) / (ms * 1e-3) / 1e9,
            "H100 floor ms": (weights + kv) / H100_COPY_BANDWIDTH * 1e3}


def time_plain(model, prompt, cfg: float, frames: int, warmup: int, device) -> float:
    hook = _plain_no_eos(device)
    generate(model, prompt, _params(cfg, warmup), seed=0, logits_hook=hook)
    stamps: list[float] = []
    generate(model, prompt, _params(cfg, frames), seed=0, logits_hook=hook, progress_every=1,
             progress=lambda done, total: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[:-2], stamps[1:-1])) * 1e3


def time_fast(model, prompts, cfg: float, frames: int, device, sync_every: int, **options) -> float:
    """ms per frame step (all songs) between the first and last read-back of a warmed-up run."""
    hook = _fast_no_eos(device)
    params = _params(cfg, frames)
    for _attempt in range(2):  # first run: engine, warm-up, graph capture
        stamps: list[float] = []
        progress = [lambda done, total, stamps=stamps: stamps.append(time.perf_counter())] + [None] * (len(prompts) - 1)
        generate_fast(model, prompts, params, logits_hook=hook, sync_every=sync_every, progress=progress, **options,
                      seeds=list(range(len(prompts))))
    # stamps: after steps sync_every, 2*sync_every, ... (each after a device read-back), then the final one
    marks = stamps[:-1]
    return (marks[-1] - marks[0]) / ((len(marks) - 1) * sync_every) * 1e3


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(first frame where the two grids differ, or the common length; fraction of equal frames)."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).all(dim=0)
    first = int((~same).nonzero()[0]) if (~same).any() else n
    return first, float(same.float().mean())


def run_lm_comparison(device: str = "cuda", quick: bool = False, batches=(1, 2, 4, 8), frames: int = 100,
                      prompt_length: int = 300, check_frames: int = 200, plain: bool = True) -> tuple[list, list]:
    dev = torch.device(device)
    args, dtype = _setup(dev, quick)
    if quick:
        frames, prompt_length, check_frames = min(frames, 40), min(prompt_length, 30), min(check_frames, 60)
    sync_every = 10 if quick else 20
    model = random_model(args, dev, dtype)
    prompts = [random_prompt(args, max(prompt_length - 7 * i, 12), seed=i) for i in range(max(4, *batches))]
    filled = prompt_length + frames // 2

    checks: list[dict[str, Any]] = []
    hook_p, hook_f = _plain_no_eos(dev), _fast_no_eos(dev)
    for cfg in (1.5, 1.0):
        ref = generate(model, prompts[0], _params(cfg, check_frames), logits_hook=hook_p,
                       seed=123).frames
        fast = generate_fast(model, prompts[0], _params(cfg, check_frames), logits_hook=hook_f,
                             seeds=[123])[0].frames
        first, rate = _agreement(ref, fast)
        checks.append({"check": f"plain vs fast, same seed, cfg {cfg}", "frames": check_frames,
                       "first differing frame": first, "equal frames": rate})
    solo = generate_fast(model, prompts[1], _params(1.5, check_frames), logits_hook=hook_f,
                         seeds=[7])[0].frames
    quad = generate_fast(model, prompts[:4], _params(1.5, check_frames), logits_hook=hook_f,
                         seeds=[1, 7, 2, 3])[1].frames
    first, rate = _agreement(solo, quad)
    checks.append({"check": "fast: song alone vs inside 4 songs", "frames": check_frames,
                   "first differing frame": first, "equal frames": rate})
    release_engines()

    rows: list[dict[str, Any]] = []
    if plain:
        ms = time_plain(model, prompts[0], 1.5, frames, 10, dev)
        for songs in batches:
            rows.append(_row("CFG", "plain (songs in turn)", songs, 2 * songs, ms * songs, model, filled))
        rows.append(_row("no CFG", "plain", 1, 1, time_plain(model, prompts[0], 1.0, frames, 10, dev), model,
                         filled))
    for songs in batches:
        ms = time_fast(model, prompts[:songs], 1.5, frames, dev, sync_every)
        rows.append(_row("CFG", "fast", songs, 2 * songs, ms, model, filled))
        release_engines()
        _free(dev)
    rows.append(_row("no CFG", "fast", 1, 1, time_fast(model, prompts[:1], 1.0, frames, dev, sync_every), model,
                     filled))
    release_engines()
    del model
    _free(dev)
    return checks, rows


def _random_codec_and_song(dev: torch.device, quick: bool) -> tuple:
    """A random fp32 codec (tiny or published sizes) and a seeded random song (700 or 3000 frames)."""
    config = HeartCodecConfig.tiny() if quick else HeartCodecConfig.published()
    codec = build_random_heartcodec(config, device=dev, dtype=torch.float32, seed=0)
    frames = 700 if quick else 3000
    codes = torch.randint(0, config.codebook_size, (config.num_quantizers, frames),
                          generator=torch.Generator().manual_seed(frames))
    return codec, codes


# compiled rows: (estimator precision, SQ decoder dtype)
COMPILED_CODEC_VARIANTS = (("bf16", None), ("bf16", torch.bfloat16), ("tf32", None))


def _timed(dev: torch.device, fn) -> tuple[float, Any]:
    _sync(dev)
    start = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - start, out


def _codec_label(precision: str, compiled: bool, sq_dtype: torch.dtype | None, sq_batch: int | None = None) -> str:
    label = f"fast {precision}{' compiled' if compiled else ''}"
    if sq_dtype is not None:
        label += f" + SQ {str(sq_dtype).removeprefix('torch.')}"
    if sq_batch is not None:
        label += f", SQ {sq_batch} window{'s' if sq_batch > 1 else ''}/pass"
    return label


def _fast_codec_row(codec, codes: torch.Tensor, reference: torch.Tensor, label: str, dev: torch.device,
                    probe: tuple | None = None, **options) -> dict[str, Any]:
    """One FastCodec variant: first call (compile + capture + one window), the song, SNR, per-window split."""
    row = _measure_fast_codec(codec, codes, reference, label, dev, probe, **options)
    _free(dev)  # the FastCodec, its graphs and the song's audio went with _measure_fast_codec's frame
    return row


def _measure_fast_codec(codec, codes: torch.Tensor, reference: torch.Tensor, label: str, dev: torch.device,
                        probe: tuple | None, **options) -> dict[str, Any]:
    gen = lambda: torch.Generator(device=dev).manual_seed(0)  # noqa: E731
    window = codes[:, :372]
    fast = FastCodec(codec, **options)
    first_s, _ = _timed(dev, lambda: fast.decode(window, generator=gen()))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds, audio = _timed(dev, lambda: fast.decode(codes, generator=gen()))
    row = {"codec": label, "case": f"{codes.shape[1] * 0.08:.0f} s song", "seconds": seconds,
           "first call s": first_s, "SNR dB": snr_db(reference, audio)}
    if dev.type == "cuda":  # weights, graphs' pools and the song's activations (the SQ batch dominates)
        row["peak GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    with torch.inference_mode():
        if probe is not None:
            x, t, v_ref = probe
            row["estimator call SNR dB"] = snr_db(v_ref, fast._estimate(x, t).clone())
        mu = codec.flow_matching.conditioning(window.to(dev))
        solve_s, latents = _timed(dev, lambda: fast.solve(mu, None, gen()))
        n = min(fast.sq_batch_windows, plan_windows(codes.shape[1]).num_windows)
        sq_s, _ = _timed(dev, lambda: fast.decode_latents(latents.expand(n, -1, -1)))
    row.update({"solve s/window": solve_s, "SQ s/window": sq_s / n, "SQ windows/pass": n,
                "compiled": fast.compiled, "compile s": fast.compile_seconds})
    if fast.compile_error:
        row["compile error"] = fast.compile_error[:80]
    return row


def run_codec_comparison(device: str = "cuda", quick: bool = False, precisions=("tf32", "bf16-mixed", "bf16"),
                         compiled=COMPILED_CODEC_VARIANTS, compile_backend: str = "inductor") -> list[dict[str, Any]]:
    """fp32 plain decode vs the eager fast precisions vs the compiled variants, on one 240 s song.

    "first call s": a fresh FastCodec's first one-window decode (compile, autotuning, graph capture, the
    window). A compiled row whose estimator dtype an earlier row of this process compiled reuses dynamo's
    compile ("compile s" then is just that first estimator call): what a warm worker's next FastCodec pays.
    """
    dev = torch.device(device)
    codec, codes = _random_codec_and_song(dev, quick)
    gen = lambda: torch.Generator(device=dev).manual_seed(0)  # noqa: E731
    codec.decode(codes[:, :372], generator=gen())  # warm-up
    seconds, reference = _timed(dev, lambda: codec.decode(codes, generator=gen()))
    song = f"{codes.shape[1] * 0.08:.0f} s song"
    rows = [{"codec": "fp32 (default precision)", "case": song, "seconds": seconds, "SNR dB": float("inf"),
             "estimator call SNR dB": float("inf")}]
    # one estimator call on a realistic input, for a precision figure that does not depend on the solver
    estimator = codec.flow_matching.estimator
    x = torch.randn(2, 744, codec.config.in_channels, generator=gen(), device=dev)
    t = torch.tensor([0.3, 0.3], device=dev)
    with torch.inference_mode():
        probe = (x, t, estimator(x, t))
    for precision in precisions:
        rows.append(_fast_codec_row(codec, codes, reference, _codec_label(precision, False, None), dev, probe,
                                    precision=precision, compile=False))
    for precision, sq_dtype in compiled:
        rows.append(_fast_codec_row(codec, codes, reference, _codec_label(precision, True, sq_dtype), dev, probe,
                                    precision=precision, sq_dtype=sq_dtype, compile=True,
                                    compile_backend=compile_backend))
    return rows


def run_cold_start(device: str = "cuda", quick: bool = False, work_dir: str | None = None) -> list[dict[str, Any]]:
    """Load the LM from fp32 safetensors (just written: warm page cache) + the fast path's first frames."""
    dev = torch.device(device)
    args, dtype = _setup(dev, quick)
    config, gen_config = (TINY_CONFIG, TINY_GEN_CONFIG) if quick else (REAL_CONFIG, REAL_GEN_CONFIG)
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        model = random_model(args, dev, dtype)
        start = time.perf_counter()
        write_published_layout(model, Path(tmp), config, gen_config)
        rows.append({"step": "write fp32 safetensors (4 shards)", "seconds": time.perf_counter() - start})
        del model
        _free(dev)
        _sync(dev)
        start = time.perf_counter()
        model = load_heartmula(tmp, device=dev, dtype=dtype).model
        _sync(dev)
        loaded = time.perf_counter() - start
        rows.append({"step": "load_heartmula -> bf16 on the device", "seconds": loaded})
        prompt = random_prompt(args, 300 if not quick else 30, seed=0)
        for frames, what in ((1, "+ first frame (engine, warm-up, prefill, frame 0)"),
                             (2, "+ second frame (graph capture, replay)")):
            release_engines()
            _free(dev)
            start = time.perf_counter()
            generate_fast(model, prompt, _params(1.5, frames), logits_hook=_fast_no_eos(dev),
                          seeds=[0])
            _sync(dev)
            rows.append({"step": what, "seconds": time.perf_counter() - start,
                         "cold start total s": loaded + time.perf_counter() - start})
    release_engines()
    del model
    _free(dev)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", choices=["lm", "codec", "cold", "checks", "variants", "codec-variants"],
                        action="append")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-path timings")
    parser.add_argument("--precisions", default="tf32,bf16-mixed,bf16")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled codec rows (default inductor; aot_eager "
                             "with --quick: inductor's CPU compile takes ~30 s a variant)")
    cli = parser.parse_args()
    device = cli.device or ("cpu" if cli.quick else "cuda")
    parts = cli.only or ["lm", "codec", "cold"]
    backend = cli.compile_backend or ("aot_eager" if cli.quick else "inductor")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"{name}, torch {torch.__version__}", flush=True)
    for part in parts:
        try:
            if part == "lm":
                checks, rows = run_lm_comparison(device, cli.quick, tuple(int(b) for b in cli.batches.split(",")),
                                                 cli.frames, plain=not cli.no_plain)
                print_table("Token agreement (same seeds)", checks)
                print_table("HeartMuLa token generation, plain vs fast", rows)
            elif part == "codec":
                print_table("HeartCodec decoding, fp32 baseline vs fast",
                            run_codec_comparison(device, cli.quick, tuple(cli.precisions.split(",")),
                                                 compile_backend=backend))
            elif part == "cold":
                print_table("Cold start (LM)", run_cold_start(device, cli.quick, cli.work_dir))
            elif part == "checks":
                print_table("Fast path checks on the device", run_gpu_checks(device, cli.quick, cli.frames))
            elif part == "variants":
                print_table("Fast path variants", run_variant_timings(device, cli.quick, cli.frames))
            else:
                print_table("Codec variants", run_codec_variants(device, cli.quick, compile_backend=backend))
        except Exception:  # one failing part must not hide the others' numbers
            traceback.print_exc()
            release_engines()
            _free(torch.device(device))


def run_gpu_checks(device: str = "cuda", quick: bool = False, frames: int = 100) -> list[dict[str, Any]]:
    """Correctness of the fast path on the device: RNG draws, graph vs eager, teacher-forced logits."""
    import copy

    from gpu_worker.generation.fast_generate import FrameEngine

    dev = torch.device(device)
    args, dtype = _setup(dev, quick)
    model = random_model(args, dev, dtype)
    prompts = [random_prompt(args, (30 if quick else 300) - 7 * i, seed=i) for i in range(3)]
    rows: list[dict[str, Any]] = []

    # 1. the engine's in-graph draws equal the plain path's per-frame draws (counter-based noise)
    from gpu_worker.generation.sampling_noise import song_noise

    engine = FrameEngine(model, num_songs=3, rows=2, cache_len=512, max_frames=4, audio_eos_id=AUDIO_EOS_ID,
                         use_graphs=False)
    same = True
    for song in range(3):
        engine.seed[song] = 1000 + song
        for frame in range(3):
            engine.count[song] = frame
            engine._draw()
            same &= torch.equal(engine.noise[song], song_noise(1000 + song, frame, 8, args.audio_vocab_size, dev))
    rows.append({"check": "in-graph noise == plain path noise (3 songs x 3 frames)", "result": same})
    del engine
    release_engines()

    # 2. CUDA graph replay gives the eager static-shape step's tokens
    hook = _fast_no_eos(dev)
    for songs in (1, 3):
        out = {}
        for graphs in (False, dev.type == "cuda"):
            out[graphs] = generate_fast(model, prompts[:songs], _params(1.5, frames), logits_hook=hook,
                                        use_graphs=graphs, seeds=list(range(songs)))
            release_engines()
        agreement = [_agreement(a.frames, b.frames) for a, b in zip(out[False], out.get(True, out[False]))]
        rows.append({"check": f"graph == eager tokens, {songs} song(s), {frames} frames",
                     "result": all(rate == 1.0 for _, rate in agreement),
                     "max abs": f"first differing frame per song: {[first for first, _ in agreement]}"})

    # 3. teacher-forced guided logits (same token history): fast vs plain in bf16, against bf16 vs fp32
    forced_frames = 16
    plain_seen: dict = {}

    def plain_record(frame, codebook, logits):
        plain_seen[(frame, codebook)] = logits[0].float().clone()
        return hook(None, codebook, logits)

    ref = generate(model, prompts[0], _params(1.5, forced_frames), logits_hook=plain_record,
                   seed=5).frames

    def force(seen: dict):
        def fast_hook(frame_index, codebook, logits):
            frame = int(frame_index[0])
            seen[(frame, codebook)] = logits[0].float().clone()
            forced = torch.full_like(logits, float("-inf"))
            forced[:, int(ref[codebook, frame])] = 0.0
            return forced

        def plain_hook(frame, codebook, logits):
            return fast_hook(torch.tensor([frame]), codebook, logits)
        return fast_hook, plain_hook

    fast_seen: dict = {}
    generate_fast(model, prompts[0], _params(1.5, forced_frames), logits_hook=force(fast_seen)[0], use_graphs=False,
                  seeds=[5])
    release_engines()
    fp32_seen: dict = {}
    reference = copy.deepcopy(model).float()
    generate(reference, prompts[0], _params(1.5, forced_frames), logits_hook=force(fp32_seen)[1],
             seed=5)
    del reference
    _free(dev)

    def rel(a: dict, b: dict) -> float:
        keys = sorted(b)
        x, y = torch.stack([a[k] for k in keys]), torch.stack([b[k] for k in keys])
        return float((x - y).norm() / y.norm())

    def max_abs(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in b)

    rows.append({"check": f"teacher-forced logits {forced_frames} frames x 8: |fast-plain|/|plain| (bf16)",
                 "result": rel(fast_seen, plain_seen), "max abs": max_abs(fast_seen, plain_seen)})
    rows.append({"check": "  model tolerance: |plain bf16 - plain fp32|/|fp32| (same weights)",
                 "result": rel(plain_seen, fp32_seen), "max abs": max_abs(plain_seen, fp32_seen)})
    rows.append({"check": "  |fast bf16 - plain fp32|/|fp32|",
                 "result": rel(fast_seen, fp32_seen), "max abs": max_abs(fast_seen, fp32_seen)})
    del model
    _free(dev)
    return rows


def run_variant_timings(device: str = "cuda", quick: bool = False, frames: int = 100) -> list[dict[str, Any]]:
    """Fast-path variants on the same card: complex vs pair RoPE; plain B=1 CFG as the baseline."""
    dev = torch.device(device)
    args, dtype = _setup(dev, quick)
    model = random_model(args, dev, dtype)
    prompt_length = 30 if quick else 300
    prompts = [random_prompt(args, prompt_length - 3 * i, seed=i) for i in range(8)]
    filled = prompt_length + frames // 2
    sync_every = 10 if quick else 20
    rows = [_row("CFG", "plain", 1, 2, time_plain(model, prompts[0], 1.5, frames, 10, dev), model, filled)]
    for complex_rope in (False, True):
        for songs, cfg in ((1, 1.5), (8, 1.5), (1, 1.0)):
            ms = time_fast(model, prompts[:songs], cfg, frames, dev, sync_every, complex_rope=complex_rope)
            rows.append(_row("CFG" if cfg > 1 else "no CFG", f"fast, {'complex' if complex_rope else 'pair'} RoPE",
                             songs, 2 * songs if cfg > 1 else songs, ms, model, filled))
            release_engines()
            _free(dev)
    del model
    _free(dev)
    return rows


def run_codec_variants(device: str = "cuda", quick: bool = False, compiled=COMPILED_CODEC_VARIANTS,
                       compile_backend: str = "inductor") -> list[dict[str, Any]]:
    """Eager bf16 estimator with the SQ decoder in fp32 vs bf16 (one window per SQ pass, as before, and the
    default batch), then the compiled variants, and SQ over all windows in one pass: 240 s song seconds,
    first-call seconds, SNR, per-window solve / SQ split."""
    dev = torch.device(device)
    codec, codes = _random_codec_and_song(dev, quick)
    gen = lambda: torch.Generator(device=dev).manual_seed(0)  # noqa: E731
    codec.decode(codes[:, :372], generator=gen())
    base_s, reference = _timed(dev, lambda: codec.decode(codes, generator=gen()))
    rows = [{"codec": "fp32 baseline", "case": f"{codes.shape[1] * 0.08:.0f} s song", "seconds": base_s,
             "SNR dB": float("inf")}]
    eager = [("bf16", None, 1), ("bf16", torch.bfloat16, 1), ("bf16", torch.bfloat16, None),
             ("bf16-mixed", torch.bfloat16, None)]
    for precision, sq, sq_batch in eager:
        options = {} if sq_batch is None else {"sq_batch_windows": sq_batch}
        rows.append(_fast_codec_row(codec, codes, reference, _codec_label(precision, False, sq, sq_batch), dev,
                                    precision=precision, sq_dtype=sq, compile=False, **options))
    windows = plan_windows(codes.shape[1]).num_windows
    for precision, sq, sq_batch in [(p, q, None) for p, q in compiled] + [("bf16", torch.bfloat16, windows)]:
        options = {} if sq_batch is None else {"sq_batch_windows": sq_batch}
        rows.append(_fast_codec_row(codec, codes, reference, _codec_label(precision, True, sq, sq_batch), dev,
                                    precision=precision, sq_dtype=sq, compile=True, compile_backend=compile_backend,
                                    **options))
    return rows


if __name__ == "__main__":
    main()
