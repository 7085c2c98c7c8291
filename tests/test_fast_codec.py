"""The fast codec keeps the plain decode's contract and draws; precision changes stay behind an SNR check.

Compiled estimators are checked on the CPU with the "aot_eager" backend (dynamo's whole-graph capture and
AOT tracing, eager ATen kernels: ~3 s for the tiny estimator); one test runs inductor itself, the backend
the GPU uses (its CPU code generation takes about a minute cold on a 2-core box).
"""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from gpu_worker.codec.fast_codec import FastCodec, compile_by_default, snr_db
from gpu_worker.generation import graph_captures
from gpu_worker.model.heartcodec import (
    PREFIX_LATENTS,
    HeartCodecConfig,
    build_random_heartcodec,
    overlap_add,
    plan_windows,
)

FRAMES = 400  # two windows: the second one takes the first one's prefix


@pytest.fixture(scope="module")
def codec():
    return build_random_heartcodec(HeartCodecConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 8192, (8, FRAMES), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(codec, codes):
    return codec.decode(codes, generator=torch.Generator().manual_seed(0))


def test_fp32_fast_codec_is_bitwise_the_plain_decode(codec, codes, reference):
    out = FastCodec(codec, precision="fp32").decode(codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, reference)


def test_tf32_fast_codec_restores_the_matmul_setting_and_matches_fp32_on_cpu(codec, codes, reference):
    before = torch.backends.cuda.matmul.allow_tf32
    out = FastCodec(codec, precision="tf32").decode(codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, reference)  # TF32 only changes CUDA matmuls
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("precision, sq_dtype", [("bf16", None), ("bf16-mixed", None), ("bf16", torch.bfloat16)])
def test_bf16_variants_keep_shape_and_stay_above_30_db(codec, codes, reference, precision, sq_dtype):
    out = FastCodec(codec, precision=precision, sq_dtype=sq_dtype).decode(
        codes, generator=torch.Generator().manual_seed(0))
    assert out.shape == reference.shape == (2, FRAMES * 3840) and out.dtype == torch.float32
    assert snr_db(reference, out) >= 30.0


def test_the_codec_generator_gives_one_randn_per_window_as_the_plain_decode(codec, codes):
    fast_gen, plain_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    FastCodec(codec, precision="bf16").decode(codes, generator=fast_gen)
    codec.decode(codes, generator=plain_gen)
    assert torch.equal(fast_gen.get_state(), plain_gen.get_state())


def test_out_of_range_codes_are_rejected_before_decoding(codec, codes):
    bad = codes.clone()
    bad[3, 10] = 8192
    with pytest.raises(ValueError, match="8192"):
        FastCodec(codec, precision="bf16").decode(bad, generator=torch.Generator())


def test_unknown_precision_is_refused(codec):
    with pytest.raises(ValueError, match="precision"):
        FastCodec(codec, precision="fp8")


def test_snr_of_identical_signals_is_infinite_and_of_noise_is_finite():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    assert snr_db(x, x) == float("inf")
    assert 19.0 < snr_db(x, x + 0.1 * torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))) < 21.0


# ------------------------------------------------------------------------------------------- compiled estimator

@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from empty dynamo caches (they are per code object, shared across instances)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def probe(codec):
    """One estimator input as the solver builds it ([2, 744, in_channels]) and its timestep."""
    x = torch.randn(2, 744, codec.config.in_channels, generator=torch.Generator().manual_seed(4))
    return x, torch.tensor([0.3, 0.3])


