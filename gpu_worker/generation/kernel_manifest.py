"""The frame step's Triton kernel calls, recorded once, so that compiling them needs no torch (torch-free).

A kernel warm-up child that traces the frame step on the meta device spends most of its time in torch:
importing it, and running meta operations through PyTorch's Python reference kernels (bench/RESULTS.md).
Yet what it hands Triton for each kernel is small: which kernel, each argument's dtype and alignment or
its value, and the launch options. A manifest is that list for one set of model dimensions and LM dtype,
recorded by the same meta-device frame step (`record`). A child that finds the manifest for its
checkpoint calls each kernel with stand-ins of those arguments under `card_compile.compile_only`, so
Triton binds, specialises, keys and compiles exactly what the traced step would, with neither torch nor a
GPU (docs/streaming.md, "Cold start"). Where no manifest matches, the child traces as before.

The manifest of the published 3B checkpoint in bf16 ships in `kernel_manifests/`; a test re-records it
and fails when it is stale (`python -m gpu_worker.generation.kernel_manifest --write` records it again).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_worker.checkpoints.lm_layout import (
    CONFIG_DEFAULTS,
    CONFIG_NAME,
    GEN_CONFIG_NAME,
    LM_FOLDER_PATTERN,
    PUBLISHED_GEN_CONFIG,
)
from gpu_worker.model.model_flavors import FlavorError, flavor_args

MANIFEST_DIR = Path(__file__).with_name("kernel_manifests")
FORMAT = 1
# the config keys that decide the frame step's kernels; the text vocabulary does not (the warm-up model's is a token one)
_SIZE_KEYS = ("audio_vocab_size", "audio_num_codebooks", "muq_dim")
ALIGNMENT = 16  # Triton specialises a pointer on whether its address is a multiple of this


def frame_dims(checkpoint_root: Path, dtype: str) -> dict[str, Any] | None:
    """What decides the frame step's kernels for the LM under `checkpoint_root` in `dtype`: both stacks'
    dimensions (less their depth), the audio sizes and end-of-audio id. None where the configs do not name
    every value (the loader's defaults are not guessed here) or cannot be read: then no manifest is used."""
    folders = sorted(p for p in Path(checkpoint_root).glob(LM_FOLDER_PATTERN) if p.is_dir())
    try:
        if len(folders) != 1:
            return None
        config = json.loads((folders[0] / CONFIG_NAME).read_text())
        gen_config = json.loads((Path(checkpoint_root) / GEN_CONFIG_NAME).read_text())
        if not all(key in config for key in (*_SIZE_KEYS, "backbone_flavor", "decoder_flavor")):
            return None
        stacks = {stack: dataclasses.asdict(flavor_args(config[f"{stack}_flavor"], config.get("flavors")))
                  for stack in ("backbone", "decoder")}
        dims = {"dtype": dtype, "audio_eos_id": int(gen_config["audio_eos_id"]),
                **{key: int(config[key]) for key in _SIZE_KEYS}}
    except (OSError, ValueError, KeyError, TypeError, FlavorError):
        return None
    for stack, values in stacks.items():
        values.pop("num_layers")  # the warm-up model has one layer; the kernels never see the depth
        dims[stack] = values
    return dims


def manifest_path(dims: dict[str, Any], folder: Path = MANIFEST_DIR) -> Path:
    digest = hashlib.sha256(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


def find_calls(checkpoint_root: Path, dtype: str, folder: Path = MANIFEST_DIR) -> list[dict[str, Any]] | None:
    """The recorded kernel calls for this checkpoint and dtype, or None where no manifest matches."""
    dims = frame_dims(checkpoint_root, dtype)
    if dims is None:
        return None
    try:
        manifest = json.loads(manifest_path(dims, folder).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("dims") != dims:
        return None
    return list(manifest["calls"])


def describe(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One kernel call as JSON: the kernel's module and name, and each argument as Triton reads it."""
    return {"kernel": f"{kernel.module}:{kernel.fn.__name__}", "args": [_describe_value(a) for a in args],
            "kwargs": {name: _describe_value(value) for name, value in kwargs.items()}}


def _describe_value(value: Any) -> Any:
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):  # a tensor: Triton reads its dtype and alignment
        return {"pointer": str(value.dtype).rpartition(".")[2], "offset": value.data_ptr() % ALIGNMENT}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a kernel argument of type {type(value).__name__} cannot be recorded")


class _DType:
    """A dtype as Triton reads one: by its name (`str(torch.bfloat16)` is "torch.bfloat16"). One object per
    name, kept for the process: Triton caches what it read of a dtype by the object, as it may for torch's."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"


_DTYPES: dict[str, _DType] = {}


class _Pointer:
    """A stand-in for a tensor argument: its dtype and its address's offset from the alignment."""

    def __init__(self, dtype: str, offset: int):
        self.dtype, self._offset = _DTYPES.setdefault(dtype, _DType(dtype)), offset

    def data_ptr(self) -> int:
        return self._offset


def _stand_in(value: Any) -> Any:
    return _Pointer(value["pointer"], value["offset"]) if isinstance(value, dict) else value


def replay(calls: Sequence[dict[str, Any]]) -> None:
    """Call each recorded kernel with stand-ins of its arguments (inside `card_compile.compile_only`: each is
    compiled, or skipped as another child's share, and none is launched)."""
    for call in calls:
        module, _, name = call["kernel"].partition(":")
        kernel = getattr(importlib.import_module(module), name)
        kernel[(1,)](*[_stand_in(a) for a in call["args"]],
                     **{key: _stand_in(value) for key, value in call["kwargs"].items()})


def record(checkpoint_root: Path, dtype: str, capability: int = 90) -> dict[str, Any]:
    """The manifest for the LM under `checkpoint_root` in `dtype`: one meta-device frame step (torch), with
    the first call of each distinct kernel described. Run it where Triton compiles rather than interprets
    (no TRITON_INTERPRET when the kernels were imported): `main` does. `capability` only chooses the target
    Triton binds for; the calls are the same for every CUDA card."""
    from gpu_worker.generation import card_compile
    from gpu_worker.generation.kernel_warmup import trace_frame_step

    dims = frame_dims(checkpoint_root, dtype)
    if dims is None:
        raise ValueError(f"{checkpoint_root}: its configs do not name every value a manifest is keyed by")
    with card_compile.recording_only(capability, describe) as calls:
        trace_frame_step(checkpoint_root, dtype)  # the very step a tracing child runs
    return {"format": FORMAT, "dims": dims, "calls": calls}


def write_manifest(manifest: dict[str, Any], folder: Path = MANIFEST_DIR) -> Path:
    path = manifest_path(manifest["dims"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def published_checkpoint_configs(root: Path) -> Path:
    """Write the published 3B checkpoint's two configs (spec sections 1.2 and 1.4; no weights) under `root`:
    what the shipped manifest is recorded from."""
    folder = root / "HeartMuLa-oss-3B"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(CONFIG_DEFAULTS))
    (root / GEN_CONFIG_NAME).write_text(json.dumps(PUBLISHED_GEN_CONFIG))
    return root


SHIPPED_DTYPE = "bfloat16"  # the LM dtype a CUDA worker runs by default (SONGPIPE_LM_DTYPE=auto)


def main(argv: Sequence[str] | None = None) -> None:
    import os
    import tempfile

    parser = argparse.ArgumentParser(description="record the frame step's kernel manifest of a checkpoint "
                                     "(default: the published 3B one's configs) and print or write it")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint root (default: the published configs)")
    parser.add_argument("--dtype", default=SHIPPED_DTYPE, choices=("bfloat16", "float16"))
    parser.add_argument("--write", type=Path, nargs="?", const=MANIFEST_DIR, metavar="FOLDER",
                        help=f"write it into FOLDER (default {MANIFEST_DIR}) instead of printing it")
    opts = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels record as compiled for a card, not interpreted
    with tempfile.TemporaryDirectory() as tmp:
        root = opts.checkpoint or published_checkpoint_configs(Path(tmp))
        manifest = record(root, opts.dtype)
    if opts.write is not None:
        print(write_manifest(manifest, opts.write))
    else:
        print(json.dumps(manifest, sort_keys=True))


if __name__ == "__main__":
    main()
