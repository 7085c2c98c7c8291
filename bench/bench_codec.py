"""HeartCodec decode benchmark at the published sizes with random weights (no checkpoint files needed).

Measures seconds per 29.76 s window (372 frames) and for a 240 s song (3000 frames, 10 windows) in fp32 with
PyTorch's default precision (matmul TF32 off, cuDNN convolution TF32 on, as the reference runs), split into the
flow-matching solve and the SQ decoder, with peak GPU memory. `--quick` runs the tiny sizes on the CPU.

    .venv/bin/python -m bench.bench_codec            # H100/H200
    .venv/bin/python -m bench.bench_codec --quick    # smoke test anywhere
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from gpu_worker.model.heartcodec import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    WINDOW_FRAMES,
    HeartCodec,
    HeartCodecConfig,
    build_random_heartcodec,
    plan_windows,
)

GIB = 1024 ** 3


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak GiB since the call started; 0 on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    return seconds, peak


def _row(case: str, frames: int, windows: int, seconds: float, peak_gib: float, weights_gib: float) -> dict:
    audio_seconds = frames * SAMPLES_PER_FRAME / SAMPLE_RATE
    return {"case": case, "frames": frames, "windows": windows, "seconds": round(seconds, 4),
            "seconds_per_window": round(seconds / windows, 4), "x_realtime": round(audio_seconds / seconds, 2),
            "peak_gib": round(peak_gib, 2), "weights_gib": round(weights_gib, 2)}


def run_codec_benchmark(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Decode random codes with a randomly initialised codec; one dict per measured case."""
    dev = torch.device(device)
    config = HeartCodecConfig.tiny() if quick else HeartCodecConfig.published()
    model: HeartCodec = build_random_heartcodec(config, device=dev, dtype=torch.float32, seed=0)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    song_frames = 2 * WINDOW_FRAMES - 52 if quick else 3000  # quick: 2 windows instead of 10
    codes = {frames: torch.randint(0, config.codebook_size, (config.num_quantizers, frames),
                                   generator=torch.Generator().manual_seed(frames))
             for frames in (WINDOW_FRAMES, song_frames)}

    def decode(frames: int) -> None:
        model.decode(codes[frames], generator=torch.Generator(device=dev).manual_seed(0))

    rows = []
    for case, frames in (("1 window, first call", WINDOW_FRAMES), ("1 window", WINDOW_FRAMES),
                         (f"{frames_to_seconds(song_frames):.0f} s song", song_frames)):
        seconds, peak = _timed(dev, lambda frames=frames: decode(frames))
        rows.append(_row(case, frames, plan_windows(frames).num_windows, seconds, peak, weights_gib))

    # Where one window's time goes: the estimator's Euler solve vs the SQ-Codec decoder.
    window = codes[WINDOW_FRAMES].to(dev, torch.long)
    generator = torch.Generator(device=dev).manual_seed(0)
    with torch.inference_mode():
        mu = model.flow_matching.conditioning(window)
        latents: list[torch.Tensor] = []
        seconds, peak = _timed(dev, lambda: latents.append(model.flow_matching.solve(mu, None, generator)))
        rows.append(_row("  flow-matching solve (10 steps, CFG)", WINDOW_FRAMES, 1, seconds, peak, weights_gib))
        seconds, peak = _timed(dev, lambda: model.scalar_model.decode(latents[0]))
        rows.append(_row("  SQ-Codec decoder", WINDOW_FRAMES, 1, seconds, peak, weights_gib))
    return rows


def frames_to_seconds(frames: int) -> float:
    return frames * SAMPLES_PER_FRAME / SAMPLE_RATE


def describe_setup(device: str, quick: bool) -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    sizes = "tiny" if quick else "published"
    return (f"HeartCodec decode, {sizes} sizes, fp32, random weights | {name} | torch {torch.__version__} | "
            f"matmul TF32 {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<40} {'frames':>6} {'win':>4} {'seconds':>9} {'s/window':>9} {'x rt':>7} {'peak GiB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['case']:<40} {r['frames']:>6} {r['windows']:>4} {r['seconds']:>9.3f} "
                     f"{r['seconds_per_window']:>9.3f} {r['x_realtime']:>7.2f} {r['peak_gib']:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.quick else "cuda")
    print(describe_setup(device, args.quick))
    rows = run_codec_benchmark(device=device, quick=args.quick)
    print(f"weights: {rows[0]['weights_gib']:.2f} GiB (peak includes them)")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