def test_compiled_fp32_decode_matches_the_eager_fast_codec(codec, codes, reference, fresh_dynamo):
    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend="aot_eager")
    assert fast.compiled and fast.compile_seconds is None  # compiled by the first call
    out = fast.decode(codes, generator=torch.Generator().manual_seed(0))
    assert fast.compiled and fast.compile_error is None and fast.compile_seconds > 0
    # aot_eager runs the traced whole graph with the eager ATen kernels: bitwise equal on torch 2.13;
    # asserted to 1e-6 absolute (the audio peaks near 0.1)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_compiled_bf16_window_solve_matches_the_eager_one(codec, codes, fresh_dynamo):
    mu = codec.flow_matching.conditioning(codes[:, :372])
    with torch.inference_mode():
        eager = FastCodec(codec, precision="bf16").solve(mu, None, torch.Generator().manual_seed(0))
        compiled = FastCodec(codec, precision="bf16", compile=True, compile_backend="aot_eager")
        out = compiled.solve(mu, None, torch.Generator().manual_seed(0))
    assert compiled.compiled
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)


def test_the_compiled_estimator_is_built_once_and_never_recompiled(codec, codes, fresh_dynamo, monkeypatch):
    compiles, graphs, real_compile = [], [], torch.compile

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", lambda target, **k: compiles.append((target, k)) or real_compile(target, **k))
    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend=counting_backend, compile_scope="model")
    mu = codec.flow_matching.conditioning(codes[:, :372])
    with torch.inference_mode():
        latents = fast.solve(mu, None, torch.Generator().manual_seed(0))
        fast.solve(mu, latents[-104:], torch.Generator().manual_seed(1))  # 20 calls, with and without prefix
    # two compiled callables, made once: the whole estimator and the SQ decoder (not called by a solve)
    assert [target for target, _ in compiles] == [fast.estimator, fast.scalar_model.decode_batch]
    assert all(k["fullgraph"] is True and k["dynamic"] is False for _, k in compiles)
    assert fast.describe()["compiled"] and fast.describe()["sq_compiled"]
    assert len(graphs) == 1  # one whole graph (fullgraph: no breaks), compiled once for all 20 calls


def test_compiling_block_by_block_compiles_one_graph_per_stack_and_matches_eager(codec, codes, fresh_dynamo):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    mu = codec.flow_matching.conditioning(codes[:, :372])
    with torch.inference_mode():
        eager = FastCodec(codec, precision="fp32").solve(mu, None, torch.Generator().manual_seed(0))
        fast = FastCodec(codec, precision="fp32", compile=True, compile_backend=counting_backend,
                         compile_scope="blocks")
        out = fast.solve(mu, None, torch.Generator().manual_seed(0))
        compiled_once = len(graphs)
        fast.solve(mu, out[-104:], torch.Generator().manual_seed(1))  # 10 more calls, with a prefix
    blocks = [*fast.estimator.transformer_blocks, *fast.estimator.transformer_blocks_2]
    assert len(blocks) > 2 and 1 <= compiled_once <= 2  # one graph per stack, shared by the stack's blocks
    assert len(graphs) == compiled_once  # never recompiled
    assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in blocks)  # eager one intact
    assert fast.describe()["compile_scope"] == "blocks" and fast.compiled
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="compile_scope"):
        FastCodec(codec, precision="fp32", compile_scope="layers")


def test_a_failing_torch_compile_falls_back_to_eager_and_says_so(codec, probe, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="gpu_worker.codec.fast_codec"):
        fast = FastCodec(codec, precision="fp32", compile=True)
    assert not fast.compiled and "no C compiler" in fast.compile_error
    assert "running it eager" in caplog.text
    with torch.inference_mode():
        assert torch.equal(fast._estimate(*probe), codec.flow_matching.estimator(*probe))
    assert fast.describe()["compiled"] is False and fast.describe()["compile_requested"] is True


def test_a_compile_failing_at_the_first_call_falls_back_to_eager(codec, probe, fresh_dynamo, caplog):
    def backend(graph_module, example_inputs):
        raise RuntimeError("triton is missing")

    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend=backend)
    assert fast.compiled  # not known before the first call
    with caplog.at_level(logging.WARNING, logger="gpu_worker.codec.fast_codec"), torch.inference_mode():
        out = fast._estimate(*probe)
        again = fast._estimate(*probe)
    assert torch.equal(out, codec.flow_matching.estimator(*probe)) and torch.equal(again, out)
    assert not fast.compiled and "triton is missing" in fast.compile_error and fast.compile_seconds is None
    assert "running it eager" in caplog.text


