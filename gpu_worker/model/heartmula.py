"""HeartMuLa: a two-level autoregressive music token LM in plain PyTorch (spec §2, §4).

A Llama-shaped backbone (no vocabulary: its inputs are summed embeddings) predicts codebook 0 of
each 12.5 Hz frame; a small local decoder predicts codebooks 1..7 of that frame one after another.
Parameter names match the published state dict exactly (spec §2.4), so `load_state_dict` needs no
renaming. Key/value caches and RoPE tables are runtime state, created by `setup_caches`, and never
appear in the state dict; neither do the fused q|k|v and w1|w3 weights that the block reads (made when a
checkpoint loads, or on first use; see gpu_worker/model/transformer_block.py, the one block of every path).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

# the flavour table is torch-free so the web tier can read context lengths; re-exported here
from gpu_worker.model.model_flavors import FLAVORS, FlavorError, TransformerArgs, flavor_args, resolve_flavors  # noqa: F401
from gpu_worker.model.transformer_block import (
    EAGER_OPS,
    compute_dtype,
    eager_attention,
    fuse_block_,
    fuse_projections_,
    rms_norm,
    transformer_block,
)

# Llama-3.1 RoPE scaling constants, shared by every flavour (spec §2.1).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_OLD_CONTEXT_LEN = 8192


@dataclass(frozen=True)
class HeartMuLaArgs:
    backbone: TransformerArgs
    decoder: TransformerArgs
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 8197
    audio_num_codebooks: int = 8
    muq_dim: int = 512

    def __post_init__(self) -> None:
        if self.decoder.max_seq_len < self.audio_num_codebooks:
            raise FlavorError(
                f"decoder max_seq_len {self.decoder.max_seq_len} < audio_num_codebooks {self.audio_num_codebooks}: "
                "the decoder needs one position per codebook")

    @classmethod
    def from_flavors(cls, backbone_flavor: str, decoder_flavor: str,
                     custom: Mapping[str, Mapping[str, Any]] | None = None, **sizes: int) -> HeartMuLaArgs:
        return cls(backbone=flavor_args(backbone_flavor, custom), decoder=flavor_args(decoder_flavor, custom), **sizes)


PRESETS: dict[str, HeartMuLaArgs] = {
    "3B": HeartMuLaArgs.from_flavors("llama-3B", "llama-300M"),
    "7B": HeartMuLaArgs.from_flavors("llama-7B", "llama-400M"),
}


def precompute_freqs_cis(head_dim: int, max_seq_len: int, *, base: float = 500_000.0,
                         scale_factor: float = 32.0, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin table `[max_seq_len, head_dim/2, 2]` of Llama-3.1-scaled RoPE (spec §2.3)."""
    if device is not None and torch.device(device).type == "meta":
        # shapes only (the kernel warm-up): arange on meta runs PyTorch's Python references, slow to import
        return torch.empty(max_seq_len, head_dim // 2, 2, dtype=dtype, device=device)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
    wavelen = 2 * math.pi / freqs
    high_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR
    low_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR
    smooth = (ROPE_OLD_CONTEXT_LEN / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    smoothed = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen < high_freq_wavelen, freqs,
                         torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, smoothed))
    angles = torch.outer(torch.arange(max_seq_len, dtype=dtype, device=device), scaled)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of `x [B, S, H, hd]` by the angles of `freqs_cis [S, hd/2, 2]`."""
    pairs = x.to(freqs_cis.dtype).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = freqs_cis[None, :, None, :, 0]
    sin = freqs_cis[None, :, None, :, 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class KVCache(nn.Module):
    """Static preallocated keys/values `[B, kv_heads, max_seq_len, head_dim]` (KV heads only, not expanded)."""

    k_cache: torch.Tensor  # buffers (register_buffer), typed for the checker
    v_cache: torch.Tensor

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v [B, KV, S, hd]` at `input_pos [S]`; return the whole cache."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    """The attention's parameters, named as published; `fused_qkv` is q|k|v as one tensor (`fuse_block_`)."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.q_proj = nn.Linear(args.embed_dim, args.num_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.embed_dim, args.num_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.embed_dim, args.num_kv_heads * args.head_dim, bias=False)
        self.output_proj = nn.Linear(args.num_heads * args.head_dim, args.embed_dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.fused_qkv: torch.Tensor | None = None  # runtime state, outside the state dict


class FeedForward(nn.Module):
    """SwiGLU's parameters: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down; `fused_w13` is w1|w3."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.w1 = nn.Linear(args.embed_dim, args.intermediate_dim, bias=False)
        self.w3 = nn.Linear(args.embed_dim, args.intermediate_dim, bias=False)
        self.w2 = nn.Linear(args.intermediate_dim, args.embed_dim, bias=False)
        self.fused_w13: torch.Tensor | None = None


class TransformerBlock(nn.Module):
    """The plain path's block: `transformer_block` with the eager ops over this layer's KV cache."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.sa_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor,
                kv_len: int | None, mask: torch.Tensor | None) -> torch.Tensor:
        cache = self.attn.kv_cache
        if cache is None:
            raise RuntimeError("call setup_caches() before running the transformer")

        def write_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = cache.update(input_pos, k, v)
            if kv_len is None:  # every slot, behind the mask: static shapes
                return keys, values
            return keys[:, :, :kv_len], values[:, :, :kv_len]  # the filled slots only

        attend = partial(eager_attention, args=self.args, rope=partial(apply_rotary_emb, freqs_cis=freqs_cis),
                         write_kv=write_kv, mask=mask)
        return transformer_block(x, fuse_block_(self), self.args, EAGER_OPS, attend)


