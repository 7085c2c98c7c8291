"""GPU worker cold start to the first frame and the first decoded window, as on a new machine and on a restart.

    python bench/cold_start.py            # writes a random 3B checkpoint (fp32 safetensors) + codec first
    python bench/cold_start.py --checkpoint ROOT

Each row is a fresh process doing what a threads-mode GPU worker does (the production path on CUDA):
the compile caches pointed at its data directory (gpu_worker/worker/compile_cache.py), optionally the
background warm-ups started at once (gpu_worker/worker/codec_warmup.py: the frame kernels, then the codec
once the first song is admitted), the LM loaded the worker's
way (model_cache.get_lm, files hashed for the record unless the checksum cache has them), a 1-frame and
a 2-frame song through the batching engine (the fused Triton kernels compile at the first), then one
codec window decoded with the bf16 compiled codec (its compile happens here unless the warm-up did it).
Times are seconds from the process start. Runs: a new machine (empty caches) without and with the
background warm-up, then a restart that finds the caches the run before it left. The page cache is warm
for all (the checkpoint was just written).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STARTED = time.perf_counter()
PROFILE_VARIABLE = "SONGPIPE_BENCH_PROFILE"  # set: the start to the first frame is profiled and printed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class StackSampler:
    """Every thread's Python stack sampled every `interval` s from now to `report` (the engine works on a thread
    of its own, which cProfile would not see): the functions on most samples, inclusive, are printed."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.samples = interval, 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.started, self._stop = time.perf_counter(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                seen = set()
                while frame is not None:
                    code = frame.f_code
                    seen.add(f"{code.co_filename.split('site-packages/')[-1]}:{code.co_firstlineno} {code.co_name}")
                    frame = frame.f_back
                self.counts.update(seen)

    def report(self, top: int = 45) -> None:
        self._stop.set()
        self._thread.join()
        seconds = time.perf_counter() - self.started
        print(f"--- stack samples over {seconds:.2f} s ({self.samples} samples; s = share of samples x duration, "
              f"summed over threads)")
        for name, count in self.counts.most_common(top):
            print(f"{count / max(1, self.samples) * seconds:7.3f} s  {name[:150]}")