def test_compile_is_on_by_default_only_on_cuda_and_not_for_the_fp32_reference(codec):
    fast = FastCodec(codec, precision="bf16")
    assert not fast.compile_requested and not fast.compiled
    cuda = torch.device("cuda")
    assert compile_by_default(cuda, "bf16") and compile_by_default(cuda, "tf32")
    assert not compile_by_default(cuda, "fp32") and not compile_by_default(torch.device("cpu"), "bf16")


def test_inductor_compiled_fp32_decode_matches_eager(codec, codes, reference, fresh_dynamo):
    fast = FastCodec(codec, precision="fp32", compile=True)
    out = fast.decode(codes, generator=torch.Generator().manual_seed(0))
    assert fast.compiled and fast.sq_compiled and fast.describe()["compile_error"] is None
    # fused reductions and vectorised exp/cos: not bitwise, but far inside the 30 dB admission bar
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-6)
    assert snr_db(reference, out) > 80.0


def test_precomputed_rope_tables_are_exactly_the_ones_the_forward_builds(codec):
    estimator = codec.flow_matching.estimator
    x = torch.randn(2, 20, codec.config.in_channels, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.2])
    rope = estimator.rope_tables(20, device=x.device, dtype=x.dtype)
    with torch.inference_mode():
        assert torch.equal(estimator(x, t, rope), estimator(x, t))


# ----------------------------------------------------------------------------------------- batched SQ decoder
# (the fast codec's default, 4 windows per SQ pass, is also covered by the bitwise fp32 test above: its two
# windows go through the SQ decoder together there)

@pytest.fixture(scope="module")
def three_windows(codec):
    """A 3-window song decoded the way decode did before SQ batching: solve, SQ-decode, cross-fade, per window.

    -> (codes, audio, each window's latents)."""
    codes = torch.randint(0, 8192, (8, 700), generator=torch.Generator().manual_seed(2))
    plan = plan_windows(700)
    assert plan.num_windows == 3
    padded = codes[:, torch.arange(plan.padded_frames) % plan.frames]
    generator, out, solved = torch.Generator().manual_seed(0), torch.empty(2, plan.output_samples), []
    latents = None
    with torch.inference_mode():
        for w in range(plan.num_windows):
            prefix = None if latents is None else latents[-PREFIX_LATENTS:]
            latents, audio = codec.decode_window(padded[:, plan.window(w)], prefix, generator)
            overlap_add(out, audio.float(), w)
            solved.append(latents)
    return codes, out[:, :plan.cropped_samples], solved


def test_sq_decoding_two_windows_at_a_time_is_bitwise_per_window_decoding(codec, three_windows):
    codes, reference, _ = three_windows
    calls = []
    out = codec.decode(codes, generator=torch.Generator().manual_seed(0), sq_batch_windows=2,  # (0, 1), then (2)
                       progress=lambda done, total: calls.append((done, total)))
    assert torch.equal(out, reference)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_sq_decoding_all_windows_in_one_pass_is_bitwise_per_window_decoding(codec, three_windows):
    codes, reference, solved = three_windows
    replayed = iter(enumerate(solved))

    def solve_window(window_codes, prefix, generator):  # the recorded solves, checking the prefixes handed on
        w, latents = next(replayed)
        assert prefix is None if w == 0 else torch.equal(prefix, solved[w - 1][-PREFIX_LATENTS:])
        return latents

    batches = []

    def decode_latents(latents):
        batches.append(latents.shape[0])
        return codec.scalar_model.decode_batch(latents)

    out = codec.decode(codes, generator=torch.Generator(), solve_window=solve_window, decode_latents=decode_latents,
                       sq_batch_windows=8)
    assert batches == [3] and torch.equal(out, reference)


