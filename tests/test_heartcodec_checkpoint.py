"""HeartCodec-oss loader and tiny checkpoint writer (model-spec §1.5, §7.1, §10)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu_worker.checkpoints.checkpoint_files import INDEX_NAME, SINGLE_NAME, CheckpointError, WeightFiles, write_state_dict
from gpu_worker.checkpoints.heartcodec_checkpoint import (
    CODEC_FOLDER,
    fold_weight_norm,
    load_heartcodec,
    write_tiny_heartcodec,
)
from tests.broken_checkpoints import BROKEN_VARIANT_TENSORS, write_broken_heartcodec_variants


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("codec")
    write_tiny_heartcodec(base / "sharded", seed=0, layout="sharded")
    write_tiny_heartcodec(base / "single", seed=0, layout="single")
    return {"sharded": base / "sharded", "single": base / "single", "base": base}


@pytest.fixture(scope="module")
def broken(roots: dict[str, Path]) -> dict[str, Path]:
    return write_broken_heartcodec_variants(roots["sharded"], roots["base"] / "broken")


@pytest.fixture(scope="module")
def loaded(roots: dict[str, Path]):
    return {layout: load_heartcodec(roots[layout]) for layout in ("sharded", "single")}


def _files(root: Path) -> WeightFiles:
    return WeightFiles(root / CODEC_FOLDER)


def test_sharded_layout_has_two_shards_an_index_and_parametrization_names(roots):
    folder = roots["sharded"] / CODEC_FOLDER
    assert (folder / INDEX_NAME).exists() and not (folder / SINGLE_NAME).exists()
    files = _files(roots["sharded"])
    assert len(files.files) >= 2
    assert files.tensors["scalar_model.decoder.0.parametrizations.weight.original0"].shape == (128, 1, 1)
    assert files.tensors["flow_matching.vq_embed.layers.0._codebook.initted"].shape == (1,)
    assert not any(name.endswith("weight_g") for name in files.tensors)


def test_single_layout_uses_legacy_weight_norm_names_and_scalar_initted(roots):
    folder = roots["single"] / CODEC_FOLDER
    assert (folder / SINGLE_NAME).exists() and not (folder / INDEX_NAME).exists()
    files = _files(roots["single"])
    assert files.tensors["scalar_model.decoder.0.weight_g"].shape == (128, 1, 1)
    assert files.tensors["flow_matching.vq_embed.layers.0._codebook.initted"].shape == ()
    assert not any("parametrizations" in name for name in files.tensors)


def test_both_layouts_include_the_ignorable_tensors(roots):
    for layout in ("sharded", "single"):
        names = set(_files(roots[layout]).tensors)
        assert "flow_matching.vq_embed.project_in.weight" in names
        assert "flow_matching.vq_embed.layers.7._codebook.embed_avg" in names
        assert "flow_matching.vq_embed.layers.7._codebook.cluster_size" in names
        assert any(name.startswith("scalar_model.encoder.") for name in names)


def test_both_layouts_load_identical_folded_weights(loaded):
    sharded, single = loaded["sharded"].model.state_dict(), loaded["single"].model.state_dict()
    assert sharded.keys() == single.keys()
    for name in sharded:
        assert torch.equal(sharded[name], single[name]), name


def test_loaded_model_holds_plain_weights_with_published_names(loaded):
    state = loaded["sharded"].model.state_dict()
    assert state["flow_matching.vq_embed.layers.3._codebook.embed"].shape == (1, 8192, 8)
    assert "scalar_model.decoder.0.weight" in state
    assert not any("weight_g" in n or "parametrizations" in n or "encoder" in n for n in state)
    assert "flow_matching.zero_cond_embedding1" in state


def test_round_trip_gives_the_written_tensors_with_weight_norm_folded(roots, loaded):
    files = _files(roots["sharded"])
    state = loaded["sharded"].model.state_dict()
    for layer in loaded["sharded"].model.weight_norm_layers():
        g = files.load(f"{layer}.parametrizations.weight.original0")
        v = files.load(f"{layer}.parametrizations.weight.original1")
        norm = torch.sqrt((v.double() ** 2).sum(dim=tuple(range(1, v.dim())), keepdim=True))
        expected = (g.double() * v.double() / norm).float()
        torch.testing.assert_close(state[f"{layer}.weight"], expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(state[f"{layer}.weight"], v, rtol=1e-5, atol=0)  # written with g = ||v||
    for name, tensor in state.items():
        if name in files.tensors:
            assert torch.equal(tensor, files.load(name)), name


def test_conv_transpose_weight_norm_is_per_input_channel(roots):
    files = _files(roots["sharded"])
    layer = "scalar_model.decoder.1.up_conv.layer"
    g = files.tensors[f"{layer}.parametrizations.weight.original0"]
    v = files.tensors[f"{layer}.parametrizations.weight.original1"]
    assert g.shape == (v.shape[0], 1, 1) and v.shape == (128, 64, 10)  # [Cin, Cout, 2s]


def test_fold_weight_norm_scales_each_dim0_slice_to_norm_g():
    v = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])  # two dim-0 slices with norms 5 and 1
    g = torch.tensor([[[10.0]], [[2.0]]])
    assert torch.equal(fold_weight_norm(g, v), torch.tensor([[[6.0, 8.0]], [[2.0, 0.0]]]))


def test_bf16_load_folds_in_fp32_then_casts(roots, loaded):
    bf16 = load_heartcodec(roots["sharded"], dtype=torch.bfloat16).model.state_dict()
    for name, tensor in loaded["sharded"].model.state_dict().items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name


def test_half_precision_files_are_accepted(roots, tmp_path):
    files = _files(roots["single"])
    half = {name: files.load(name, dtype=torch.float16) for name in files.tensors}
    (tmp_path / CODEC_FOLDER).mkdir()
    (tmp_path / CODEC_FOLDER / "config.json").write_text((roots["single"] / CODEC_FOLDER / "config.json").read_text())
    write_state_dict(tmp_path / CODEC_FOLDER, half)
    model = load_heartcodec(tmp_path).model
    assert model.dtype == torch.float32


def test_checksums_name_every_file_of_the_codec_folder(roots, loaded):
    checksums = loaded["sharded"].checksums
    folder = roots["sharded"] / CODEC_FOLDER
    assert set(checksums) == {f"{CODEC_FOLDER}/{p.name}" for p in folder.iterdir()}
    assert all(len(digest) == 64 for digest in checksums.values())


def test_writer_is_deterministic_in_the_seed(roots, tmp_path):
    write_tiny_heartcodec(tmp_path / "again", seed=0, layout="single")
    write_tiny_heartcodec(tmp_path / "other", seed=1, layout="single")
    digest = lambda root: load_heartcodec(root).checksums[f"{CODEC_FOLDER}/{SINGLE_NAME}"]  # noqa: E731
    assert digest(tmp_path / "again") == digest(roots["single"])
    assert digest(tmp_path / "other") != digest(roots["single"])


@pytest.mark.parametrize("variant, expected_text", [
    ("both_weight_norm_conventions", "weight-norm conflicts"),
    ("half_weight_norm_pair", "half a weight-norm pair"),
    ("wrong_shape", "expected [32, 8] got [8, 32]"),
    ("missing_tensor", "missing tensors"),
    ("unexpected_tensor", "unexpected tensors"),
    ("missing_shard", "missing shard files"),
])
def test_broken_variant_raises_checkpoint_error_naming_the_tensor(broken, variant, expected_text):
    with pytest.raises(CheckpointError) as info:
        load_heartcodec(broken[variant])
    message = str(info.value)
    assert BROKEN_VARIANT_TENSORS[variant] in message
    assert expected_text in message
    assert str(broken[variant] / CODEC_FOLDER) in message


def test_one_error_lists_every_problem(roots, tmp_path):
    files = _files(roots["single"])
    tensors = {name: files.load(name) for name in files.tensors}
    del tensors["flow_matching.cond_feature_emb.bias"]
    tensors["flow_matching.estimator.proj_in.ffn_2.bias"] = torch.zeros(3)
    tensors["scalar_model.decoder.3.up_conv.layer.parametrizations.weight.original0"] = torch.ones(32, 1, 1)
    folder = tmp_path / CODEC_FOLDER
    write_state_dict(folder, tensors)
    (folder / "config.json").write_text((roots["single"] / CODEC_FOLDER / "config.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_heartcodec(tmp_path)
    message = str(info.value)
    assert "flow_matching.cond_feature_emb.bias: expected [32]" in message
    assert "flow_matching.estimator.proj_in.ffn_2.bias: expected [16] got [3]" in message
    assert "scalar_model.decoder.3.up_conv.layer: both" in message


def test_unsupported_config_value_in_config_json_is_rejected_naming_the_key(roots, tmp_path):
    source = roots["single"] / CODEC_FOLDER
    folder = tmp_path / CODEC_FOLDER
    folder.mkdir()
    (folder / SINGLE_NAME).write_bytes((source / SINGLE_NAME).read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["use_cosine_sim"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_cosine_sim"):
        load_heartcodec(tmp_path)


def test_config_contradicted_by_tensor_shapes_is_reported_as_shape_mismatch(roots, tmp_path):
    source = roots["single"] / CODEC_FOLDER
    folder = tmp_path / CODEC_FOLDER
    folder.mkdir()
    (folder / SINGLE_NAME).write_bytes((source / SINGLE_NAME).read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["codebook_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"_codebook\.embed: expected \[1, 8192, 16\] got \[1, 8192, 8\]"):
        load_heartcodec(tmp_path)


def test_missing_codec_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / CODEC_FOLDER)):
        load_heartcodec(tmp_path)
