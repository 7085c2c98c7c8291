"""Where a frame step's time goes on the GPU, and what the kernels it is made of can reach.

    python bench/frame_profile.py --only steps --case 8:1:300 --case 8:1:3000 --case 64:64:1800
    python bench/frame_profile.py --only steps --case 1:1:300 --modes before,pdl,skinny-nopdl,skinny
    python bench/frame_profile.py --only gemm --rows 2,16,128
    python bench/frame_profile.py --only attention --case 64:64:1800 --case 8:1:3000

* `steps`: a production FrameEngine (HeartMuLa-3B shapes, random bf16 weights, CFG, fused kernels, CUDA
  graphs, the production KV length) with `songs` of its `slots` live, every song's cache filled to `fill`
  positions (slot state set directly: the KV values do not change the time). Wall ms per replayed step
  (CUDA events over the replays timed), then the profiler's kernel time per step by kind; the step count
  is the number of frames' sampling kernels seen, not assumed. "gaps" = wall minus kernel time. `--modes`
  runs each case once per mode, side by side (`MODES`: cuBLAS or the skinny Triton GEMM for <= 16 rows,
  with or without programmatic dependent launch), each with the sha256 of the tokens its steps drew.
* `gemm`: each weight shape of a frame at `rows` rows, over as many distinct weights as the model has of
  that shape (so the L2 cache does not serve them), through cuBLAS (F.linear / addmm), the skinny kernel
  and the skinny kernel with PDL: us per call and the fraction of the copy bandwidth measured in the same run.
  `--sweep-wide` also times the Triton kernel's taller tiles (WIDE_SWEEP) above 16 rows.
* `attention`: the split-K decode attention kernel at a case's shape (graph replays, 4 layers' caches in
  turn), for block sizes, warps and stages, against the bytes of K and V it must read.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.bench_lm import AUDIO_EOS_ID, random_model  # noqa: E402
from bench.engine_batching import copy_bandwidth  # noqa: E402
from bench.profile_gpu import _kind  # noqa: E402
from bench.table import print_table  # noqa: E402
from gpu_worker.generation.fast_generate import FrameEngine  # noqa: E402
from gpu_worker.kernels import fused_ops  # noqa: E402
from gpu_worker.model.heartmula import PRESETS  # noqa: E402

STEP_MARKER = "_guided_logits_kernel"  # runs once per codebook of a frame step
# mode: (fused_ops.SKINNY_MAX_ROWS, fused_ops.PDL); "skinny" is production
MODES = {"before": (0, False), "pdl": (0, True), "skinny-nopdl": (16, False), "skinny": (16, True)}
PRODUCTION = (fused_ops.SKINNY_MAX_ROWS, fused_ops.PDL)
# --sweep-wide: Triton tiles tried above 16 rows, where production keeps cuBLAS (bench/RESULTS.md: none won)
WIDE_SWEEP = [fused_ops.GemmConfig(block_m=bm, block_n=bn, block_k=bk, warps=wp, stages=st)
              for bm in (64, 128) for bn in (32, 64, 128) for bk in (64, 128) for wp in (4, 8) for st in (3, 4)]


def set_mode(name: str) -> None:
    fused_ops.SKINNY_MAX_ROWS, fused_ops.PDL = MODES[name]


def _events_ms(run, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _engine(model, slots: int, songs: int, fill: int, cache_len: int) -> FrameEngine:
    fe = FrameEngine(model, num_songs=slots, rows=2, cache_len=cache_len, max_frames=1024,
                     audio_eos_id=AUDIO_EOS_ID)
    live = slice(0, songs)
    fe.pos[live] = fill
    fe.limit[live] = 1000
    fe.seed[live] = torch.arange(songs, device=fe.device)
    fe.cfg_scale[live] = 1.5
    fe.top_k[live] = 50
    fe.done[live] = False
    return fe


def steps(model, cases: list[tuple[int, int, int]], cache_len: int, repeats: int, modes: list[str]) -> None:
    kinds_rows, summary = [], []
    for slots, songs, fill in cases:
        for mode in modes:
            set_mode(mode)
            fe = _engine(model, slots, songs, fill, cache_len)
            max_position = fill + 3 * repeats + 40
            for _ in range(3):
                fe.step(max_position)  # capture + warm replays
            torch.cuda.synchronize()
            wall = _events_ms(lambda fe=fe, bound=max_position: fe.step(bound), repeats)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    fe.step(max_position)
                torch.cuda.synchronize()
            tokens = hashlib.sha256(fe.frames[:songs].cpu().numpy().tobytes()).hexdigest()[:12]
            by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            marker = 0
            for event in prof.events():
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                marker += STEP_MARKER in event.name
                kind = _kind(event.name)
                by_kind[kind][0] += 1
                by_kind[kind][1] += event.device_time_total
            frames = marker / model.args.audio_num_codebooks
            busy = sum(v[1] for v in by_kind.values()) / frames / 1e3
            label = f"{slots} slots, {songs} live, fill {fill}"
            for kind, (count, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
                kinds_rows.append({"case": label, "mode": mode, "kind": kind, "kernels/step": count / frames,
                                   "us/step": us / frames})
            summary.append({"case": label, "mode": mode, "frames profiled": frames, "wall ms/step": wall,
                            "kernel ms/step": busy, "gaps ms/step": wall - busy,
                            "kernels/step": sum(v[0] for v in by_kind.values()) / frames, "tokens sha256": tokens})
            del fe
            torch.cuda.empty_cache()
    fused_ops.SKINNY_MAX_ROWS, fused_ops.PDL = PRODUCTION
    print_table("frame step, kernel time by kind", kinds_rows)
    print_table("frame step, wall against kernel time (CUDA graph replays)", summary)


def _graph_us(calls: list, repeats: int) -> float:
    def run() -> None:
        for call in calls:
            call()
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return _events_ms(graph.replay, repeats) * 1e3 / len(calls)


def _gemm_shapes(model) -> dict[str, tuple[int, int, int]]:
    """name: (out, in, how many of them one frame reads)."""
    bb, dec = model.args.backbone, model.args.decoder
    return {
        "backbone qkv": (bb.embed_dim + 2 * bb.num_kv_heads * bb.head_dim, bb.embed_dim, bb.num_layers),
        "backbone wo (addmm)": (bb.embed_dim, bb.embed_dim, bb.num_layers),
        "backbone gate|up": (2 * bb.intermediate_dim, bb.embed_dim, bb.num_layers),
        "backbone w2 (addmm)": (bb.embed_dim, bb.intermediate_dim, bb.num_layers),
        "decoder qkv": (dec.embed_dim + 2 * dec.num_kv_heads * dec.head_dim, dec.embed_dim, dec.num_layers),
        "vocab head (padded)": (8320, dec.embed_dim, 7),
    }


def gemm(model, row_counts: list[int], bandwidth: float, repeats: int, sweep_wide: bool) -> None:
    """cuBLAS at the frame step's weight shapes, over distinct weights, against the copy bandwidth, and the
    skinny kernel at <= 16 rows; with `sweep_wide`, every WIDE_SWEEP tile of the same kernel above 16 rows."""
    dev, dtype = model.device, model.dtype
    rows_out, sweep_out = [], []
    for name, (out_f, in_f, count) in _gemm_shapes(model).items():
        weights = [torch.randn(out_f, in_f, device=dev, dtype=dtype) for _ in range(max(count, 8))]
        addmm = "addmm" in name
        for m in row_counts:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            acc = torch.randn(m, out_f, device=dev, dtype=dtype)
            nbytes = out_f * in_f * 2 + m * (in_f + out_f * (2 if addmm else 1)) * 2

            def triton_gemm(cfg, x=x, acc=acc, addmm=addmm):
                return lambda w: fused_ops.skinny_gemm(x, w, add_to=acc if addmm else None, config=cfg)

            def timed(kernel, pdl: bool, weights=weights) -> float:
                fused_ops.PDL = pdl
                try:
                    return _graph_us([lambda w=w: kernel(w) for w in weights], repeats)
                finally:
                    fused_ops.PDL = PRODUCTION[1]

            row = {"shape": f"{name} {out_f}x{in_f}", "rows": m}
            kernels = {"cuBLAS": (lambda w, x=x, acc=acc, addmm=addmm: acc.addmm_(x, w.t()) if addmm
                                  else F.linear(x, w), False)}
            if m <= fused_ops.SKINNY_BLOCK_M:
                cfg = fused_ops.skinny_config(out_f, in_f)
                kernels["skinny"] = (triton_gemm(cfg), False)
                kernels["skinny+PDL"] = (triton_gemm(cfg), True)
            for label, (kernel, pdl) in kernels.items():
                us = timed(kernel, pdl)
                row[f"{label} us"] = us
                row[f"{label} of copy bw"] = nbytes / us * 1e6 / bandwidth
            rows_out.append(row)
            if sweep_wide and m > fused_ops.SKINNY_BLOCK_M:
                tried = []
                for cfg in WIDE_SWEEP:
                    try:
                        tried.append((timed(triton_gemm(cfg), True), cfg))
                    except Exception as exc:  # a tile that needs more shared memory than the card has
                        print(f"  {name} rows {m} {cfg}: {type(exc).__name__}")
                tried.sort(key=lambda t: t[0])
                for us, cfg in tried[:2]:
                    sweep_out.append({"shape": f"{name} {out_f}x{in_f}", "rows": m,
                                      "bm/bn/bk/warps/stages": f"{cfg.block_m}/{cfg.block_n}/{cfg.block_k}/"
                                                               f"{cfg.warps}/{cfg.stages}",
                                      "us": us, "of copy bw": nbytes / us * 1e6 / bandwidth,
                                      "cuBLAS us": row["cuBLAS us"]})
        del weights
    print_table(f"GEMMs at the frame's shapes (graph replays, copy bw {bandwidth / 1e12:.2f} TB/s)", rows_out)
    if sweep_out:
        print_table("the Triton GEMM's two fastest tiles per shape above 16 rows (PDL on)", sweep_out)


def attention(model, cases: list[tuple[int, int, int]], cache_len: int, bandwidth: float, repeats: int) -> None:
    """The decode attention kernel at each case's shape, for a grid of launch configurations."""
    bb = model.args.backbone
    dev, dtype = model.device, model.dtype
    rows_out = []
    layers = bb.num_layers
    for slots, songs, fill in cases:
        n = 2 * slots
        k = [torch.randn(n, bb.num_kv_heads, cache_len, bb.head_dim, device=dev, dtype=dtype) for _ in range(4)]
        v = [torch.randn_like(t) for t in k]
        group = bb.num_heads // bb.num_kv_heads
        q = torch.randn(n, bb.num_kv_heads, group, bb.head_dim, device=dev, dtype=dtype)
        base = torch.zeros(n, dtype=torch.long, device=dev)
        base[:2 * songs] = fill
        chunk = fused_ops.attention_chunk(cache_len, n * bb.num_kv_heads)
        capacity = min(cache_len, math.ceil((fill + 1) / 512) * 512)
        live_bytes = 2 * songs * bb.num_kv_heads * (fill + 1) * bb.head_dim * 2 * 2
        for block_n, warps, stages in ((64, 4, None), (32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2),
                                       (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 2, 2)):
            try:
                us = _graph_us([(lambda i=i, block_n=block_n, warps=warps, stages=stages, q=q, k=k, v=v, base=base,
                                        capacity=capacity, chunk=chunk: fused_ops.decode_attention(
                                            q, k[i], v[i], base, seq=1, capacity=capacity, chunk=chunk,
                                            block_n=block_n, num_warps=warps, num_stages=stages))
                                for i in range(4)], repeats)
            except Exception as exc:  # noqa: BLE001 - a configuration the compiler refuses is reported
                rows_out.append({"case": f"{slots}:{songs}:{fill}", "block_n/warps/stages":
                                 f"{block_n}/{warps}/{stages}", "us/layer": float("nan"),
                                 "GB/s (live K+V)": 0.0, "ms/step (x layers)": float("nan"),
                                 "note": type(exc).__name__})
                continue
            rows_out.append({"case": f"{slots}:{songs}:{fill}", "block_n/warps/stages": f"{block_n}/{warps}/{stages}",
                             "us/layer": us, "GB/s (live K+V)": live_bytes / us / 1e3,
                             "ms/step (x layers)": us * layers / 1e3,
                             "note": f"floor {live_bytes / bandwidth * 1e6:.1f} us"})
        del k, v
        torch.cuda.empty_cache()
    print_table("decode attention per backbone layer (chunk fixed as in production)", rows_out)


