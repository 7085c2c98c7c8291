"""HeartMuLa token generation, the fast path: same computation as `generate.generate`, fewer launches.

What changes against the plain path (spec §9 levers 1-4), and what does not:
* B songs share one static batch of B*R rows (R = 2 with CFG: conditional, unconditional). Every op of a
  frame is row-wise, so a song's tokens do not depend on its batch mates except through GEMM shapes
  (bf16 rounding differences only).
* One frame for all songs (backbone token + codebook-0 head + 7 decoder steps + 8 samplings + EOS
  bookkeeping) is one static-shape function over preallocated buffers. On CUDA it is captured once per
  key-length bucket as a CUDA graph and replayed; on the CPU the identical function runs eagerly.
* The backbone attends over a static bucket of `bucket` key slots with a per-row mask (rows sit at
  different positions); the plain path attends over exactly the filled slots.
* The block is the plain path's (gpu_worker/model/transformer_block.py, the one block of every path),
  with the same fused q|k|v and gate|up weights; the fast path passes its own RoPE, KV writes and masks.
* RoPE is one complex multiply (the same products and sums; fp32 FMA contraction may differ in the
  last bit), and the backbone's additive attention mask is built once per frame, not per layer.
* Randomness: a frame's Exponential(1) draws are a function of (seed, frame, codebook, id)
  (gpu_worker/generation/sampling_noise.py), computed inside the frame step from each slot's seed and frame count:
  the plain path's numbers, with no per-song work outside the graph.
* Sampling settings (temperature, top-k, CFG scale) are per-slot device tensors read by the frame step,
  so songs with different settings share a frame and no setting is baked into a captured graph.
* No host sync inside the loop: EOS / length / error flags live on the device and are read back every
  `sync_every` frames (progress and cancellation run then); frames after a song's end are discarded.
* `fused_kernels` (default on CUDA with bf16/fp16 weights and Triton present): the frame step's norms,
  RoPE + KV writes, attention, SiLU*up and sampling run as the Triton kernels of `fused_ops` (split-K
  attention over each row's own length, no mask), the residual adds inside the GEMMs and the
  vocabulary heads padded for cuBLAS: 716 instead of 1,640 kernels a frame, 5.8 instead of 9.0 ms
  on an H100 (bench/RESULTS.md); the block is the same function with those kernels as its ops
  (gpu_worker/generation/fused_block.py). The eager ops above stay the reference and the CPU path.
Prefill runs eagerly (one song at a time, the plain path's attention call).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from gpu_worker.generation import graph_captures
from gpu_worker.generation.fused_block import fused_block
from gpu_worker.generation.generate import (
    SDPA_BACKENDS,
    ContextLimitError,
    EmptySongError,
    GenerationCancelled,
    GenerationResult,
    SamplingParams,
    check_prompt,
    check_seed,
    forbidden_ids_mask,
    top_k_race,
)
from gpu_worker.generation.host_copy import to_host
from gpu_worker.generation.sampling_noise import race_noise
from gpu_worker.kernels import fused_ops
from gpu_worker.model.heartmula import HeartMuLa, Transformer, compute_dtype
from gpu_worker.model.model_flavors import TransformerArgs
from gpu_worker.model.prompt import Prompt
from gpu_worker.model.token_validation import CODEBOOK_SIZE, validate_codes
from gpu_worker.model.transformer_block import (
    EAGER_OPS,
    BlockWeights,
    WriteKV,
    eager_attention,
    fuse_projections_,
    transformer_block,
)
from gpu_worker.model.transformer_block import rms_norm as _rms_norm

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
# logits_hook(frame_index [B] long, codebook, guided logits [B, V] fp32) -> logits [B, V]; traced into the
# CUDA graph, so it must use tensor ops only (tests inject EOS / special ids with it).
FastLogitsHook = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------- blocks

def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # exactly heartmula.apply_rotary_emb, with cos/sin broadcastable to x's pairs [N, S, H, hd/2]
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)


def _rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # the same products and sums as `_rope`, as one complex multiply: 3 kernels instead of 9
    pairs = x.to(freqs.real.dtype, memory_format=torch.contiguous_format).unflatten(-1, (-1, 2))
    return torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2).to(x.dtype)


def _apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _rope_complex(x, rope[0]) if len(rope) == 1 else _rope(x, *rope)


def _block(x: torch.Tensor, w: BlockWeights, args: TransformerArgs, rope: tuple[torch.Tensor, ...],
           write_kv: WriteKV, mask: torch.Tensor | None) -> torch.Tensor:
    """The eager block over `x [N, S, D]` with the fast path's RoPE tables `rope` (`_rope_at`); `write_kv(k, v)`
    stores `[N, KV, S, hd]` and returns the keys and values to attend."""
    attend = partial(eager_attention, args=args, rope=partial(_apply_rope, rope=rope), write_kv=write_kv, mask=mask)
    return transformer_block(x, w, args, EAGER_OPS, attend)


def fused_kernels_default(model: HeartMuLa) -> bool:
    return fused_kernels_for(model.device, model.dtype)


def fused_kernels_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Fused kernels by default where they are meant to run: CUDA, Triton present, bf16 / fp16 weights."""
    return device.type == "cuda" and fused_ops.triton_available() and dtype in (torch.bfloat16, torch.float16)


