"""HeartMuLa-oss-3B token generation benchmark, plain path, random weights (spec §9).

    python bench/bench_lm.py            # on a GPU: real 3B sizes, bf16
    python bench/bench_lm.py --quick    # on the CPU: tiny sizes, fp32, a smoke run of the same code

Measures, per setting (with CFG = batch 2, without = batch 1): ms/frame (median over the measured
frames after a warm-up run, each frame after a ~300-token prefill), frames/s, the bytes one frame
must read (weights once per frame, the decoder once per codebook, plus the filled KV cache), the
bandwidth that achieves, and peak GPU memory. It also writes the random weights once in the
published layout (fp32, 4 shards) and times `load_heartmula` into bf16 on the device; the files
were just written, so that is a warm page-cache load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from gpu_worker.checkpoints.checkpoint_files import write_state_dict  # noqa: E402
from gpu_worker.checkpoints.heartmula_checkpoint import (  # noqa: E402
    TINY_CONFIG,
    TINY_GEN_CONFIG,
    heartmula_args_from_config,
    load_heartmula,
)
from gpu_worker.checkpoints.synthetic_tokenizer import write_synthetic_tokenizer  # noqa: E402
from gpu_worker.generation.generate import SamplingParams, generate  # noqa: E402
from gpu_worker.model.heartmula import PRESETS, HeartMuLa, HeartMuLaArgs  # noqa: E402
from gpu_worker.model.meta_build import meta_modules  # noqa: E402
from gpu_worker.model.prompt import Prompt  # noqa: E402

H100_COPY_BANDWIDTH = 3.0e12  # bytes/s, measured copy bandwidth of an H100 SXM (spec §9)
# The synthetic tokenizer's specials (256/257) stand in for 128000/128001: text ids are random here.
REAL_GEN_CONFIG = {"text_bos_id": 256, "text_eos_id": 257, "audio_eos_id": 8193, "empty_id": 0}
AUDIO_EOS_ID = 8193


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | str:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else "n/a"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def random_model(args: HeartMuLaArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HeartMuLa:
    """Random weights made directly on the device in the target dtype (no fp32 copy of 3.9 B parameters)."""
    with meta_modules():
        model = HeartMuLa(args).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".scale"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    with torch.no_grad():  # EOS logit 0, far below the top 50 of random logits: songs run their full length
        model.codebook0_head.weight[AUDIO_EOS_ID] = 0
        model.audio_head[..., AUDIO_EOS_ID] = 0
    return model.requires_grad_(False).eval()


def random_prompt(args: HeartMuLaArgs, length: int, seed: int = 0) -> Prompt:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(length, 9, dtype=torch.long)
    tokens[:, 8] = torch.randint(0, args.text_vocab_size, (length,), generator=generator)
    mask = torch.zeros(length, 9, dtype=torch.bool)
    mask[:, 8] = True
    return Prompt(tokens=tokens, mask=mask, muq_idx=min(10, length - 1), tags_text="", lyrics_text="",
                  audio_eos_id=AUDIO_EOS_ID, empty_id=0)


def bytes_per_frame(model: HeartMuLa, batch: int, filled_positions: int) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one frame reads: each decoder step re-reads the whole decoder."""
    def size(module_or_param) -> int:
        params = [module_or_param] if isinstance(module_or_param, torch.Tensor) else module_or_param.parameters()
        return sum(p.numel() * p.element_size() for p in params)

    steps = model.args.audio_num_codebooks - 1
    weights = (size(model.backbone) + size(model.codebook0_head) + steps * size(model.decoder)
               + size(model.projection) + size(model.audio_head))
    bb = model.args.backbone
    element = model.codebook0_head.weight.element_size()
    kv = 2 * bb.num_layers * bb.num_kv_heads * bb.head_dim * filled_positions * batch * element
    return float(weights), float(kv)


def eos_blocker(device: torch.device):
    """A logits hook that rules EOS out: random weights could end the song early, and a fixed
    length keeps the measurement comparable (one small kernel per codebook)."""
    eos = torch.tensor([AUDIO_EOS_ID], device=device)
    return lambda frame, codebook, logits: logits.index_fill(-1, eos, float("-inf"))


