"""What a GPU worker does at start so that its first song is not waiting on compiles (issue 15, cold start):
compile caches in the data directory, the frame step's kernels compiled while the LM loads, and the codec
warmed up on a background thread once the first song is in."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.generation import warmup_stamp
from gpu_worker.worker import codec_warmup, model_cache
from gpu_worker.worker.compile_cache import CACHE_VARIABLES, use_data_dir_compile_caches
from tasks.settings import Settings
from tests import model_fixtures
from tests.stack_fixtures import wait_until

lm = model_fixtures.lm  # the tiny checkpoint's LM (a module-scoped fixture)


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


def test_the_kernel_warm_up_runs_where_the_engine_uses_the_fused_kernels(monkeypatch):
    from gpu_worker.generation import compile_children

    assert compile_children.should_compile(Settings(device="cuda"))  # batching is the default on CUDA
    assert compile_children.should_compile(Settings(device="cuda:1", lm_dtype="bfloat16", gpu_batching=True))
    assert not compile_children.should_compile(Settings(device="cuda", lm_dtype="float32"))  # eager ops
    assert not compile_children.should_compile(Settings(device="cuda", gpu_batching=False))  # prefork: no engine
    assert not compile_children.should_compile(Settings(device="cpu"))
    assert not compile_children.should_compile(Settings(device="cuda:x"))  # left for resolve_device to refuse
    assert not compile_children.should_compile(Settings(device="cuda", kernel_warmup=False))
    monkeypatch.setattr(compile_children, "cuda_device_count", lambda: 0)
    assert not compile_children.should_compile(Settings(device="auto"))  # auto on a host without CUDA
    assert compile_children.start_for_worker(Settings(device="cpu")) is None


def test_the_warm_up_model_keeps_every_dimension_a_kernel_sees():
    from gpu_worker.generation.kernel_warmup import warmup_args
    from gpu_worker.model.heartmula import PRESETS

    real = PRESETS["3B"]
    small = warmup_args(real)
    assert small.backbone.num_layers == small.decoder.num_layers == 1
    for stack in ("backbone", "decoder"):
        a, b = getattr(real, stack), getattr(small, stack)
        assert {f: getattr(a, f) for f in vars(a) if f != "num_layers"} == \
            {f: getattr(b, f) for f in vars(b) if f != "num_layers"}
    assert (small.audio_vocab_size, small.audio_num_codebooks) == (real.audio_vocab_size, real.audio_num_codebooks)


FRAME_STEP_KERNELS = {"_rms_norm_kernel", "_rope_to_cache_kernel", "_attention_chunk_kernel",
                      "_attention_merge_kernel", "_silu_mul_kernel", "_guided_logits_kernel", "_topk_race_kernel",
                      "_skinny_gemm_kernel"}


def _compiled(cache: Path) -> dict[str, dict]:
    """Triton cache entry -> its kernel's metadata, for every compiled kernel in `cache`."""
    return {meta.parent.name: json.loads(meta.read_text()) for meta in cache.glob("*/*.json")
            if not meta.name.startswith("__grp__") and (meta.parent / f"{meta.stem}.cubin").exists()}