def test_sq_batch_of_zero_windows_is_refused(codec, codes):
    with pytest.raises(ValueError, match="sq_batch_windows"):
        FastCodec(codec, precision="fp32", sq_batch_windows=0)
    with pytest.raises(ValueError, match="sq_batch_windows"):
        codec.decode(codes, generator=torch.Generator(), sq_batch_windows=0)


def test_a_failing_compiled_sq_decoder_falls_back_to_the_eager_one_and_says_so(codec, caplog):
    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend="aot_eager")
    assert fast.describe()["sq_compiled"] is True

    def broken(latents):
        raise RuntimeError("inductor could not lower a convolution")

    fast._compiled_sq = broken
    channels = codec.scalar_model.latent_hidden_dim * codec.scalar_model.num_samples
    latents = torch.randn(1, 744, channels, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="gpu_worker.codec.fast_codec"), torch.inference_mode():
        audio = fast.decode_latents(latents)
        assert torch.equal(audio, codec.scalar_model.decode_batch(latents))
    described = fast.describe()
    assert described["sq_compiled"] is False and "could not lower" in described["sq_compile_error"]
    assert "SQ decoder: compiling it failed" in caplog.text


def _a_capture_is_refused_on_another_thread() -> bool:
    """What the generation engine's thread would be told: may it capture a frame-step graph now?"""
    refused: list[bool] = []

    def engine_thread() -> None:
        with graph_captures.capture_unless_busy() as free:
            refused.append(not free)

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join(10)
    return refused == [True]


def test_the_codec_compiles_while_no_other_thread_may_capture_a_graph(codec, codes, probe, fresh_dynamo):
    """A capture on another thread would claim the default CUDA generator that a compile draws from."""
    refused_during_compile: list[bool] = []

    def backend(graph_module, example_inputs):
        refused_during_compile.append(_a_capture_is_refused_on_another_thread())
        return graph_module.forward

    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend=backend)
    with torch.inference_mode():
        fast._estimate(*probe)
        fast.decode_latents(torch.randn(1, 744, codec.config.out_channels))
        fast._estimate(*probe)
    # the estimator's compiles (one per stack's block shape) and the SQ decoder's
    assert len(refused_during_compile) >= 2 and all(refused_during_compile)
    assert fast.compiled and fast.sq_compiled
    assert not _a_capture_is_refused_on_another_thread()  # once compiled, captures are free again


def test_a_capture_in_flight_makes_a_compile_wait_for_it():
    order: list[str] = []
    with graph_captures.capture_unless_busy() as free:
        assert free
        about_to_compile = threading.Event()

        def compile_() -> None:
            about_to_compile.set()
            with graph_captures.exclusive():
                order.append("compile")

        compiler = threading.Thread(target=compile_)
        with graph_captures.exclusive():  # re-entrant on the capturing thread itself
            pass
        compiler.start()
        assert about_to_compile.wait(10)
        compiler.join(0.5)
        assert compiler.is_alive() and order == []  # waiting for the capture to end
        order.append("capture ends")
    compiler.join(10)
    assert order == ["capture ends", "compile"]


def test_out_of_memory_at_the_first_compiled_call_is_raised_and_the_next_call_compiles(codec, probe, fresh_dynamo):
    """Not a compile failure (code review L10): the stage retries the OOM, and the codec is not left eager."""
    calls: list[int] = []

    def backend(graph_module, example_inputs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return graph_module.forward

    fast = FastCodec(codec, precision="fp32", compile=True, compile_backend=backend)
    with torch.inference_mode():
        with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
            fast._estimate(*probe)
        assert fast.compiled and fast.compile_error is None  # still pending, not fallen back
        out = fast._estimate(*probe)
    assert len(calls) >= 2 and fast.compiled and fast.compile_seconds is not None  # compiled again, then per stack
    torch.testing.assert_close(out, codec.flow_matching.estimator(*probe), rtol=0, atol=1e-6)
