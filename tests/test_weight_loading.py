"""How weights are read from safetensors files: memory-mapped loads equal safetensors' own, bit for bit, and
building a model on the meta device runs no initialiser (and so never imports TorchDynamo)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpu_worker.checkpoints.checkpoint_files import WeightFiles, write_state_dict
from gpu_worker.model.meta_build import meta_modules


@pytest.mark.parametrize("shards", [1, 3])
def test_mapped_loads_equal_safetensors_own_for_every_dtype_and_cast(tmp_path, shards):
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(300, 70, generator=gen), "half": torch.randn(5, generator=gen).to(torch.bfloat16),
               "ids": torch.arange(10), "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5),
               "f16": torch.randn(4, 4, generator=gen).half()}
    write_state_dict(tmp_path, tensors, shards=shards)
    files = WeightFiles(tmp_path)
    for dtype in (None, torch.bfloat16, torch.float32):
        mapped = files.load_many(tensors, dtype=dtype, threads=3)
        assert set(mapped) == set(tensors)
        for name in tensors:
            one = files.load(name, dtype=dtype)
            assert (mapped[name].dtype, mapped[name].shape) == (one.dtype, one.shape)
            assert torch.equal(mapped[name], one), (name, dtype)
    assert mapped["ids"].dtype == torch.int64  # integers are never cast


def test_mapped_tensors_do_not_keep_the_file_mapped(tmp_path):
    write_state_dict(tmp_path, {"w": torch.ones(8, 8)})
    loaded = WeightFiles(tmp_path).load_many(["w"])["w"]
    (tmp_path / "model.safetensors").unlink()  # the tensor owns its memory: nothing points into the file
    loaded += 1
    assert torch.equal(loaded, torch.full((8, 8), 2.0))


def test_meta_modules_skips_initialisers_for_meta_tensors_only():
    with meta_modules():
        meta = nn.Linear(16, 8)
        real = nn.Linear(16, 8, device="cpu")  # another thread's real module meanwhile: initialised as always
    assert meta.weight.is_meta
    assert real.weight.abs().sum() > 0 and real.bias.abs().sum() > 0
    assert nn.init.uniform_.__name__ == "uniform_" and not hasattr(nn.init.uniform_, "__wrapped__")  # restored


def test_building_heartmula_on_the_meta_device_does_not_import_torchdynamo():
    probe = ("import sys; from gpu_worker.model.meta_build import meta_modules; "
             "from gpu_worker.model.heartmula import HeartMuLa, PRESETS\n"
             "with meta_modules(): HeartMuLa(PRESETS['3B'])\n"
             "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert out[-1] == "False"
