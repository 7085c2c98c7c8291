"""What a GPU worker does at start so that its first song is not waiting on compiles (issue 15, cold start):
compile caches in the data directory, and the codec warmed up on a background thread."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gpu_worker.worker import codec_warmup, model_cache
from gpu_worker.worker.compile_cache import CACHE_VARIABLES, use_data_dir_compile_caches
from tasks.settings import Settings


def test_compile_caches_go_to_the_data_directory_unless_the_operator_chose_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    chosen = use_data_dir_compile_caches(tmp_path / "data")
    assert chosen == {"TRITON_CACHE_DIR": str(tmp_path / "data" / "compile-cache" / "triton"),
                      "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    assert (tmp_path / "data" / "compile-cache" / "triton").is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == chosen["TRITON_CACHE_DIR"] and set(chosen) == set(CACHE_VARIABLES)


def test_the_background_warm_up_runs_only_for_the_compiled_codec_on_cuda_in_threads_mode():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert codec_warmup.should_warm(cuda, torch.bfloat16, threads_mode=True, enabled=True)
    assert not codec_warmup.should_warm(cuda, torch.float32, threads_mode=True, enabled=True)  # nothing compiles
    assert not codec_warmup.should_warm(cuda, torch.bfloat16, threads_mode=False, enabled=True)  # prefork parent
    assert not codec_warmup.should_warm(cpu, torch.bfloat16, threads_mode=True, enabled=True)
    assert not codec_warmup.should_warm(cuda, torch.bfloat16, threads_mode=True, enabled=False)
    assert codec_warmup.start_background_warmup(Settings(device="cpu")) is None


def test_a_warm_up_loads_the_codec_once_for_the_stages_and_decodes_one_window(tiny_checkpoint_dir, tmp_path):
    model_cache.clear()
    settings = Settings(data_dir=tmp_path, HEARTMULA_CKPT=tiny_checkpoint_dir, device="cpu")
    timings = codec_warmup.warm_codec(settings)
    assert set(timings) == {"load", "first_window"} and timings["first_window"] > 0
    kinds = [m["kind"] for m in model_cache.loaded_models()]
    assert kinds == ["codec"]  # the stage's get_codec finds this very model
    model_cache.clear()


def test_the_gpu_worker_starts_the_warm_up_when_it_is_ready():
    from celery.signals import worker_ready

    import gpu_worker.worker.celery_worker  # noqa: F401  (the GPU worker's entry module)

    assert codec_warmup._on_worker_ready in [receiver for _key, receiver in worker_ready.receivers]


def test_importing_the_gpu_worker_points_the_compile_caches_at_its_data_dir(tmp_path):
    """In a fresh interpreter with no cache variables set: the worker's entry module sets both, under the
    data directory, before anything compiles."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES and not k.startswith("SONGPIPE_")}
    env.update(SONGPIPE_DATA_DIR=str(tmp_path / "data"), SONGPIPE_DEVICE="cpu", REDIS_URL="redis://127.0.0.1:1/0")
    probe = ("import json, os; import gpu_worker.worker.celery_worker; "
             f"print(json.dumps({{v: os.environ.get(v) for v in {sorted(CACHE_VARIABLES)!r}}}))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout
    chosen = json.loads(out.strip().splitlines()[-1])
    root = tmp_path / "data" / "compile-cache"
    assert chosen == {variable: str(root / folder) for variable, folder in CACHE_VARIABLES.items()}
    assert all((root / folder).is_dir() for folder in CACHE_VARIABLES.values())