class Transformer(nn.Module):
    """Pre-norm Llama stack without token embedding or output projection."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.freqs_cis: torch.Tensor | None = None

    def setup_rope(self, *, dtype: torch.dtype, device: torch.device) -> None:
        """RoPE tables only: the fast path keeps its own KV buffers and must not pay for these caches."""
        self.freqs_cis = precompute_freqs_cis(
            self.args.head_dim, self.args.max_seq_len, base=self.args.rope_base,
            scale_factor=self.args.rope_scale_factor, dtype=compute_dtype(dtype), device=device)

    def setup_caches(self, batch_size: int, cache_len: int, *, dtype: torch.dtype, device: torch.device) -> None:
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            layer.attn.kv_cache = KVCache(batch_size, cache_len, self.args.num_kv_heads, self.args.head_dim,
                                          dtype=dtype, device=device)
        self.setup_rope(dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """`x [B, S, D]` at positions `input_pos [S]` -> final-norm output `[B, S, D]` in fp32 (or float64).

        `kv_len` = last input position + 1 attends over the filled cache slots only; None attends
        over every slot behind a mask (static shapes, for graph capture).
        """
        if self.freqs_cis is None:
            raise RuntimeError("call setup_caches() before running the transformer")
        freqs_cis = self.freqs_cis[input_pos]
        mask = self.attention_mask(input_pos, kv_len)
        for layer in self.layers:
            x = layer(x, freqs_cis, input_pos, kv_len, mask)
        return self.norm(x).to(compute_dtype(x.dtype))

    def attention_mask(self, input_pos: torch.Tensor, kv_len: int | None) -> torch.Tensor | None:
        """Causal mask `[group * S, slots]` in the folded-GQA query layout of `eager_attention`, built once per call."""
        if kv_len is not None and input_pos.shape[0] == 1:
            return None  # one query at the last filled position sees every filled slot
        slots = kv_len if kv_len is not None else self._cache_slots()
        causal = torch.arange(slots, device=input_pos.device)[None, :] <= input_pos[:, None]  # [S, slots]
        return causal.repeat(self.args.num_heads // self.args.num_kv_heads, 1)

    def _cache_slots(self) -> int:
        first = self.layers[0]
        assert isinstance(first, TransformerBlock)
        if first.attn.kv_cache is None:
            raise RuntimeError("call setup_caches() before running the transformer")
        return first.attn.kv_cache.k_cache.shape[2]


class HeartMuLa(nn.Module):
    """Backbone + local decoder + embeddings and heads, named as in the published state dict."""

    def __init__(self, args: HeartMuLaArgs):
        super().__init__()
        self.args = args
        width, dec_width, vocab = args.backbone.embed_dim, args.decoder.embed_dim, args.audio_vocab_size
        self.backbone = Transformer(args.backbone)
        self.decoder = Transformer(args.decoder)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, width)
        # one table for all codebooks: codebook k, id t -> row k * audio_vocab_size + t
        self.audio_embeddings = nn.Embedding(vocab * args.audio_num_codebooks, width)
        self.unconditional_text_embedding = nn.Embedding(1, width)
        self.projection = nn.Linear(width, dec_width, bias=False)
        self.codebook0_head = nn.Linear(width, vocab, bias=False)
        self.audio_head = nn.Parameter(torch.empty(args.audio_num_codebooks - 1, dec_width, vocab))
        self.muq_linear = nn.Linear(args.muq_dim, width)
        self.cache_batch_size: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook0_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.codebook0_head.weight.device

    def setup_caches(self, batch_size: int) -> None:
        """Allocate KV caches for `batch_size` rows (2 with CFG); a no-op when they already exist."""
        if self.cache_batch_size == batch_size:
            return
        self.backbone.setup_caches(batch_size, self.args.backbone.max_seq_len, dtype=self.dtype, device=self.device)
        # the decoder only ever holds one frame: one position per codebook
        self.decoder.setup_caches(batch_size, self.args.audio_num_codebooks, dtype=self.dtype, device=self.device)
        self.cache_batch_size = batch_size

    def fuse_projections(self) -> None:
        """q|k|v and w1|w3 of every block as one tensor each (`fuse_block_`), as a checkpoint load does;
        a block still fuses on first use where this was not called, or after `to(...)`."""
        for stack in (self.backbone, self.decoder):
            fuse_projections_(stack)

    def setup_rope(self) -> None:
        """RoPE tables of both transformers without any KV cache (idempotent)."""
        for stack in (self.backbone, self.decoder):
            if stack.freqs_cis is None:
                stack.setup_rope(dtype=self.dtype, device=self.device)

    def embed_grid(self, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Masked sum of the 9 column embeddings of `tokens [S, 9]` -> `[batch_size, S, D]` (spec §4.1).

        Row 0 is conditional; row 1 (CFG) sees `unconditional_text_embedding` in place of every text
        embedding, and the same audio embeddings.
        """
        num_codebooks = self.args.audio_num_codebooks
        offsets = torch.arange(num_codebooks, device=tokens.device) * self.args.audio_vocab_size
        audio = self.audio_embeddings(tokens[:, :num_codebooks] + offsets)  # [S, 8, D]
        text = self.text_embeddings(tokens[:, num_codebooks:])  # [S, 1, D]
        rows = [torch.cat([audio, text], dim=1)]
        if batch_size == 2:
            null_text = self.unconditional_text_embedding.weight.expand_as(text)
            rows.append(torch.cat([audio, null_text], dim=1))
        embeds = torch.stack(rows)  # [B, S, 9, D]
        return (embeds * mask[None, :, :, None].to(embeds.dtype)).sum(dim=2)

    def embed_prompt(self, tokens: torch.Tensor, mask: torch.Tensor, muq_idx: int, batch_size: int) -> torch.Tensor:
        """Prompt embeddings with the MuQ slot filled: `muq_linear(zeros)` = its bias when conditional,
        the null text vector when unconditional (no reference audio is ever supplied)."""
        h = self.embed_grid(tokens, mask, batch_size)
        h[0, muq_idx] = self.muq_linear.bias
        if batch_size == 2:
            h[1, muq_idx] = self.unconditional_text_embedding.weight[0]
        return h

    def embed_frame(self, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
        """One audio frame `codes [8]` as a grid row (c0..c7, empty text cell masked out) -> `[B, 1, D]`."""
        tokens = torch.cat([codes, codes.new_zeros(1)])[None]
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[0, -1] = False
        return self.embed_grid(tokens, mask, batch_size)

    def backbone_step(self, h: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        """Run the backbone over new positions; return the last position's hidden state `[B, D]` (fp32)."""
        return self.backbone(h, input_pos, kv_len)[:, -1]

    def codebook0_logits(self, last_h: torch.Tensor) -> torch.Tensor:
        # The GEMM accumulates in fp32; its output is rounded to the weight dtype once (as the
        # reference's autocast does) and widened so that the CFG mix runs in fp32.
        return self.codebook0_head(last_h.to(self.dtype)).to(last_h.dtype)

    def decoder_first_logits(self, last_h: torch.Tensor, code0: torch.Tensor) -> torch.Tensor:
        """Decoder step 1 (positions 0, 1): `projection(last_h)`, `projection(e(c0))` -> logits of codebook 1.

        Writing from position 0 again is the per-frame cache reset: later positions of the previous
        frame are never attended, because attention stops at `kv_len`.
        """
        batch = last_h.shape[0]
        e0 = self.audio_embeddings(code0).expand(batch, -1)
        x = self.projection(torch.stack([last_h.to(self.dtype), e0], dim=1))  # [B, 2, d_dec]
        h = self.decoder(x, torch.arange(2, device=x.device), kv_len=2)[:, -1]
        return self._audio_logits(h, codebook=1)

    def decoder_next_logits(self, codebook: int, prev_code: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Decoder step j = 2..7: feed `projection(e(c_{j-1}))` at position j -> logits of codebook j."""
        prev_row = prev_code + (codebook - 1) * self.args.audio_vocab_size
        x = self.projection(self.audio_embeddings(prev_row)).expand(batch_size, 1, -1)
        h = self.decoder(x, torch.arange(codebook, codebook + 1, device=x.device), kv_len=codebook + 1)[:, -1]
        return self._audio_logits(h, codebook=codebook)

    def _audio_logits(self, h: torch.Tensor, codebook: int) -> torch.Tensor:
        return (h.to(self.dtype) @ self.audio_head[codebook - 1]).to(h.dtype)
