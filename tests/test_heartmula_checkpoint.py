"""Writing tiny HeartMuLa checkpoints and loading published-layout folders (spec §1, §10)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.checkpoints.checkpoint_files import INDEX_NAME, CheckpointError, WeightFiles
from gpu_worker.checkpoints.heartmula_checkpoint import (
    TINY_CONFIG,
    TINY_LM_FOLDER,
    heartmula_args_from_config,
    load_heartmula,
    tiny_state_dict,
    write_tiny_heartmula,
)
from tests.broken_checkpoints import BROKEN_MISSING, BROKEN_UNEXPECTED, BROKEN_WRONG_SHAPE, write_broken_heartmula_variants


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_heartmula(root, seed=0)
    return root


@pytest.fixture(scope="module")
def broken(tiny_root, tmp_path_factory):
    return write_broken_heartmula_variants(tiny_root, tmp_path_factory.mktemp("broken"))


@pytest.fixture
def editable_root(tiny_root, tmp_path):
    """A private copy whose config files a test may change."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_root, root)
    return root


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def lm_config(root):
    return root / TINY_LM_FOLDER / "config.json"


def load_file_all(files: WeightFiles) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in files.files:
        tensors.update(load_file(str(path)))
    return tensors


# ---- the tiny writer ----

def test_tiny_checkpoint_has_the_published_layout(tiny_root):
    assert sorted(p.name for p in tiny_root.iterdir()) == ["HeartMuLa-oss-3B", "gen_config.json", "tokenizer.json"]
    files = WeightFiles(tiny_root / TINY_LM_FOLDER)
    assert files.sharded and len(files.files) >= 2
    index = json.loads((tiny_root / TINY_LM_FOLDER / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_file_all(files).values())


def test_tiny_writer_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        write_tiny_heartmula(tmp_path / name, seed=seed)
    sums = {name: load_heartmula(tmp_path / name).checksums for name in "abc"}
    assert sums["a"] == sums["b"]
    shard = f"{TINY_LM_FOLDER}/model-00001-of-00002.safetensors"
    assert sums["a"][shard] != sums["c"][shard]


def test_tiny_init_uses_unit_norm_scales_and_small_matrices(tiny_root):
    state = load_heartmula(tiny_root).model.state_dict()
    assert torch.equal(state["backbone.norm.scale"], torch.ones(48))
    assert 0.015 < float(state["audio_embeddings.weight"].std()) < 0.025


# ---- loading ----

def test_round_trip_loads_every_tensor_exactly_as_written(tiny_root):
    loaded = load_heartmula(tiny_root)
    written = tiny_state_dict(heartmula_args_from_config(TINY_CONFIG, lm_config(tiny_root)), seed=0)
    state = loaded.model.state_dict()
    assert state.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name


def test_loader_returns_tokenizer_gen_config_config_and_checksums(tiny_root):
    loaded = load_heartmula(tiny_root)
    assert loaded.gen_config.text_bos_id == 256 and loaded.gen_config.audio_eos_id == 8193
    assert loaded.tokenizer.token_to_id("<|end_of_text|>") == 257
    assert loaded.config["backbone_flavor"] == "tiny-backbone"
    assert set(loaded.checksums) == {
        "HeartMuLa-oss-3B/config.json", "HeartMuLa-oss-3B/model.safetensors.index.json",
        "HeartMuLa-oss-3B/model-00001-of-00002.safetensors", "HeartMuLa-oss-3B/model-00002-of-00002.safetensors",
        "tokenizer.json", "gen_config.json"}
    assert all(len(digest) == 64 for digest in loaded.checksums.values())


def test_loader_casts_to_the_requested_dtype(tiny_root):
    model = load_heartmula(tiny_root, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_reference_causal_mask_buffers_are_ignored(editable_root):
    folder = editable_root / TINY_LM_FOLDER
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = index["weight_map"][BROKEN_MISSING]
    tensors = load_file(str(folder / shard))
    tensors["backbone_causal_mask"] = torch.ones(4, 4, dtype=torch.bool)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"]["backbone_causal_mask"] = shard
    (folder / INDEX_NAME).write_text(json.dumps(index))
    load_heartmula(editable_root)


def test_lm_folder_is_found_by_pattern_or_named(editable_root):
    shutil.copytree(editable_root / TINY_LM_FOLDER, editable_root / "HeartMuLa-oss-7B")
    with pytest.raises(CheckpointError, match="HeartMuLa-oss-3B.*HeartMuLa-oss-7B.*lm_folder"):
        load_heartmula(editable_root)
    assert load_heartmula(editable_root, lm_folder="HeartMuLa-oss-7B").checksums


# ---- broken weight files ----

def test_missing_tensor_is_named(broken):
    with pytest.raises(CheckpointError, match=rf"missing tensors.*\n.*{BROKEN_MISSING}"):
        load_heartmula(broken["missing_tensor"])


def test_unexpected_tensor_is_named(broken):
    with pytest.raises(CheckpointError, match=rf"unexpected tensors.*\n.*{BROKEN_UNEXPECTED}"):
        load_heartmula(broken["unexpected_tensor"])


def test_wrong_shape_names_tensor_expected_and_got(broken):
    with pytest.raises(CheckpointError, match=rf"{BROKEN_WRONG_SHAPE}: expected \[16, 32\] got \[24, 32\]"):
        load_heartmula(broken["wrong_shape"])


def test_index_pointing_at_a_missing_shard_names_the_shard(broken):
    with pytest.raises(CheckpointError, match=r"missing shard files.*\n.*model-00002-of-00002\.safetensors"):
        load_heartmula(broken["missing_shard"])


# ---- config.json ----

def test_missing_config_key_falls_back_to_3b_value_with_a_warning(editable_root, caplog):
    edit_json(lm_config(editable_root), lambda c: c.pop("model_type"))
    with caplog.at_level(logging.WARNING):
        load_heartmula(editable_root)
    assert "model_type" in caplog.text


def test_fallback_value_contradicted_by_tensors_is_reported(editable_root):
    edit_json(lm_config(editable_root), lambda c: c.pop("muq_dim"))
    with pytest.raises(CheckpointError, match=r"muq_dim = 512 implies muq_linear.weight dim 1 = 512, got \[48, 16\]"):
        load_heartmula(editable_root)


def test_wrong_audio_vocab_size_is_named_against_codebook0_head(editable_root):
    edit_json(lm_config(editable_root), lambda c: c.update(audio_vocab_size=8200))
    with pytest.raises(CheckpointError, match=r"audio_vocab_size = 8200 implies codebook0_head.weight dim 0"):
        load_heartmula(editable_root)


def test_wrong_layer_count_is_named_against_the_flavour(editable_root):
    edit_json(lm_config(editable_root), lambda c: c["flavors"]["tiny-backbone"].update(num_layers=3))
    with pytest.raises(CheckpointError, match="backbone_flavor = 'tiny-backbone' has 3 layers, the files hold 2"):
        load_heartmula(editable_root)


def test_unknown_flavour_lists_known_names(editable_root):
    edit_json(lm_config(editable_root), lambda c: c.update(decoder_flavor="tiny-decoderr"))
    with pytest.raises(CheckpointError, match=r"unknown flavour 'tiny-decoderr'.*llama-300M.*tiny-decoder"):
        load_heartmula(editable_root)


def test_flavour_redefining_a_builtin_name_is_refused(editable_root):
    edit_json(lm_config(editable_root), lambda c: c["flavors"].update({"llama-300M": c["flavors"]["tiny-decoder"]}))
    with pytest.raises(CheckpointError, match="llama-300M.*redefines"):
        load_heartmula(editable_root)


def test_wrong_model_type_is_refused(editable_root):
    edit_json(lm_config(editable_root), lambda c: c.update(model_type="heartcodec"))
    with pytest.raises(CheckpointError, match="model_type"):
        load_heartmula(editable_root)


# ---- gen_config.json ----

def test_gen_config_with_an_unknown_key_is_refused(editable_root):
    edit_json(editable_root / "gen_config.json", lambda g: g.update(audio_bos_id=8192))
    with pytest.raises(CheckpointError, match=r"unknown keys \['audio_bos_id'\]"):
        load_heartmula(editable_root)


def test_gen_config_with_a_missing_key_is_refused(editable_root):
    edit_json(editable_root / "gen_config.json", lambda g: g.pop("empty_id"))
    with pytest.raises(CheckpointError, match=r"missing keys \['empty_id'\]"):
        load_heartmula(editable_root)


def test_audio_eos_id_must_be_a_special_audio_id(editable_root):
    edit_json(editable_root / "gen_config.json", lambda g: g.update(audio_eos_id=100))
    with pytest.raises(CheckpointError, match="audio_eos_id = 100"):
        load_heartmula(editable_root)


def test_tiny_checkpoint_cannot_end_a_song_by_chance(tiny_root):
    state = load_heartmula(tiny_root).model.state_dict()
    assert not state["codebook0_head.weight"][8193].any() and not state["audio_head"][:, :, 8193].any()