def child(checkpoint: Path) -> None:
    sampler = StackSampler() if os.environ.get(PROFILE_VARIABLE) else None
    # as the GPU worker's entry module does, before torch: the kernel warm-up's children need no GPU
    from gpu_worker.generation import compile_children
    from gpu_worker.worker.compile_cache import use_data_dir_compile_caches
    from tasks.settings import get_settings

    settings = get_settings()
    use_data_dir_compile_caches(settings.data_dir)
    compile_children.start_for_worker(settings)
    children_started = time.perf_counter() - STARTED

    import torch

    from bench.bench_lm import random_prompt
    from gpu_worker.checkpoints import file_checksums
    from gpu_worker.generation.generate import SamplingParams
    from gpu_worker.model.heartcodec import WindowByWindow
    from gpu_worker.worker import codec_warmup, model_cache
    from gpu_worker.worker.batching import codec_turn, get_engine, install_threads_mode_hooks

    dev = torch.device(settings.device)  # cuda; cpu only for --tiny, a smoke run of this script
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    install_threads_mode_hooks()
    file_checksums.use_cache_file(settings.data_dir / "checksums.json")
    marks = {"imports": time.perf_counter() - STARTED}
    # as at the worker's worker_ready: collects the kernel warm-up's children, warms the codec
    warming = codec_warmup.start_background_warmup(settings)
    torch.zeros(1, device=dev)
    sync()
    marks["CUDA context"] = time.perf_counter() - STARTED
    lm = model_cache.get_lm(checkpoint, dev, torch.bfloat16 if cuda else torch.float32)
    sync()
    marks["LM loaded"] = time.perf_counter() - STARTED
    prompt = random_prompt(lm.model.args, min(300, lm.model.args.backbone.max_seq_len // 2), seed=0)
    engine = get_engine(lm.model, max_songs=settings.gpu_batch_slots)
    for frames, name in ((1, "first frame"), (2, "second frame")):
        params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=frames * 80)
        engine.submit(prompt, params, 0).result()
        sync()
        marks[name] = time.perf_counter() - STARTED
        if sampler is not None and name == "first frame":
            sampler.report()
    if warming is not None:
        warming.join()
        marks["background warm-up done"] = time.perf_counter() - STARTED
    codec = model_cache.get_codec(checkpoint, dev, torch.float32)
    fast = model_cache.get_fast_codec(codec.model) if cuda else None
    solve = fast.solve_window if fast else codec.model.solve_window
    decode_latents = fast.decode_latents if fast else codec.model.scalar_model.decode_batch
    geometry = codec.model.config.windows
    codes = torch.randint(0, codec.model.config.codebook_size, (8, geometry.window_frames), device=dev)
    with torch.inference_mode(), codec_turn():
        song = WindowByWindow(geometry, torch.Generator(device=dev).manual_seed(1), geometry.window_frames,
                              device=dev, solve_window=solve, decode_latents=decode_latents)
        song.add(codes, last=True)
        sync()
    marks["first window decoded"] = time.perf_counter() - STARTED
    marks["codec compile s (where it ran)"] = (fast.compile_seconds if fast else None) or 0.0
    marks["kernel warm-up s"] = codec_warmup.warmup_seconds.get("frame_kernels", 0.0)
    if marks["kernel warm-up s"]:
        marks["kernel warm-up done"] = children_started + marks["kernel warm-up s"]
    print("RESULT " + json.dumps(marks), flush=True)


PRIME_IMPORTS = ("import torch, triton, torch._dynamo, torch._inductor.compile_fx, torch._inductor.codecache; "
                 "import gpu_worker.worker.celery_worker, gpu_worker.generation.kernel_warmup, bench.bench_lm")


def run_child(checkpoint: Path, data_dir: Path, warmup: bool, device: str = "cuda") -> dict[str, float]:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(SONGPIPE_DATA_DIR=str(data_dir), HEARTMULA_CKPT=str(checkpoint), SONGPIPE_DEVICE=device,
               SONGPIPE_GPU_BATCHING="1", SONGPIPE_CODEC_DTYPE="bfloat16" if device == "cuda" else "float32",
               SONGPIPE_CODEC_WARMUP="1" if warmup else "0", SONGPIPE_KERNEL_WARMUP="1" if warmup else "0")
    out = subprocess.run([sys.executable, __file__, "--child", str(checkpoint)],
                         env=env, capture_output=True, text=True, check=False)
    if env.get(PROFILE_VARIABLE):
        print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"cold-start child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def write_published_codec(root: Path) -> None:
    """A random codec of the published size in the published layout (fp32, 2 shards)."""
    from gpu_worker.checkpoints.checkpoint_files import write_state_dict
    from gpu_worker.checkpoints.heartcodec_checkpoint import tiny_codec_tensors
    from gpu_worker.model.heartcodec import HeartCodecConfig

    config = HeartCodecConfig.published()
    folder = root / "HeartCodec-oss"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    write_state_dict(folder, tiny_codec_tensors(config, seed=0, layout="sharded"), shards=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pycache", type=Path, help="PYTHONPYCACHEPREFIX for the runs, primed by one import "
                        "process first: for a host whose installed packages have no bytecode caches (each fresh "
                        "process would compile torch's modules from source, which a production image does not)")
    parser.add_argument("--profile", action="store_true", help="then one more restart, with its start to its "
                        "first frame profiled (every thread's stack sampled; printed)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run on the CPU with the tiny checkpoint (its "
                        "numbers mean nothing)")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from bench.table import print_table

    with tempfile.TemporaryDirectory(prefix="songpipe-cold-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if args.tiny:
            from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(work / "ckpt")
        elif checkpoint is None:
            import torch

            from bench.bench_fast import REAL_CONFIG
            from bench.bench_lm import REAL_GEN_CONFIG, random_model, write_published_layout
            from gpu_worker.model.heartmula import PRESETS

            checkpoint = work / "ckpt"
            model = random_model(PRESETS["3B"], torch.device("cuda"), torch.bfloat16)
            write_published_layout(model, checkpoint, REAL_CONFIG, REAL_GEN_CONFIG)
            del model
            torch.cuda.empty_cache()
            write_published_codec(checkpoint)
        if args.pycache is not None:
            os.environ["PYTHONPYCACHEPREFIX"] = str(args.pycache)
            subprocess.run([sys.executable, "-c", PRIME_IMPORTS], check=True, cwd=Path(__file__).resolve().parent.parent)
        rows = []
        for run, data_dir, warmup in (
                ("new machine: empty caches, no background warm-ups", work / "data-a", False),
                ("new machine: empty caches, background warm-ups (kernels, then codec)", work / "data-b", True),
                ("worker restart: the caches of the run above, background warm-ups", work / "data-b", True)):
            marks = run_child(checkpoint, data_dir, warmup, "cpu" if args.tiny else "cuda")
            rows.append({"run": run, **{f"{name}": round(seconds, 2) for name, seconds in marks.items()}})
            print(json.dumps(rows[-1]), flush=True)  # a run cut short by a time limit keeps the rows before it
        if args.profile:
            os.environ[PROFILE_VARIABLE] = "1"
            print("--- profile of a restart, the process start to its first frame", flush=True)
            print(json.dumps(run_child(checkpoint, work / "data-b", True, "cpu" if args.tiny else "cuda")), flush=True)
        print_table("GPU worker cold start: first frame and first decoded window (seconds from process start)", rows)


if __name__ == "__main__":
    main()
