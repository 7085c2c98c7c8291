"""The HeartMuLa module: published names and shapes, flavours, embeddings, caches, dtypes."""
from __future__ import annotations

import pytest
import torch

from gpu_worker.checkpoints.heartmula_checkpoint import TINY_FLAVORS, load_heartmula, write_tiny_heartmula
from gpu_worker.model.heartmula import (
    FLAVORS,
    PRESETS,
    FlavorError,
    HeartMuLa,
    HeartMuLaArgs,
    flavor_args,
    resolve_flavors,
)

VOCAB = 8197


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_heartmula(root, seed=1)
    return load_heartmula(root)


def meta_model(preset: str = "3B") -> HeartMuLa:
    with torch.device("meta"):
        return HeartMuLa(PRESETS[preset])


# ---- published names and shapes (spec §2.4) ----

def test_3b_has_289_tensors_and_3_938_113_536_parameters():
    state = meta_model().state_dict()
    assert len(state) == 289
    assert sum(t.numel() for t in state.values()) == 3_938_113_536


@pytest.mark.parametrize("name, shape", [
    ("backbone.layers.0.sa_norm.scale", [3072]),
    ("backbone.layers.27.attn.q_proj.weight", [3072, 3072]),
    ("backbone.layers.27.attn.k_proj.weight", [1024, 3072]),
    ("backbone.layers.27.attn.v_proj.weight", [1024, 3072]),
    ("backbone.layers.27.attn.output_proj.weight", [3072, 3072]),
    ("backbone.layers.27.mlp_norm.scale", [3072]),
    ("backbone.layers.27.mlp.w1.weight", [8192, 3072]),
    ("backbone.layers.27.mlp.w3.weight", [8192, 3072]),
    ("backbone.layers.27.mlp.w2.weight", [3072, 8192]),
    ("backbone.norm.scale", [3072]),
    ("decoder.layers.2.attn.k_proj.weight", [1536, 3072]),
    ("decoder.layers.2.attn.q_proj.weight", [3072, 3072]),
    ("decoder.norm.scale", [3072]),
    ("text_embeddings.weight", [128256, 3072]),
    ("audio_embeddings.weight", [65576, 3072]),
    ("unconditional_text_embedding.weight", [1, 3072]),
    ("projection.weight", [3072, 3072]),
    ("codebook0_head.weight", [8197, 3072]),
    ("audio_head", [7, 3072, 8197]),
    ("muq_linear.weight", [3072, 512]),
    ("muq_linear.bias", [3072]),
])
def test_3b_tensor_names_and_shapes_are_the_published_ones(name, shape):
    assert list(meta_model().state_dict()[name].shape) == shape


def test_3b_has_no_biases_inside_the_transformer_blocks():
    names = meta_model().state_dict()
    assert not [n for n in names if n.startswith(("backbone.", "decoder.")) and n.endswith(".bias")]


def test_caches_and_rope_tables_stay_out_of_the_state_dict(lm):
    before = set(lm.model.state_dict())
    lm.model.setup_caches(2)
    assert set(lm.model.state_dict()) == before


def test_kv_cache_holds_kv_heads_only():
    model = HeartMuLa(HeartMuLaArgs.from_flavors("tiny-backbone", "tiny-decoder", TINY_FLAVORS, text_vocab_size=384,
                                                 muq_dim=16))
    model.setup_caches(2)
    assert list(model.backbone.layers[0].attn.kv_cache.k_cache.shape) == [2, 2, 256, 8]
    assert list(model.decoder.layers[0].attn.kv_cache.v_cache.shape) == [2, 2, 8, 8]  # one slot per codebook


# ---- flavours (spec §2.1, §10) ----

def test_builtin_flavours_have_the_spec_head_dims():
    assert {name: f.head_dim for name, f in FLAVORS.items()} == {
        "llama-3B": 128, "llama-300M": 384, "llama-7B": 128, "llama-400M": 384}


def test_7b_preset_uses_the_7b_and_400m_flavours():
    assert PRESETS["7B"].backbone == FLAVORS["llama-7B"]
    assert PRESETS["7B"].decoder == FLAVORS["llama-400M"]