def time_decode(model: HeartMuLa, prompt: Prompt, cfg_scale: float, frames: int, warmup_frames: int,
                device: torch.device) -> dict[str, Any]:
    params = SamplingParams(temperature=1.0, top_k=50, cfg_scale=cfg_scale, max_audio_length_ms=frames * 80)
    warmup = SamplingParams(temperature=1.0, top_k=50, cfg_scale=cfg_scale, max_audio_length_ms=warmup_frames * 80)
    no_eos = eos_blocker(device)
    generate(model, prompt, warmup, seed=0, logits_hook=no_eos)
    _sync(device)
    _reset_peak(device)
    stamps: list[float] = []

    def stamp(done: int, total: int) -> None:
        _sync(device)  # the plain path syncs every frame anyway (EOS read-back); this adds nothing
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    generate(model, prompt, params, seed=0, progress=stamp, progress_every=1,
             logits_hook=no_eos)
    # stamps[0] follows prefill + frame 0; the last one follows the final copy to the host
    per_frame = [b - a for a, b in zip(stamps[:-2], stamps[1:-1])]
    ms = statistics.median(per_frame) * 1e3
    batch = 2 if cfg_scale > 1 else 1
    weight_bytes, kv_bytes = bytes_per_frame(model, batch, prompt.length + frames // 2)
    return {
        "setting": f"decode, {'CFG' if batch == 2 else 'no CFG'} (B={batch})",
        "ms/frame": ms,
        "frames/s": 1e3 / ms,
        "prefill+frame0 ms": (stamps[0] - start) * 1e3,
        "GB/frame": (weight_bytes + kv_bytes) / 1e9,
        "GB/s": (weight_bytes + kv_bytes) / (ms * 1e-3) / 1e9,
        "H100 floor ms": (weight_bytes + kv_bytes) / H100_COPY_BANDWIDTH * 1e3,
        "peak GiB": _peak_gib(device),
    }


def write_published_layout(model: HeartMuLa, root: Path, config: dict, gen_config: dict) -> None:
    """The model's weights as fp32 safetensors in the published folder layout (4 shards like the 3B)."""
    folder = root / "HeartMuLa-oss-3B"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    write_state_dict(folder, state, shards=4)
    write_synthetic_tokenizer(root / "tokenizer.json")
    (root / "gen_config.json").write_text(json.dumps(gen_config))


def time_load(root: Path, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], HeartMuLa]:
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    loaded = load_heartmula(root, device=device, dtype=dtype)
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"setting": f"load_heartmula -> {device.type} {str(dtype).removeprefix('torch.')} (warm page cache)",
           "seconds": seconds, "peak GiB": _peak_gib(device)}
    return row, loaded.model


def run_lm_benchmark(device: str = "cuda", frames: int = 100, quick: bool = False, *, prompt_length: int = 300,
                     load: bool = True, work_dir: str | None = None) -> list[dict[str, Any]]:
    """Benchmark rows (one dict per setting); `quick` runs the tiny model in fp32 for a smoke test."""
    dev = torch.device(device)
    if quick:
        config, gen_config = TINY_CONFIG, TINY_GEN_CONFIG
        args, dtype = heartmula_args_from_config(TINY_CONFIG, Path("tiny config.json")), torch.float32
        frames, prompt_length, warmup_frames = min(frames, 20), min(prompt_length, 30), 3
    else:
        config = {"model_type": "heartmula", "backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M",
                  "text_vocab_size": 128256, "audio_vocab_size": 8197, "audio_num_codebooks": 8, "muq_dim": 512}
        gen_config, args, dtype, warmup_frames = REAL_GEN_CONFIG, PRESETS["3B"], torch.bfloat16, 20

    rows: list[dict[str, Any]] = []
    _reset_peak(dev)
    start = time.perf_counter()
    model = random_model(args, dev, dtype)
    _sync(dev)
    rows.append({"setting": f"random init on {dev.type}, {str(dtype).removeprefix('torch.')}",
                 "seconds": time.perf_counter() - start, "peak GiB": _peak_gib(dev)})
    if load:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            start = time.perf_counter()
            write_published_layout(model, Path(tmp), config, gen_config)
            rows.append({"setting": "write fp32 safetensors, 4 shards", "seconds": time.perf_counter() - start})
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            row, model = time_load(Path(tmp), dev, dtype)
            rows.append(row)

    prompt = random_prompt(args, prompt_length)
    for cfg_scale in (1.5, 1.0):
        rows.append(time_decode(model, prompt, cfg_scale, frames, warmup_frames, dev))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU (smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--frames", type=int, default=100, help="measured frames per setting")
    parser.add_argument("--prompt-length", type=int, default=300)
    parser.add_argument("--no-load", action="store_true", help="skip writing and loading the 15.75 GB files")
    parser.add_argument("--work-dir", default=None, help="where to write the temporary checkpoint")
    cli = parser.parse_args()
    from bench.table import print_table

    device = cli.device or ("cpu" if cli.quick else "cuda")
    rows = run_lm_benchmark(device=device, frames=cli.frames, quick=cli.quick, prompt_length=cli.prompt_length,
                            load=not cli.no_load, work_dir=cli.work_dir)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print_table(f"HeartMuLa token generation, plain path ({name}, torch {torch.__version__})", rows)


if __name__ == "__main__":
    main()