def test_the_warm_up_children_compile_every_kernel_of_the_frame_step_for_the_card_without_touching_a_gpu(
        tiny_checkpoint_dir, tmp_path, monkeypatch):
    """The real compile (Triton and ptxas, for sm_90) on this GPU-less host: the children run a frame step on
    the meta device, so they need no CUDA. Started for a worker (split over three children) or by one child,
    the Triton cache ends with the same entries (Triton keys them by source, specialisation and target, so
    the worker's first frame on such a card finds them), one for each kernel the frame step launches."""
    from gpu_worker.generation import compile_children
    from gpu_worker.kernels import triton_kernels

    assert FRAME_STEP_KERNELS == {name for name in vars(triton_kernels) if name.endswith("_kernel")}
    monkeypatch.setattr(compile_children, "_running", None)
    monkeypatch.setattr(compile_children, "cuda_capability", lambda ordinal: 90)
    monkeypatch.setattr(compile_children, "child_count", lambda: 3)
    caches = {3: tmp_path / "triton-3", 1: tmp_path / "triton-1"}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caches[3]))
    children = compile_children.start_for_worker(Settings(device="cuda", HEARTMULA_CKPT=tiny_checkpoint_dir))
    assert children is not None and compile_children.start_for_worker(Settings(device="cuda")) is children
    split = children.wait()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caches[1]))
    alone = compile_children.start_children(tiny_checkpoint_dir, "bfloat16", 90, children=1).wait()
    assert (split.children, alone.children) == (3, 1)
    assert split.source == alone.source == "trace"  # no shipped manifest is for the tiny checkpoint
    assert split.compiled == split.asked == alone.compiled == alone.asked >= len(FRAME_STEP_KERNELS)
    entries = {n: _compiled(cache) for n, cache in caches.items()}
    assert set(entries[3]) == set(entries[1]) and len(entries[3]) == split.asked
    assert {meta["name"] for meta in entries[3].values()} == FRAME_STEP_KERNELS
    assert all(meta["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32} for meta in entries[3].values())
    # a restart finds the stamp the completed warm-up left in its cache and starts no child at all
    stamps = list((caches[3] / warmup_stamp.STAMP_FOLDER).glob("*.json"))
    assert [json.loads(p.read_text())["compiled"] for p in stamps] == [split.compiled]
    assert not (caches[1] / warmup_stamp.STAMP_FOLDER).exists()  # started without one: nothing to skip later
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caches[3]))
    monkeypatch.setattr(compile_children, "_running", None)
    assert compile_children.start_for_worker(Settings(device="cuda", HEARTMULA_CKPT=tiny_checkpoint_dir)) is None