def _case(text: str) -> tuple[int, int, int]:
    slots, songs, fill = (int(part) for part in text.split(":"))
    return slots, songs, fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="steps,gemm,attention")
    parser.add_argument("--case", type=_case, action="append", help="slots:songs:fill")
    parser.add_argument("--rows", default="2,16,128")
    parser.add_argument("--cache-len", type=int, default=None, help="default: the model's max_seq_len")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--modes", default="skinny", help=f"steps: comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--sweep-wide", action="store_true", help="gemm: every WIDE_SWEEP tile above 16 rows")
    parser.add_argument("--blas", default=None, choices=("cublas", "cublaslt"),
                        help="the BLAS library PyTorch prefers for the GEMMs that stay on it (default: PyTorch's)")
    opts = parser.parse_args()
    only = set(opts.only.split(","))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    if opts.blas:
        torch.backends.cuda.preferred_blas_library(opts.blas)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"BLAS {torch.backends.cuda.preferred_blas_library()}")
    model = random_model(PRESETS["3B"], device, torch.bfloat16)
    cache_len = opts.cache_len or model.args.backbone.max_seq_len
    cases = opts.case or [(8, 1, 300), (8, 1, 3000), (64, 64, 1800)]
    if "steps" in only:
        steps(model, cases, cache_len, opts.repeats, opts.modes.split(","))
    if "gemm" in only:
        gemm(model, [int(r) for r in opts.rows.split(",")], bandwidth, opts.repeats, opts.sweep_wide)
    if "attention" in only:
        attention(model, cases, cache_len, bandwidth, opts.repeats)


if __name__ == "__main__":
    main()