def _causal_fold_mask(seq: int, group: int, device: torch.device) -> torch.Tensor:
    """The plain path's prefill mask `[group * S, S]` (heartmula.Transformer.attention_mask)."""
    causal = torch.arange(seq, device=device)[None, :] <= torch.arange(seq, device=device)[:, None]
    return causal.repeat(group, 1)


def _rope_tables(stack: Transformer, complex_rope: bool) -> tuple[torch.Tensor, ...]:
    """Per-position rotation tables `[max_seq_len, hd/2]`: (cos, sin), or one complex table."""
    if complex_rope:
        return (torch.view_as_complex(_freqs(stack).contiguous()),)
    return _cos_sin_tables(stack)


def _cos_sin_tables(stack: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = _freqs(stack)
    return freqs[..., 0].contiguous(), freqs[..., 1].contiguous()


def _freqs(stack: Transformer) -> torch.Tensor:
    if stack.freqs_cis is None:
        raise RuntimeError("the transformer has no RoPE tables: call setup_rope() first")
    return stack.freqs_cis


def _rope_at(tables: tuple[torch.Tensor, ...], index) -> tuple[torch.Tensor, ...]:
    """Tables at positions `index` shaped to broadcast over `[N, S, H, hd/2]`."""
    return tuple(t[index] for t in tables)


# -------------------------------------------------------------------------------------------------- engine

class FrameEngine:
    """Static buffers and the per-frame step for `num_songs` slots of `rows` rows each (see module doc).

    Slot state on the device: `prev` [B, 8] codes fed next, `pos` [B] the position they go to,
    `count` [B] frames recorded, `limit` [B] frames wanted, `done` / `eos` [B], `error` [B] first
    frame*8+codebook without an eligible id (-1: none), `frames` [B, max_frames + 1, 8] int32.
    """

    def __init__(self, model: HeartMuLa, *, num_songs: int, rows: int, cache_len: int, max_frames: int,
                 audio_eos_id: int,
                 bucket: int = 512, use_graphs: bool | None = None, logits_hook: FastLogitsHook | None = None,
                 complex_rope: bool = True, fused_kernels: bool | None = None):
        args = model.args
        model.setup_rope()  # the tables only: this engine's own KV buffers replace the model's caches
        self.model, self.args = model, args
        self.device, self.dtype = model.device, model.dtype
        self.num_songs, self.rows, self.num_rows = num_songs, rows, num_songs * rows
        self.cache_len, self.bucket = cache_len, bucket
        self.audio_eos_id = audio_eos_id
        self.logits_hook = logits_hook
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.fused = fused_kernels_default(model) if fused_kernels is None else fused_kernels
        if self.fused and not fused_ops.triton_available():
            raise RuntimeError("fused_kernels=True needs Triton, which is not installed")
        self.backbone_w = fuse_projections_(model.backbone)
        self.decoder_w = fuse_projections_(model.decoder)
        self.bb_rope = _rope_tables(model.backbone, complex_rope)
        self.dec_rope = _rope_tables(model.decoder, complex_rope)
        dev, n = self.device, self.num_rows
        bb, dec = args.backbone, args.decoder
        self.k_cache = [torch.zeros(n, bb.num_kv_heads, cache_len, bb.head_dim, dtype=self.dtype, device=dev)
                        for _ in range(bb.num_layers)]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        slots = args.audio_num_codebooks
        self.dk_cache = [torch.zeros(n, dec.num_kv_heads, slots, dec.head_dim, dtype=self.dtype, device=dev)
                         for _ in range(dec.num_layers)]
        self.dv_cache = [torch.zeros_like(k) for k in self.dk_cache]
        group = dec.num_heads // dec.num_kv_heads
        self.dec_mask2 = _causal_fold_mask(2, group, dev)
        self.forbidden = forbidden_ids_mask(args.audio_vocab_size, audio_eos_id, device=dev)
        if self.fused:
            # fp32 cos / sin tables [positions, hd/2]; per-start position rows for the decoder
            self.bb_cos_sin = _cos_sin_tables(model.backbone)
            self.dec_cos_sin = _cos_sin_tables(model.decoder)
            self.dec_base = [torch.full((n,), start, dtype=torch.long, device=dev) for start in range(slots)]
            # Vocabulary heads as [V, d] weights padded to a multiple of 128 rows (zeros): cuBLAS then runs
            # its fast GEMM instead of a gemv at half the bandwidth for the odd V = 8197; logits are sliced.
            vocab = args.audio_vocab_size
            padded = math.ceil(vocab / 128) * 128
            self.codebook0_w = torch.zeros(padded, bb.embed_dim, dtype=self.dtype, device=dev)
            self.codebook0_w[:vocab] = model.codebook0_head.weight
            self.audio_head_t = torch.zeros(slots - 1, padded, dec.embed_dim, dtype=self.dtype, device=dev)
            self.audio_head_t[:, :vocab] = model.audio_head.detach().transpose(1, 2)
            self.forbidden_i8 = self.forbidden.to(torch.int8)
        self.row_ids = torch.arange(n, device=dev)  # each row's own cache row (a replay chunk points elsewhere)
        # one key chunk for every step of this engine, whatever its bucket (fused_ops.attention_chunk)
        self.attention_chunk = fused_ops.attention_chunk(cache_len, n * bb.num_kv_heads)
        self.offsets = torch.arange(slots, device=dev) * args.audio_vocab_size
        self.grid_mask = torch.ones(num_songs, slots + 1, dtype=torch.bool, device=dev)
        self.grid_mask[:, -1] = False

        b, v = num_songs, args.audio_vocab_size
        self.noise = torch.ones(b, slots, v, dtype=torch.float32, device=dev)
        # per-slot sampling settings and seeds, written at prefill, read by the frame step
        self.seed = torch.zeros(b, dtype=torch.long, device=dev)
        self.temperature = torch.ones(b, dtype=torch.float32, device=dev)
        self.top_k = torch.ones(b, dtype=torch.long, device=dev)
        self.cfg_scale = torch.ones(b, dtype=torch.float32, device=dev)
        self.last_h = torch.zeros(n, bb.embed_dim, dtype=compute_dtype(self.dtype), device=dev)
        self.prev = torch.zeros(b, slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.count = torch.zeros(b, dtype=torch.long, device=dev)
        self.limit = torch.zeros(b, dtype=torch.long, device=dev)
        self.done = torch.ones(b, dtype=torch.bool, device=dev)
        self.eos = torch.zeros(b, dtype=torch.bool, device=dev)
        self.error = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.frames = torch.zeros(b, max_frames + 1, slots, dtype=torch.int32, device=dev)
        self.all_songs = torch.ones(b, dtype=torch.bool, device=dev)
        self.max_frames = max_frames
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # resume: one chunk of replayed frames (grid rows, positions, the song's cache rows) and its graphs
        self.replay_tokens = torch.zeros(b, slots + 1, dtype=torch.long, device=dev)
        self.replay_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.replay_rows = torch.zeros(n, dtype=torch.long, device=dev)
        self.replay_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None
        if self.use_graphs:
            self._warm_up()

    # ---- host-side control

    def buckets_for(self, max_position: int) -> int:
        """Smallest bucket of key slots that covers positions 0..max_position."""
        return min(self.cache_len, math.ceil((max_position + 1) / self.bucket) * self.bucket)

    def reset_slot(self, song: int) -> None:
        self.done[song] = True
        self.eos[song] = False
        self.error[song] = -1
        self.count[song] = 0

    @torch.inference_mode()
    def prefill(self, song: int, prompt: Prompt, params: SamplingParams, seed: int) -> None:
        """Run the prompt of slot `song` through the backbone (eager) and arm the slot for frame 0."""
        if params.uses_cfg and self.rows == 1:
            raise ValueError("this engine has one row per song: it cannot run classifier-free guidance")
        model, rows, length = self.model, self.rows, prompt.length
        r0 = song * rows
        h = model.embed_prompt(prompt.tokens.to(self.device), prompt.mask.to(self.device), prompt.muq_idx, rows)
        bb = self.args.backbone
        mask = _causal_fold_mask(length, bb.num_heads // bb.num_kv_heads, self.device)
        rope = _rope_at(self.bb_rope, (None, slice(0, length), None))
        for layer, w in enumerate(self.backbone_w):
            kc, vc = self.k_cache[layer][r0:r0 + rows], self.v_cache[layer][r0:r0 + rows]

            def write(k: torch.Tensor, v: torch.Tensor, kc=kc, vc=vc) -> tuple[torch.Tensor, torch.Tensor]:
                kc[:, :, :length].copy_(k)
                vc[:, :, :length].copy_(v)
                return kc[:, :, :length], vc[:, :, :length]

            h = _block(h, w, bb, rope, write, mask)
        self.last_h[r0:r0 + rows].copy_(_rms_norm(h[:, -1], model.backbone.norm.scale, bb.norm_eps))
        self.pos[song] = length  # frame 0 goes in at position `length`
        self.limit[song] = params.max_frames
        self.seed[song] = seed
        self.temperature[song] = params.temperature
        self.top_k[song] = params.top_k
        self.cfg_scale[song] = params.cfg_scale
        self.count[song] = 0
        self.eos[song] = False
        self.error[song] = -1
        self.done[song] = False

    @torch.inference_mode()
    def first_frame(self, songs: torch.Tensor) -> None:
        """Sample and record frame 0 of the slots in the bool mask `songs` from their prefill states (eager)."""
        with sdpa_kernel(SDPA_BACKENDS):
            self._sample_and_record(self.last_h, songs)

    @torch.inference_mode()
    def step(self, max_position: int) -> None:
        """One frame for every live slot; `max_position` bounds every live slot's next position."""
        keys = self.buckets_for(max_position)
        if not self.use_graphs:
            with sdpa_kernel(SDPA_BACKENDS):
                self._step(keys)
            return
        graph = self.graphs.get(keys)
        if graph is None:
            graph = self._capture(keys)
            if graph is None:  # another thread compiles: this step runs eagerly, a later one captures
                with sdpa_kernel(SDPA_BACKENDS):
                    self._step(keys)
                return
            self.graphs[keys] = graph
        graph.replay()

    def read_state(self) -> dict[str, list]:
        """The slot flags, read back to the host (the only sync of the loop)."""
        packed = to_host(torch.stack([self.count, self.done.long(), self.eos.long(), self.error]))
        count, done, eos, error = packed.tolist()
        return {"count": count, "done": [bool(d) for d in done], "eos": [bool(e) for e in eos], "error": error}

    # ---- CUDA graphs

    def _warm_up(self) -> None:
        # One eager run on scratch state initialises cuBLAS / attention kernels before any capture; the
        # slot state is reset afterwards.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
            self.done.fill_(False)
            self.limit.fill_(1)
            self._step(self.buckets_for(0))
            self.done.fill_(True)
            self.count.zero_()
            self.pos.zero_()
            self.eos.fill_(False)
            self.error.fill_(-1)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _capture(self, keys: int, body: Callable[[int], None] | None = None) -> torch.cuda.CUDAGraph | None:
        """The graph of `body` (the frame step), or None while another thread compiles (graph_captures)."""
        with graph_captures.capture_unless_busy() as free:
            if not free:
                return None
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS), \
                    torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                (body or self._step)(keys)
            return graph

    # ---- the frame (static shapes: traced into the graphs)

    @torch.inference_mode()
    def resume(self, song: int, frames: torch.Tensor) -> None:
        """After `prefill`, continue slot `song` from its first k recorded frames `frames [k, 8]`.

        Frames 0..k-2 go through the backbone as the frame steps fed them (KV only: nothing is sampled),
        `num_songs` positions at a time: each chunk is a frame step's batch of `num_rows` rows whose rows
        are positions of this one song (two rows a position, pointed at the song's cache rows). Every
        GEMM, norm and attention call has the frame step's shape and key chunks, so the keys and values
        are the ones the uninterrupted run wrote, and the next step samples frame k from the same state.
        """
        k = int(frames.shape[0])
        if not 1 <= k <= int(self.limit[song]):
            raise ValueError(f"cannot resume from {k} frames: the song wants 1..{int(self.limit[song])}")
        frames = frames.to(self.device, torch.long)
        base = int(self.pos[song])  # the prompt length: frame j - 1 went in at base + j - 1
        per_chunk, rows = self.num_songs, self.rows
        self.replay_rows.copy_((song * rows + torch.arange(rows, device=self.device)).repeat(per_chunk))
        for first in range(0, k - 1, per_chunk):
            count = min(per_chunk, k - 1 - first)
            index = torch.arange(per_chunk, device=self.device).clamp_max(count - 1)  # pad: repeat the last
            self.replay_tokens.copy_(torch.cat([frames[first + index], frames.new_zeros(per_chunk, 1)], dim=1))
            self.replay_pos.copy_((base + first + index).repeat_interleave(rows))
            self._replay_chunk(self.buckets_for(base + first + count - 1))
        self.frames[song, :k] = frames.to(torch.int32)
        self.prev[song] = frames[k - 1]
        self.pos[song] = base + k - 1
        self.count[song] = k

    def _replay_chunk(self, keys: int) -> None:
        """One resume chunk from the replay buffers; with graphs, captured per bucket like the frame step
        (the first chunk of a bucket runs eagerly, then its graph serves the rest: the same kernels)."""
        if self.use_graphs:
            graph = self.replay_graphs.get(keys)
            if graph is not None:
                graph.replay()
                return
        with sdpa_kernel(SDPA_BACKENDS):
            self._replay_backbone(keys)
        if self.use_graphs:
            graph = self._capture(keys, self._replay_backbone)
            if graph is not None:
                self.replay_graphs[keys] = graph

    def _replay_backbone(self, keys: int) -> None:
        self._backbone(self._embed(self.replay_tokens), self.replay_pos, self.replay_rows, keys)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Grid rows `[B, 9]` (8 codes, empty text) -> the backbone input `[N, 1, D]`, each song's row repeated."""
        embeds = self.model.embed_grid(tokens, self.grid_mask, 1)[0]  # [B, D], the plain path's masked sum
        return embeds.repeat_interleave(self.rows, dim=0)[:, None]

    def _backbone(self, h: torch.Tensor, pos: torch.Tensor, cache_rows: torch.Tensor, keys: int) -> torch.Tensor:
        """The backbone over one new token per row `h [N, 1, D]` at `pos [N]` of cache row `cache_rows[N]`,
        attending over `keys` slots -> the final hidden state `[N, D]` (norm applied)."""
        model, bb = self.model, self.args.backbone
        if self.fused:
            for layer, w in enumerate(self.backbone_w):
                h = fused_block(h, w, bb, self.bb_cos_sin, pos, self.k_cache[layer], self.v_cache[layer], keys,
                                cache_rows=cache_rows, chunk=self.attention_chunk)
            return fused_ops.rms_norm(h[:, -1], model.backbone.norm.scale, bb.norm_eps)
        rope = _rope_at(self.bb_rope, (pos, None, None))
        # one additive mask for all layers (what SDPA would make of a bool mask in every layer)
        mask = torch.zeros(self.num_rows, 1, 1, keys, dtype=self.dtype, device=self.device).masked_fill_(
            (torch.arange(keys, device=self.device) > pos[:, None])[:, None, None], NEG_INF)
        own_rows = cache_rows is self.row_ids
        for layer, w in enumerate(self.backbone_w):
            kc, vc = self.k_cache[layer], self.v_cache[layer]

            def write(k: torch.Tensor, v: torch.Tensor, kc=kc, vc=vc) -> tuple[torch.Tensor, torch.Tensor]:
                kc[cache_rows, :, pos] = k[:, :, 0]
                vc[cache_rows, :, pos] = v[:, :, 0]
                if own_rows:
                    return kc[:, :, :keys], vc[:, :, :keys]
                return kc[cache_rows, :, :keys], vc[cache_rows, :, :keys]

            h = _block(h, w, bb, rope, write, mask)
        return _rms_norm(h[:, -1], model.backbone.norm.scale, bb.norm_eps).to(compute_dtype(h.dtype))

    def _step(self, keys: int) -> None:
        tokens = torch.cat([self.prev, self.prev.new_zeros(self.num_songs, 1)], dim=1)  # grid rows, text = empty
        pos = self.pos.repeat_interleave(self.rows)  # [N] where this token goes
        last_h = self._backbone(self._embed(tokens), pos, self.row_ids, keys)
        self.pos.add_((~self.done).long())
        self._sample_and_record(last_h, self.all_songs)

    def _decoder(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Decoder over `x [N, S, d]` at positions start..start+S-1 (cache reset = writing from 0)."""
        dec = self.args.decoder
        seq = x.shape[1]
        end = start + seq
        if self.fused:  # -> the final norm in the model dtype (the eager path widens it, losslessly)
            for layer, w in enumerate(self.decoder_w):
                x = fused_block(x, w, dec, self.dec_cos_sin, self.dec_base[start], self.dk_cache[layer],
                                self.dv_cache[layer], end, cache_rows=self.row_ids)
            return fused_ops.rms_norm(x[:, -1], self.model.decoder.norm.scale, dec.norm_eps)
        rope = _rope_at(self.dec_rope, (None, slice(start, end), None))
        mask = self.dec_mask2 if seq == 2 else None
        h = x
        for layer, w in enumerate(self.decoder_w):
            kc, vc = self.dk_cache[layer], self.dv_cache[layer]

            def write(k: torch.Tensor, v: torch.Tensor, kc=kc, vc=vc) -> tuple[torch.Tensor, torch.Tensor]:
                kc[:, :, start:end].copy_(k)
                vc[:, :, start:end].copy_(v)
                return kc[:, :, :end], vc[:, :, :end]

            h = _block(h, w, dec, rope, write, mask)
        return _rms_norm(h[:, -1], self.model.decoder.norm.scale, dec.norm_eps).to(compute_dtype(h.dtype))

    def _guided(self, logits: torch.Tensor) -> torch.Tensor:
        """generate.cfg_mix per song: `[N, V]` raw logits -> `[B, V]` fp32; a slot with scale 1 takes
        its conditional row as it is (the plain path's one-row song)."""
        if self.rows == 1:
            return logits
        pairs = logits.view(self.num_songs, 2, -1)
        cond, uncond = pairs[:, 0].float(), pairs[:, 1].float()
        scale = self.cfg_scale[:, None]
        return torch.where(scale > 1, uncond + scale * (cond - uncond), cond)

    def _draw(self) -> None:
        """This frame's draws for every slot, from its seed and frame count (inside the graph)."""
        race_noise(self.seed, self.count, self.args.audio_num_codebooks, self.args.audio_vocab_size, out=self.noise)

    def _sample(self, logits: torch.Tensor, codebook: int, frame_index: torch.Tensor) -> torch.Tensor:
        guided = self._guided(logits)
        if self.logits_hook is not None:
            guided = self.logits_hook(frame_index, codebook, guided)
        return top_k_race(guided, self.noise[:, codebook], temperature=self.temperature, top_k=self.top_k,
                          forbidden=self.forbidden)

    def _rows(self, per_song: torch.Tensor) -> torch.Tensor:
        return per_song.repeat_interleave(self.rows, dim=0)

    def _sample_fused(self, logits: torch.Tensor, codebook: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_sample` through the fused kernels: raw logits `[N, V]` -> (codes int32 [B], embedding rows of
        those codes for the next decoder input, one per row [N])."""
        if self.logits_hook is None:
            z = fused_ops.guided_logits(logits, self.forbidden_i8, rows=self.rows, cfg_scale=self.cfg_scale,
                                        temperature=self.temperature)
        else:
            guided = self.logits_hook(self.count, codebook, self._guided(logits.float()))
            z = (guided / self.temperature[:, None]).masked_fill(self.forbidden, NEG_INF)
        # the draws are hashed inside the sampling kernel: the same numbers as `_draw`, no noise buffer
        return fused_ops.topk_race_sample(z, None, top_k=self.top_k, rows=self.rows,
                                          row_offset=codebook * self.args.audio_vocab_size,
                                          hashed=(self.seed, self.count, codebook))

    def _sample_and_record_fused(self, last_h: torch.Tensor, songs: torch.Tensor) -> None:
        model, embeddings = self.model, self.model.audio_embeddings.weight
        last_h = last_h.to(self.dtype)  # exact: the fp32 prefill state is a widened model-dtype value
        vocab = self.args.audio_vocab_size
        code, rows = self._sample_fused(fused_ops.linear(last_h, self.codebook0_w)[:, :vocab], 0)
        codes = [code]
        x = model.projection(torch.stack([last_h, F.embedding(rows, embeddings)], dim=1))
        for codebook in range(1, self.args.audio_num_codebooks):
            h = self._decoder(x, 0 if codebook == 1 else codebook)
            code, rows = self._sample_fused(fused_ops.linear(h, self.audio_head_t[codebook - 1])[:, :vocab], codebook)
            codes.append(code)
            if codebook + 1 < self.args.audio_num_codebooks:
                x = model.projection(F.embedding(rows, embeddings))[:, None]
        self._record(torch.stack(codes, dim=1), songs)

    def _sample_and_record(self, last_h: torch.Tensor, songs: torch.Tensor) -> None:
        if self.fused:
            self._sample_and_record_fused(last_h, songs)
            return
        self._draw()
        model, args = self.model, self.args
        vocab, dtype = args.audio_vocab_size, self.dtype
        frame_index = self.count
        codes = [self._sample(model.codebook0_logits(last_h), 0, frame_index)]
        e0 = F.embedding(codes[0].clamp_min(0), model.audio_embeddings.weight)  # a -1 frame is discarded anyway
        x = model.projection(torch.stack([last_h.to(dtype), self._rows(e0)], dim=1))
        h = self._decoder(x, 0)
        codes.append(self._sample(model._audio_logits(h, codebook=1), 1, frame_index))
        for codebook in range(2, args.audio_num_codebooks):
            prev_row = codes[-1].clamp_min(0) + (codebook - 1) * vocab
            x = model.projection(F.embedding(prev_row, model.audio_embeddings.weight))
            h = self._decoder(self._rows(x)[:, None], codebook)
            codes.append(self._sample(model._audio_logits(h, codebook=codebook), codebook, frame_index))
        self._record(torch.stack(codes, dim=1), songs)

    def _record(self, codes: torch.Tensor, songs: torch.Tensor) -> None:
        """Device-side bookkeeping of one frame `codes [B, 8]` int32 for the slots in `songs` (no host sync)."""
        live = songs & ~self.done
        invalid = codes < 0
        bad = invalid.any(dim=1)
        is_eos = (codes == self.audio_eos_id).any(dim=1)
        first_bad = self.count * codes.shape[1] + invalid.int().argmax(dim=1)
        self.error.copy_(torch.where(live & bad, first_bad, self.error))
        keep = live & ~bad & ~is_eos
        self.eos.copy_(self.eos | (live & ~bad & is_eos))
        songs_idx = torch.arange(self.num_songs, device=self.device)
        current = self.frames[songs_idx, self.count]
        self.frames[songs_idx, self.count] = torch.where(keep[:, None], codes, current)
        self.count.add_(keep.long())
        self.prev.copy_(torch.where(keep[:, None], codes.long(), self.prev))
        self.done.copy_(self.done | (live & (bad | is_eos)) | (self.count >= self.limit))


# ------------------------------------------------------------------------------------------------ generate

@dataclass
class _EngineKey:
    model_id: int
    num_songs: int
    rows: int
    cache_len: int
    max_frames: int
    eos: int
    bucket: int
    use_graphs: bool
    complex_rope: bool
    fused: bool


_ENGINES: dict[int, tuple[_EngineKey, FrameEngine]] = {}


def _engine_for(model: HeartMuLa, key: _EngineKey, build: Callable[[], FrameEngine]) -> FrameEngine:
    """One cached engine (buffers + captured graphs) per model; a different shape replaces it."""
    cached = _ENGINES.get(id(model))
    if cached is not None and cached[0] == key and cached[1].model is model:
        return cached[1]
    _ENGINES.pop(id(model), None)
    if model.device.type == "cuda":
        del cached
        torch.cuda.empty_cache()
    engine = build()
    _ENGINES[id(model)] = (key, engine)
    return engine


def release_engines() -> None:
    """Drop cached engines (their KV caches and graphs)."""
    _ENGINES.clear()


def _per_song(value, count: int, name: str) -> list:
    if value is None or callable(value):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: expected {count} entries (one per song), got {len(values)}")
    return values


@torch.inference_mode()
def generate_fast(model: HeartMuLa, prompts: Sequence[Prompt] | Prompt,
                  params: SamplingParams | Sequence[SamplingParams], *, seeds: Sequence[int],
                  progress: ProgressFn | Sequence[ProgressFn | None] | None = None,
                  should_cancel: CancelFn | Sequence[CancelFn | None] | None = None,
                  sync_every: int = 25, logits_hook: FastLogitsHook | None = None,
                  return_exceptions: bool = False, bucket: int | None = None,
                  use_graphs: bool | None = None, complex_rope: bool = True,
                  fused_kernels: bool | None = None) -> list[GenerationResult | Exception]:
    """Generate B songs together; song i draws from `seeds[i]` only and gets the plain path's result.

    `params` is one SamplingParams, or one per song (any settings; with CFG on for any song every song
    has two rows, a scale-1 song ignoring its second). Every
    `sync_every` frames the device flags are read back: `progress[i](done, total)` and
    `should_cancel[i]()` run then (a bare callable serves every song), and `progress` once more at the
    end. Errors (GenerationCancelled, EmptySongError, no eligible id) are raised for the first failing
    song after all songs finish, or returned in that song's place with `return_exceptions=True`.
    """
    prompt_list = [prompts] if isinstance(prompts, Prompt) else list(prompts)
    count = len(prompt_list)
    if count == 0:
        raise ValueError("no prompts")
    param_list = _per_song(params if isinstance(params, Sequence) else [params] * count, count, "params")
    seed_list = _per_song(seeds, count, "seeds")
    progress_list = _per_song(progress, count, "progress")
    cancel_list = _per_song(should_cancel, count, "should_cancel")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    args, device = model.args, model.device
    eos_ids = {p.audio_eos_id for p in prompt_list}
    if len(eos_ids) != 1:
        raise ValueError(f"all prompts must share one audio_eos_id, got {sorted(eos_ids)}")
    limit = args.backbone.max_seq_len
    totals = [p.max_frames for p in param_list]
    for prompt, total, seed, p in zip(prompt_list, totals, seed_list, param_list):
        if prompt.length + total > limit:
            raise ContextLimitError(
                f"prompt length L={prompt.length} + max frames N={total} = {prompt.length + total} exceeds the "
                f"context limit {limit} (max_seq_len); shorten the lyrics or max_audio_length_ms")
        if p.top_k > args.audio_vocab_size:
            raise ValueError(f"top_k must be in 1..{args.audio_vocab_size}, got {p.top_k}")
        check_seed(seed)
        check_prompt(model, prompt)

    graphs = (device.type == "cuda") if use_graphs is None else use_graphs
    bucket = bucket or (512 if graphs else 64)
    # One engine shape per song count on a GPU (the whole context, two rows a song; a CFG-scale-1 song
    # ignores its second): a job of another length or other settings reuses the buffers and graphs. On the
    # CPU the buffers follow the job (they are cheap to build and the tests run many shapes).
    if graphs:
        cache_len, rows, max_frames = limit, 2, limit
    else:
        need = max(p.length + t for p, t in zip(prompt_list, totals))
        cache_len = min(limit, math.ceil(need / bucket) * bucket)
        rows = 2 if any(p.uses_cfg for p in param_list) else 1
        max_frames = max(totals)
    fused = fused_kernels_default(model) if fused_kernels is None else fused_kernels
    key = _EngineKey(id(model), count, rows, cache_len, max_frames, eos_ids.pop(), bucket, graphs, complex_rope,
                     fused)
    engine = _engine_for(model, key, lambda: FrameEngine(
        model, num_songs=count, rows=rows, cache_len=cache_len, max_frames=max_frames, audio_eos_id=key.eos,
        bucket=bucket, use_graphs=graphs, logits_hook=logits_hook, complex_rope=complex_rope, fused_kernels=fused))
    if engine.logits_hook is not logits_hook:
        engine.logits_hook = logits_hook
        engine.graphs.clear()  # a different hook means a different frame: capture again

    for song, (prompt, p, seed) in enumerate(zip(prompt_list, param_list, seed_list)):
        engine.prefill(song, prompt, p, seed)
    engine.first_frame(engine.all_songs)

    errors: list[Exception | None] = [None] * count
    live = [True] * count
    step = 0
    max_steps = max(totals) - 1
    while True:
        if step == max_steps or (step > 0 and step % sync_every == 0) or step == 0:
            state = engine.read_state()
            for song in range(count):
                if not live[song]:
                    continue
                done = state["count"][song]
                if state["done"][song]:
                    live[song] = False
                    continue
                if step > 0 and cancel_list[song] is not None and cancel_list[song]():
                    errors[song] = GenerationCancelled(f"cancelled after {done} of {totals[song]} frames")
                    engine.done[song] = True
                    live[song] = False
                    continue
                if step > 0 and progress_list[song] is not None:
                    progress_list[song](done, totals[song])
            if not any(live) or step == max_steps:
                break
        step += 1
        engine.step(max(p.length - 1 + step for p, alive in zip(prompt_list, live) if alive))

    state = engine.read_state()
    frames_all = engine.frames.cpu()
    results: list[GenerationResult | Exception] = []
    for song, prompt in enumerate(prompt_list):
        if errors[song] is None and state["error"][song] >= 0:
            frame, codebook = divmod(state["error"][song], args.audio_num_codebooks)
            errors[song] = RuntimeError(f"no eligible id at frame {frame}, codebook {codebook}: "
                                        "every logit was NaN or -inf")
        done = state["count"][song]
        if errors[song] is None and done == 0:
            errors[song] = EmptySongError("EOS at frame 0: the model ended the song before its first frame")
        error = errors[song]
        if error is not None:
            results.append(error)
            continue
        if progress_list[song] is not None:
            progress_list[song](done, totals[song])
        grid = frames_all[song, :done].T.contiguous()
        validate_codes(grid, num_quantizers=args.audio_num_codebooks, codebook_size=CODEBOOK_SIZE)
        results.append(GenerationResult(frames=grid, stop_reason="eos" if state["eos"][song] else "max_length",
                                        prompt_length=prompt.length))
    if not return_exceptions:
        for item in results:
            if isinstance(item, Exception):
                raise item
    return results