def _record_manifest(*args: str) -> list[str]:
    """`python -m gpu_worker.generation.kernel_manifest ARGS` in a process that compiles Triton kernels (these
    tests' process interprets them): its output lines."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "gpu_worker.generation.kernel_manifest", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.strip().splitlines()


def test_children_that_replay_a_manifest_compile_the_same_kernels_as_a_traced_frame_step_without_torch(
        tiny_checkpoint_dir, tmp_path, monkeypatch):
    """A manifest recorded from the meta-device frame step, replayed by children that never import torch,
    leaves exactly the Triton cache entries (same keys, so the same source, specialisation and target) that
    children tracing the step leave."""
    from gpu_worker.generation import compile_children, kernel_manifest

    manifests = tmp_path / "manifests"
    path = Path(_record_manifest("--checkpoint", str(tiny_checkpoint_dir), "--write", str(manifests))[-1])
    assert path.parent == manifests and kernel_manifest.find_calls(tiny_checkpoint_dir, "float16", manifests) is None
    assert kernel_manifest.find_calls(tiny_checkpoint_dir, "bfloat16", manifests) is not None
    caches = {"trace": tmp_path / "triton-trace", "manifest": tmp_path / "triton-manifest"}
    reports = {}
    for source, cache in caches.items():
        monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
        reports[source] = compile_children.start_children(
            tiny_checkpoint_dir, "bfloat16", 90, children=2,
            manifests=manifests if source == "manifest" else tmp_path / "none").wait()
    assert {source: report.source for source, report in reports.items()} == {"trace": "trace",
                                                                            "manifest": "manifest"}
    assert reports["manifest"].asked == reports["manifest"].compiled == reports["trace"].compiled
    entries = {source: _compiled(cache) for source, cache in caches.items()}
    assert set(entries["manifest"]) == set(entries["trace"]) and len(entries["trace"]) == reports["trace"].asked
    # the manifest's child imports no torch (what makes it start in a fraction of a traced child's time)
    probe = ("import sys; from gpu_worker.generation import card_compile, compile_child; "
             "compile_child.main(sys.argv[1:]); "
             "assert card_compile._CompileOnlyDriver(None).launcher_cls.__name__ == 'CudaLauncher'; "  # no driver made
             "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", probe, "--checkpoint", str(tiny_checkpoint_dir), "--dtype",
                          "bfloat16", "--capability", "90", "--manifests", str(manifests)],
                         env={key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
                         capture_output=True, text=True, timeout=300, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.strip().splitlines()
    assert out[-1] == "no torch" and json.loads(out[-2])["source"] == "manifest"
    # a manifest this Triton cannot bind (a call short of an argument) is not fatal: the child traces instead
    broken = json.loads(path.read_text())
    broken["calls"][0]["args"].pop()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / path.name).write_text(json.dumps(broken))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-broken"))
    fallback = compile_children.start_children(tiny_checkpoint_dir, "bfloat16", 90, children=1,
                                               manifests=tmp_path / "broken").wait()
    assert fallback.source == "trace" and fallback.compiled == fallback.asked == reports["trace"].asked


def test_the_shipped_kernel_manifest_is_the_published_checkpoints_frame_step_today(tmp_path):
    """The manifest shipped for the published 3B checkpoint in bf16 equals one recorded now: a change to
    the frame step's kernel calls that is not recorded fails here (`python -m
    gpu_worker.generation.kernel_manifest --write` records it). A checkpoint of the published configs finds it."""
    from gpu_worker.generation import kernel_manifest

    root = kernel_manifest.published_checkpoint_configs(tmp_path / "published")
    fresh = json.loads(_record_manifest()[-1])
    shipped = kernel_manifest.manifest_path(fresh["dims"])
    assert shipped.is_file(), f"no shipped manifest for the published checkpoint: {shipped}"
    assert json.loads(shipped.read_text()) == fresh, "stale: run python -m gpu_worker.generation.kernel_manifest --write"
    assert kernel_manifest.find_calls(root, kernel_manifest.SHIPPED_DTYPE) == fresh["calls"]
    assert {call["kernel"].rpartition(":")[2] for call in fresh["calls"]} == FRAME_STEP_KERNELS
    # what keys it: a config without every value, or other dimensions, finds no manifest
    config = next(root.glob("HeartMuLa-*/config.json"))
    config.write_text(json.dumps({**json.loads(config.read_text()), "audio_vocab_size": 4099}))
    assert kernel_manifest.find_calls(root, kernel_manifest.SHIPPED_DTYPE) is None
    config.write_text(json.dumps({"model_type": "heartmula"}))
    assert kernel_manifest.frame_dims(root, kernel_manifest.SHIPPED_DTYPE) is None


def test_the_warm_up_stamp_is_keyed_by_what_decides_the_kernels(tiny_checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert warmup_stamp.stamp_path(tiny_checkpoint_dir, "bfloat16", 90) is None  # no cache directory: no stamp
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    path = warmup_stamp.stamp_path(tiny_checkpoint_dir, "bfloat16", 90)
    assert path is not None and path.parent == tmp_path / "triton" / warmup_stamp.STAMP_FOLDER
    assert path == warmup_stamp.stamp_path(tiny_checkpoint_dir, "bfloat16", 90)
    others = {warmup_stamp.stamp_path(tiny_checkpoint_dir, "float16", 90),
              warmup_stamp.stamp_path(tiny_checkpoint_dir, "bfloat16", 100)}
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, copy)
    config = next(copy.glob("HeartMuLa-*/config.json"))
    config.write_text(json.dumps({**json.loads(config.read_text()), "audio_vocab_size": 4099}))
    others.add(warmup_stamp.stamp_path(copy, "bfloat16", 90))
    assert len(others) == 3 and path not in others
    warmup_stamp.write_stamp(path, {"compiled": 7})
    assert json.loads(path.read_text()) == {"compiled": 7} and list(path.parent.iterdir()) == [path]


def test_a_failed_warm_up_child_is_reported(tmp_path):
    from gpu_worker.generation import compile_children

    stamp = tmp_path / "stamp.json"
    children = compile_children.start_children(tmp_path / "no-checkpoint", "bfloat16", 90, children=2, stamp=stamp)
    try:
        children.wait()
        raise AssertionError("a child without a checkpoint succeeded")
    except RuntimeError as failed:
        assert "share 0/2" in str(failed) and "share 1/2" in str(failed)
    assert not stamp.exists()  # a failed warm-up leaves no stamp: the next start tries again
    assert [compile_children.child_count(cpus) for cpus in (1, 2, 4, 16, 64)] == [1, 1, 3, 10, 10]


def test_the_codec_warm_up_waits_for_the_first_song_and_not_for_the_kernels(monkeypatch):
    import threading

    from gpu_worker.generation import compile_children
    from gpu_worker.generation import engine as engine_module
    from gpu_worker.worker import batching

    kernels_may_finish, order = threading.Event(), []
    monkeypatch.setattr(compile_children, "should_compile", lambda settings: True)
    monkeypatch.setattr(batching, "_threads_mode", lambda: True)
    monkeypatch.setattr(codec_warmup, "should_warm", lambda *a: True)
    monkeypatch.setattr(codec_warmup, "FIRST_SONG_WAIT_S", 60.0)
    monkeypatch.setattr(codec_warmup, "warm_frame_kernels",
                        lambda settings: (kernels_may_finish.wait(30), order.append("kernels")))
    monkeypatch.setattr(codec_warmup, "warm_codec", lambda settings: order.append("codec"))
    engine_module.FIRST_SONG_ADMITTED.clear()
    thread = codec_warmup.start_background_warmup(Settings(device="cpu"))
    assert thread is not None
    thread.join(0.5)
    assert order == []  # no song yet: the codec waits (and the kernels are still compiling)
    engine_module.FIRST_SONG_ADMITTED.set()
    wait_until(lambda: order == ["codec"], 10, "the codec warm-up")  # while the kernels still compile
    assert thread.is_alive()  # the thread returned covers both warm-ups
    kernels_may_finish.set()
    thread.join(10)
    assert order == ["codec", "kernels"] and not thread.is_alive()


def test_an_engine_marks_the_first_song_admitted_for_the_codec_warm_up_to_wait_on(lm):
    from gpu_worker.generation import engine as engine_module
    from gpu_worker.generation.engine import GenerationEngine
    from tests.model_fixtures import tiny_params, tiny_prompts

    engine_module.FIRST_SONG_ADMITTED.clear()
    engine = GenerationEngine(lm.model, max_songs=2, cache_len=128)
    try:
        assert not engine_module.FIRST_SONG_ADMITTED.is_set()
        engine.submit(tiny_prompts(lm, 1)[0], tiny_params(2), 5).result(timeout=120)
        assert engine_module.FIRST_SONG_ADMITTED.is_set()
    finally:
        engine.shutdown()


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


_TRACE_TWO_SLOT_COUNTS = """
import json, sys, torch
from gpu_worker.generation import card_compile, kernel_warmup
from gpu_worker.model.heartmula import PRESETS
with card_compile.recording_only(90, lambda kernel, _args, _kwargs: kernel.fn.__name__) as recorded:
    kernel_warmup.meta_frame_step(PRESETS["3B"], torch.bfloat16, audio_eos_id=8193)
    one_slot = list(recorded)
    kernel_warmup.meta_frame_step(PRESETS["3B"], torch.bfloat16, audio_eos_id=8193, slots=int(sys.argv[1]))
print(json.dumps({"one slot": one_slot, "new with more slots": recorded[len(one_slot):]}))
"""


@pytest.mark.parametrize("slots", [2, 8])
def test_the_warm_up_traced_at_one_slot_asks_for_every_kernel_an_engine_of_more_slots_launches(slots):
    """The warm-up and the manifest trace a one-slot frame step; the worker's engine has `gpu_batch_slots`
    (16 rows for 8 songs). Triton specialises integer arguments (divisible by 16, equal to 1), so a row count
    the kernels were keyed by would compile new kernels at the worker's first frame. Traced one after the
    other for the card (in a process that compiles rather than interprets), the bigger engine must ask for
    no kernel the one-slot step did not."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TRACE_TWO_SLOT_COUNTS, str(slots)], env=env, capture_output=True,
                         text=True, timeout=300, check=True, cwd=Path(__file__).resolve().parent.parent)
    traced = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(traced["one slot"]) == FRAME_STEP_KERNELS
    assert traced["new with more slots"] == []
