"""Checkpoints with one defect each, written from a tiny one: what the loaders must refuse, naming the defect.

Test-only writers (they were in gpu_worker/checkpoints/); tests/test_heartmula_checkpoint.py and
tests/test_heartcodec_checkpoint.py use them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpu_worker.checkpoints.checkpoint_files import INDEX_NAME, WeightFiles, write_state_dict
from gpu_worker.checkpoints.heartcodec_checkpoint import CODEC_FOLDER, CONFIG_NAME, PARAMETRIZATION_NAMES
from gpu_worker.checkpoints.heartmula_checkpoint import find_lm_folder

BROKEN_MISSING = "backbone.layers.1.mlp.w2.weight"
BROKEN_UNEXPECTED = "backbone.layers.0.attn.extra_proj.weight"
BROKEN_WRONG_SHAPE = "decoder.layers.0.attn.k_proj.weight"


def _edit_shard_holding(folder: Path, name: str, edit) -> None:
    """Apply `edit(tensors: dict)` to the shard that holds `name` and keep the index in step."""
    index_path = folder / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(str(folder / shard))
    edit(tensors)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard}
    index["weight_map"].update({n: shard for n in tensors})
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def write_broken_heartmula_variants(base_root: Path | str, out_dir: Path | str) -> dict[str, Path]:
    """Full copies of a (tiny) ckpt_root, each with one defect, keyed by the defect's name."""
    base_root, out_dir = Path(base_root), Path(out_dir)
    variants: dict[str, Path] = {}

    def copy(kind: str) -> Path:
        root = out_dir / kind
        shutil.copytree(base_root, root)
        variants[kind] = root
        return find_lm_folder(root)

    copy_folder = copy("missing_tensor")
    _edit_shard_holding(copy_folder, BROKEN_MISSING, lambda t: t.pop(BROKEN_MISSING))

    copy_folder = copy("unexpected_tensor")  # added to whichever shard holds an existing tensor
    _edit_shard_holding(copy_folder, BROKEN_MISSING,
                        lambda t: t.__setitem__(BROKEN_UNEXPECTED, torch.zeros(4, 4)))

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        rows, cols = tensors[BROKEN_WRONG_SHAPE].shape
        tensors[BROKEN_WRONG_SHAPE] = torch.zeros(rows + 8, cols)

    copy_folder = copy("wrong_shape")
    _edit_shard_holding(copy_folder, BROKEN_WRONG_SHAPE, reshape)

    copy_folder = copy("missing_shard")
    index = json.loads((copy_folder / INDEX_NAME).read_text())
    (copy_folder / sorted(set(index["weight_map"].values()))[-1]).unlink()
    return variants


# The tensor each broken variant breaks, so tests can check that the error names it.
BROKEN_VARIANT_TENSORS = {
    "both_weight_norm_conventions": "scalar_model.decoder.0",
    "half_weight_norm_pair": "scalar_model.decoder.7.parametrizations.weight.original0",
    "wrong_shape": "flow_matching.vq_embed.project_out.weight",
    "missing_tensor": "flow_matching.zero_cond_embedding1",
    "unexpected_tensor": "flow_matching.estimator.extra_head.weight",
    "missing_shard": "model-00002-of-00002.safetensors",
}


def write_broken_heartcodec_variants(base_root: Path, out_dir: Path) -> dict[str, Path]:
    """Copies of a tiny checkpoint root with one defect each; returns variant name -> checkpoint root.

    The half pair keeps `original1` of decoder.7 and drops its `original0`; the wrong shape stores
    project_out transposed; "missing_shard" deletes a shard that the index still names.
    """
    base = Path(base_root) / CODEC_FOLDER
    files = WeightFiles(base)
    tensors = {name: files.load(name) for name in files.tensors}
    shards = 2 if files.sharded else 1
    names = BROKEN_VARIANT_TENSORS
    g_name, v_name = (f"{names['both_weight_norm_conventions']}.{s}" for s in PARAMETRIZATION_NAMES)
    if g_name not in tensors:
        raise ValueError(f"{base}: expected the parametrizations layout (write it with layout='sharded')")

    both = dict(tensors)
    both[f"{names['both_weight_norm_conventions']}.weight_g"] = tensors[g_name]
    both[f"{names['both_weight_norm_conventions']}.weight_v"] = tensors[v_name]
    half = {k: t for k, t in tensors.items() if k != names["half_weight_norm_pair"]}
    wrong = dict(tensors)
    wrong[names["wrong_shape"]] = tensors[names["wrong_shape"]].t().contiguous()
    missing = {k: t for k, t in tensors.items() if k != names["missing_tensor"]}
    unexpected = dict(tensors)
    unexpected[names["unexpected_tensor"]] = torch.zeros(2, 2)
    variants = {"both_weight_norm_conventions": both, "half_weight_norm_pair": half, "wrong_shape": wrong,
                "missing_tensor": missing, "unexpected_tensor": unexpected, "missing_shard": tensors}

    roots: dict[str, Path] = {}
    for variant, state in variants.items():
        root = Path(out_dir) / variant
        folder = root / CODEC_FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        shutil.copyfile(base / CONFIG_NAME, folder / CONFIG_NAME)
        write_state_dict(folder, state, shards=2 if variant == "missing_shard" else shards)
        if variant == "missing_shard":
            (folder / names["missing_shard"]).unlink()
        roots[variant] = root
    return roots
