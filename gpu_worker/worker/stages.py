"""The two GPU stages: compute functions (callable without Celery) and their Celery tasks."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from gpu_worker.checkpoints import file_checksums
from gpu_worker.checkpoints.tiny_checkpoint import is_tiny_checkpoint
from gpu_worker.generation.sampling_noise import SCHEME as NOISE_SCHEME
from gpu_worker.model.token_validation import validate_codes
from gpu_worker.worker import model_cache
from gpu_worker.worker.cuda_health import handle_gpu_failure
from gpu_worker.worker.device import codec_dtype, gpu_batching_enabled, lm_dtype, resolve_device
from tasks.audio_files import SAMPLE_RATE, wav_bytes
from tasks.contracts import DecodeAudioInput, DecodeAudioOutput, GenerateTokensInput, GenerateTokensOutput
from tasks.recording import JobCancelled, StageContext, lease_s, stage_task
from tasks.stage_inputs import RESOLVERS

CHECKSUM_CACHE_NAME = "checksums.json"
STALL_LEASES = 3  # a batching engine with no frame step for this many leases is hung: its songs are reclaimed


def _checkpoint(path: str, ctx: StageContext) -> Path:
    root = Path(path)
    file_checksums.use_cache_file(ctx.settings.data_dir / CHECKSUM_CACHE_NAME)
    if ctx.settings.uses_tiny_checkpoint and root == ctx.settings.resolved_checkpoint_dir:
        from gpu_worker.checkpoints.tiny_checkpoint import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(root)
    return root


def tokens_to_bytes(frames: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, frames.to(torch.int16).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def tokens_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def generate_tokens(inp: GenerateTokensInput, ctx: StageContext) -> GenerateTokensOutput:
    from gpu_worker.generation.generate import GenerationCancelled, GenerationResult, SamplingParams, generate
    from gpu_worker.model.prompt import build_prompt

    device = resolve_device(ctx.settings)
    dtype = lm_dtype(ctx.settings, device)
    lm = model_cache.get_lm(_checkpoint(inp.checkpoint, ctx), device, dtype)
    ctx.environment_extra.update(model_checksums=lm.checksums, device=str(device), lm_dtype=str(dtype),
                                 tiny_checkpoint=is_tiny_checkpoint(Path(inp.checkpoint)),
                                 sampling_noise=NOISE_SCHEME)
    prompt = build_prompt(lm.tokenizer, lm.gen_config, inp.tags, inp.lyrics)
    params = SamplingParams(temperature=inp.params.temperature, top_k=inp.params.top_k,
                            cfg_scale=inp.params.cfg_scale, max_audio_length_ms=inp.params.max_audio_length_ms)
    report = lambda done, total: ctx.progress(done, total, "frames")  # noqa: E731
    result: GenerationResult
    try:
        if gpu_batching_enabled(ctx.settings):
            result = _generate_batched(lm, prompt, params, inp, ctx, dtype)
        elif device.type == "cuda":
            # the CUDA-graph frame step (Triton kernels where fused_kernels); same draws as the plain path,
            # bf16 logits within tolerance
            from gpu_worker.generation.fast_generate import fused_kernels_default, generate_fast

            ctx.environment_extra.update(generation_path="fast", bucket=512, complex_rope=True,
                                         fused_kernels=fused_kernels_default(lm.model))
            song = generate_fast(lm.model, prompt, params, seeds=[inp.seed], progress=report,
                                 should_cancel=ctx.should_cancel)[0]
            assert isinstance(song, GenerationResult)  # without return_exceptions a failed song raises
            result = song
        else:
            ctx.environment_extra.update(generation_path="plain")
            result = generate(lm.model, prompt, params, seed=inp.seed, progress=report,
                              should_cancel=ctx.should_cancel)
    except GenerationCancelled as exc:
        raise JobCancelled(f"job {ctx.job_id} cancelled during token generation") from exc
    frames = int(result.frames.shape[1])
    ctx.progress(frames, frames, "frames", force=True)
    ref = ctx.put_artifact(tokens_to_bytes(result.frames), "tokens")
    return GenerateTokensOutput(tokens=ref, frames=frames, stop_reason=result.stop_reason,
                                prompt_length=result.prompt_length, tags_text=prompt.tags_text,
                                lyrics_text=prompt.lyrics_text, device=str(device), dtype=str(dtype),
                                batch_size=getattr(result, "batch_size", 1))


def _generate_batched(lm, prompt, params, inp: GenerateTokensInput, ctx: StageContext, dtype: torch.dtype):
    """Continuous batching: the process's engine runs this song in a slot beside others, continuing from
    an earlier attempt's token checkpoint where one fits this engine (gpu_worker/worker/token_checkpoints.py)."""
    from gpu_worker.generation.fast_generate import fused_kernels_default
    from gpu_worker.worker.batching import get_engine, run_in_engine
    from gpu_worker.worker.fault_injection import frame_pace_s
    from gpu_worker.worker.token_checkpoints import CheckpointWriter, compat_key, find_resume_point, stream_window_ends
    from tasks.environment import code_version

    engine = get_engine(lm.model, max_songs=ctx.settings.gpu_batch_slots)
    fused = fused_kernels_default(lm.model)
    ctx.environment_extra.update(generation_path="batched", engine_slots=engine.max_songs, bucket=engine.bucket,
                                 complex_rope=engine.complex_rope, fused_kernels=fused)
    device = lm.model.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    compat = compat_key(slots=engine.max_songs, cache_len=engine.cache_len, bucket=engine.bucket, fused=fused,
                        complex_rope=engine.complex_rope, card=card, dtype=str(dtype), noise=NOISE_SCHEME,
                        weights=lm.checksums, code=code_version(), torch=torch.__version__)
    every = ctx.settings.token_checkpoint_frames
    # streaming: a checkpoint one frame past every codec window; the decode stage starts now and follows them
    window_ends = stream_window_ends(Path(inp.checkpoint), params.max_frames) if ctx.settings.streaming else ()
    resume = find_resume_point(inp, ctx, compat) if every else None
    writer = CheckpointWriter(ctx, compat, params.max_frames) if every or window_ends else None
    if writer is not None and window_ends:
        writer.start_stream()
    batched = run_in_engine(lm.model, prompt, params, inp.seed, ctx, engine=engine,
                            resume=resume.frames if resume else None,
                            save_checkpoint=writer.save if writer else None, checkpoint_every=every,
                            checkpoint_at=window_ends, pace_s=frame_pace_s(ctx),
                            stall_s=STALL_LEASES * lease_s(ctx.settings))
    ctx.environment_extra.update(batch_size=batched.batch_size, queued_s=round(batched.queued_s, 3))
    if resume is not None:
        ctx.environment_extra["resumed_from"] = {
            "attempt": resume.attempt, "frames": batched.resumed_from,
            "tokens_sha256": resume.point["tokens"]["sha256"], "replay_s": round(batched.resume_s, 3)}
    if writer is not None:
        ctx.environment_extra["token_checkpoints"] = writer.saved
        if writer.stream_started is not None:
            ctx.environment_extra["stream_started"] = writer.stream_started
    return batched