def test_unknown_flavour_is_an_error_listing_known_names():
    with pytest.raises(FlavorError, match="llama-3B.*llama-400M") as info:
        flavor_args("llama-1B", TINY_FLAVORS)
    assert "tiny-backbone" in str(info.value)


def test_custom_flavour_redefining_a_builtin_name_is_an_error():
    custom = {"llama-3B": dict(TINY_FLAVORS["tiny-backbone"])}
    with pytest.raises(FlavorError, match="redefines a built-in flavour.*llama-300M"):
        resolve_flavors(custom)


def test_custom_flavour_repeating_a_builtin_identically_is_accepted():
    same = {"num_layers": 28, "num_heads": 24, "num_kv_heads": 8, "embed_dim": 3072, "intermediate_dim": 8192,
            "max_seq_len": 8192}
    assert resolve_flavors({"llama-3B": same})["llama-3B"] == FLAVORS["llama-3B"]


def test_custom_flavour_with_an_unknown_field_is_an_error():
    bad = dict(TINY_FLAVORS["tiny-backbone"], rope_theta=10000)
    with pytest.raises(FlavorError, match="rope_theta"):
        resolve_flavors({"tiny": bad})


# ---- embeddings (spec §4.1) ----

def test_prompt_row_is_its_text_embedding_and_muq_slot_is_the_muq_bias(lm):
    model = lm.model
    tokens = torch.zeros(4, 9, dtype=torch.long)
    tokens[:, 8] = torch.tensor([256, 40, 0, 257])
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 8] = True
    with torch.inference_mode():
        h = model.embed_prompt(tokens, mask, muq_idx=2, batch_size=2)
    text = model.text_embeddings.weight
    null = model.unconditional_text_embedding.weight[0]
    assert torch.equal(h[0, [0, 1, 3]], text[[256, 40, 257]])
    assert torch.equal(h[0, 2], model.muq_linear.bias)
    assert torch.equal(h[1], null.expand(4, -1))  # the unconditional prompt: L copies of the null vector


def test_audio_frame_is_the_sum_of_its_8_code_embeddings_in_both_rows(lm):
    model = lm.model
    codes = torch.tensor([5, 0, 8191, 17, 3, 4000, 2, 8193], dtype=torch.int32)
    with torch.inference_mode():
        h = model.embed_frame(codes, batch_size=2)
    rows = model.audio_embeddings.weight[[k * VOCAB + int(c) for k, c in enumerate(codes)]]
    torch.testing.assert_close(h[0, 0], rows.sum(0))
    assert torch.equal(h[0], h[1])


# ---- runtime behaviour ----

def test_prefill_then_one_step_equals_one_pass_over_the_whole_sequence(lm):
    model = lm.model
    model.setup_caches(1)
    x = torch.randn(1, 9, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model.backbone(x, torch.arange(9), kv_len=9)[:, -1]
        model.backbone_step(x[:, :8], torch.arange(8), kv_len=8)
        stepped = model.backbone_step(x[:, 8:], torch.tensor([8]), kv_len=9)
    torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-6)


def test_static_shape_attention_over_all_slots_equals_filled_slots_only(lm):
    model = lm.model
    model.setup_caches(1)
    x = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        filled = model.backbone_step(x, torch.arange(5), kv_len=5)
        static = model.backbone_step(x, torch.arange(5), kv_len=None)
    torch.testing.assert_close(static, filled, rtol=1e-5, atol=1e-6)


def test_bf16_model_returns_fp32_hidden_states_and_logits(lm):
    model = HeartMuLa(lm.model.args)
    model.load_state_dict(lm.model.state_dict())
    model = model.to(torch.bfloat16)
    model.setup_caches(1)
    tokens = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, 8] = True
    with torch.inference_mode():
        last_h = model.backbone_step(model.embed_prompt(tokens, mask, 1, 1), torch.arange(3), kv_len=3)
        logits = model.codebook0_logits(last_h)
        audio_logits = model.decoder_first_logits(last_h, torch.tensor([3], dtype=torch.int32))
    assert last_h.dtype == logits.dtype == audio_logits.dtype == torch.float32
    assert model.backbone.layers[0].attn.kv_cache.k_cache.dtype == torch.bfloat16