def decode_audio(inp: DecodeAudioInput, ctx: StageContext) -> DecodeAudioOutput:
    codes = None
    if inp.tokens is not None:  # a finished grid: checked on the host before any model loads or device sees it
        codes = tokens_from_bytes(ctx.store.get(inp.tokens.sha256, inp.tokens.kind))
        validate_codes(codes)
        if codes.shape[1] != inp.frames:
            raise ValueError(f"token artifact holds {codes.shape[1]} frames, the record says {inp.frames}")
    device = resolve_device(ctx.settings)
    dtype = codec_dtype(ctx.settings)
    # weights stay fp32; SONGPIPE_CODEC_DTYPE=bfloat16 runs the estimator in bf16 (measured SNR in bench/RESULTS.md)
    codec = model_cache.get_codec(_checkpoint(inp.checkpoint, ctx), device, torch.float32)
    ctx.environment_extra.update(model_checksums=codec.checksums, device=str(device), codec_dtype=str(dtype),
                                 tiny_checkpoint=is_tiny_checkpoint(Path(inp.checkpoint)))
    generator = torch.Generator(device=device).manual_seed(inp.seed)
    decoder = model_cache.get_fast_codec(codec.model) if dtype == torch.bfloat16 else codec.model
    if codes is None:  # the token stage still runs: decode each window as its frames are recorded
        audio = _decode_streaming(inp, ctx, codec.model, decoder, generator)
    else:
        from gpu_worker.worker.batching import codec_turn

        with codec_turn():
            audio = decoder.decode(torch.from_numpy(codes.astype(np.int64)), generator=generator,
                                   progress=lambda done, total: ctx.progress(done, total, "windows"))
    if decoder is not codec.model:  # the fast codec: precision, graphs, whether compiling worked
        ctx.environment_extra.update(codec_fast=decoder.describe())
    data, clipped = wav_bytes(audio.float().numpy())
    ref = ctx.put_artifact(data, "wav")
    samples = int(audio.shape[1])
    return DecodeAudioOutput(wav=ref, sample_rate=SAMPLE_RATE, channels=2, samples=samples,
                             duration_s=samples / SAMPLE_RATE, device=str(device), dtype=str(dtype),
                             peak_abs=float(np.abs(audio.numpy()).max()), clipped_samples=clipped)


def _decode_streaming(inp: DecodeAudioInput, ctx: StageContext, codec, decoder, generator) -> torch.Tensor:
    """docs/streaming.md: follow the token stage, then record the finished grid as this attempt's input."""
    from gpu_worker.worker.batching import codec_turn
    from gpu_worker.worker.streaming_decode import decode_following

    if decoder is codec:
        solve, decode_latents = codec.solve_window, codec.scalar_model.decode_batch
    else:
        solve, decode_latents = decoder.solve_window, decoder.decode_latents
    with torch.inference_mode():
        song = decode_following(inp, ctx, codec, solve_window=solve, decode_latents=decode_latents,
                                generator=generator, codec_turn=codec_turn, load_tokens=tokens_from_bytes)
    ctx.record_inputs(inp.model_copy(update={"tokens": song.tokens, "frames": song.frames}))
    ctx.environment_extra["streamed"] = {"windows_before_tokens_finished": song.windows_streamed}
    return song.audio


TOKEN_ADMISSION_RETRY_S = 1.0  # a token task that finds every engine slot of its process taken waits in the broker


def _admit_token_task(request) -> bool:
    from tasks.settings import get_settings

    settings = get_settings()
    if not gpu_batching_enabled(settings):
        return True
    from gpu_worker.worker.batching import admit_token_task

    return admit_token_task(request, settings.gpu_batch_slots)


generate_tokens_task = stage_task("generate_tokens", RESOLVERS["generate_tokens"], generate_tokens,
                                  on_failure=handle_gpu_failure, admit=_admit_token_task,
                                  admission_retry_s=TOKEN_ADMISSION_RETRY_S)
decode_audio_task = stage_task("decode_audio", RESOLVERS["decode_audio"], decode_audio,
                               on_failure=handle_gpu_failure)
