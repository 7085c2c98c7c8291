"""HeartCodec decoding, the fast path: the plain `HeartCodec.decode` with a faster estimator (spec §9 lever 5).

The flow-matching estimator is ~95 % of the codec's work (44 TFLOP per window, 100 calls per 240 s song).
`FastCodec` runs it
* at a lower matmul precision, chosen by `precision` and admitted only behind a measured SNR check
  against fp32 (bench/bench_fast.py):
  - "tf32": the fp32 model with TF32 matmuls;
  - "bf16-mixed": bf16 weight copies under bf16 autocast, fp32 input, so the residual stream, norms
    and RoPE stay fp32 while the GEMMs, convolutions and attention run in bf16;
  - "bf16": the whole estimator in bf16 (activations too; RoPE tables stay fp32);
  - "fp32": no precision change (graphs only);
* compiled with `torch.compile(..., fullgraph=True, dynamic=False)` block by block (`compile`, `compile_scope`,
  below);
* optionally with the SQ decoder in bf16 (`sq_dtype`), also only behind the SNR check;
* as one CUDA graph per estimator call (static [2, 744, 1024] input: every window has 744 latents),
  replayed 10 times per window;
* with the SQ decoder run over `sq_batch_windows` solved windows at once (one conv pass, the windows'
  stereo streams as batch rows): the same audio as one window at a time (bitwise in fp32 on the CPU; on
  the GPU cuDNN may pick another algorithm for another batch size, so equal to rounding).
Everything else is the plain path: the same windows, the same `randn [1, 744, 256]` per window from the
caller's generator, the Euler update and CFG mix in fp32, the SQ decoder in the codec's dtype, the same
overlap-add. The RoPE tables are built once per sequence length by the estimator's own `rope_tables`
(the values its forward would build). On the CPU the same code runs without graphs.

Compile. With eager kernels, a bf16 window spends more GPU time in elementwise kernels (RMSNorm, the adaLN
modulation x*(1+scale)+shift, gates, residual adds, RoPE, SiLU*up: ~11,750 small kernels, 94 of 224 ms
on an H100) than in its GEMMs (85 ms). Inductor fuses each such chain into one Triton kernel (and into
the reductions of the norms) and leaves the GEMMs and attention to cuBLAS / SDPA, so the estimator
reads and writes its activations a few times instead of once per elementwise op. It is inductor's
default mode, not "reduce-overhead": this class captures the compiled call in its own
`torch.cuda.CUDAGraph`; the warm-up call before the capture compiles (and autotunes) it, so the graph
holds the compiled kernels. The compiled estimator is made once per `FastCodec` (the GPU worker keeps
one per codec, model_cache.get_fast_codec), so a warm worker never compiles again; the first decode
of a worker pays the compile (`compile_seconds`; bench/bench_fast.py's "first call s" measures it on
the card; the tiny estimator takes ~30 s cold on a 2-core CPU, inductor's on-disk caches make a
later process faster).
`compile=None` turns it on for CUDA with a precision other than "fp32" ("fp32" stays the eager,
bitwise reference). A compiled estimator is not bitwise the eager one (fused reductions, other
cos/exp code); it is admitted behind the same SNR check as the precisions.

Fallback: if `torch.compile`, the first compiled call or the graph capture of the compiled call raises
(no Triton, no C compiler, an inductor bug), a warning is logged and the eager estimator is used (and
captured) from then on; out of device memory there is not a compile failure: it is raised as the
OutOfMemoryError it is (the stage retries it once) and the next call compiles again. `compiled` says
which one runs (False after a fallback, with `compile_error`),
`compile_seconds` how long the first compiled call took; `describe()` gives both for a stage record.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from gpu_worker.generation import graph_captures
from gpu_worker.model.heartcodec import (
    HeartCodec,
    RopeTables,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16-mixed", "bf16")
# What torch.compile gets: each transformer block on its own ("blocks", the default: regional compilation, one
# compile per stack's block shape reused by the stack's other blocks, the projections and adaLN parts between
# them eager inside the CUDA graph), or the whole estimator as one graph ("model"). Blocks compile about 4x
# faster on a new machine, for the same window speed and SNR (bench/codec_compile_scope.py, bench/RESULTS.md).
COMPILE_SCOPES = ("model", "blocks")
# Windows per SQ decoder pass. On an H100 4 windows per pass took as long per window as 1 (55-60 ms) and
# peaked 5 GB higher; one window also means one shape for the compiled SQ decoder.
SQ_BATCH_WINDOWS = 1


def compile_by_default(device: torch.device, precision: str) -> bool:
    """`compile=None`: compile on CUDA, except "fp32", which stays the eager reference (and the CPU: slow to
    compile, little to gain)."""
    return device.type == "cuda" and precision != "fp32"


class FastCodec:
    def __init__(self, codec: HeartCodec, *, precision: str = "bf16", use_graphs: bool | None = None,
                 sq_dtype: torch.dtype | None = None, compile: bool | None = None,
                 compile_backend: str | Callable[..., Any] = "inductor", compile_scope: str = "blocks",
                 sq_batch_windows: int = SQ_BATCH_WINDOWS):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        self.compile_scope = compile_scope
        if sq_batch_windows < 1:
            raise ValueError(f"sq_batch_windows must be >= 1, got {sq_batch_windows}")
        self.codec = codec
        self.precision = precision
        self.device = codec.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        estimator = codec.flow_matching.estimator
        if precision in ("bf16", "bf16-mixed"):
            estimator = copy.deepcopy(estimator).to(torch.bfloat16)
        self.estimator = estimator
        self.input_dtype = torch.bfloat16 if precision == "bf16" else codec.dtype
        # the dtype `Estimator._stack` sees its activations in, which picks the RoPE table dtype
        self._activation_dtype = estimator.proj_in.ffn_2.weight.dtype
        self._ropes: dict[int, RopeTables] = {}
        # the SQ decoder in another dtype (a copy), or the codec's own in the codec's dtype
        self.scalar_model = codec.scalar_model
        if sq_dtype is not None and sq_dtype != codec.dtype:
            self.scalar_model = copy.deepcopy(codec.scalar_model).to(sq_dtype)
        self.sq_dtype = sq_dtype or codec.dtype
        self.sq_batch_windows = sq_batch_windows
        # compile: built once here, compiled by the first call (the graph warm-up on CUDA)
        self.compile_requested = compile_by_default(self.device, precision) if compile is None else compile
        self.compile_error: str | None = None
        self.compile_seconds: float | None = None
        self._compiled_estimator: Callable[..., torch.Tensor] | None = None
        self._compile_pending = False
        if self.compile_requested:
            try:
                self._compiled_estimator = _compiled(estimator, compile_scope, compile_backend)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eager
                self._fall_back(exc)
            else:
                self._compile_pending = True
        # The SQ decoder is memory-bound on its elementwise work (padding copies, PReLUs, residual adds over
        # tensors of up to 64 channels x 1.4 M samples); compiled, those fuse around the cuDNN convolutions.
        # Its arithmetic stays in sq_dtype (fp32 by default), so the audio moves by rounding only.
        self._compiled_sq: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._sq_compile_pending = True
        self.sq_compile_error: str | None = None
        if self.compiled:
            try:
                self._compiled_sq = torch.compile(self.scalar_model.decode_batch, fullgraph=True, dynamic=False,
                                                  backend=compile_backend)
            except Exception as exc:  # noqa: BLE001
                self._sq_fall_back(exc)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: torch.Tensor | None = None
        self._timestep: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None

    @property
    def compiled(self) -> bool:
        """True while the compiled estimator is the one in use."""
        return self._compiled_estimator is not None

    @property
    def sq_compiled(self) -> bool:
        return self._compiled_sq is not None

    def _sq_fall_back(self, exc: Exception) -> None:
        self._compiled_sq, self.sq_compile_error = None, _error_text(exc)
        logger.warning("SQ decoder: compiling it failed, running it eager (%s)", self.sq_compile_error,
                       exc_info=exc)

    def _fall_back(self, exc: Exception) -> None:
        self._compiled_estimator, self._compile_pending = None, False
        self.compile_error = _error_text(exc)
        logger.warning("codec estimator: compiling it failed, running it eager (%s)", self.compile_error,
                       exc_info=exc)

    def _precision(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.precision == "tf32":
            stack.enter_context(_matmul_tf32())
        if self.precision == "bf16-mixed":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack

    def _rope(self, seq_len: int) -> RopeTables:
        if seq_len not in self._ropes:
            self._ropes[seq_len] = self.estimator.rope_tables(seq_len, device=self.device,
                                                              dtype=self._activation_dtype)
        return self._ropes[seq_len]

    def _run_estimator(self, inputs: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The estimator (compiled or eager) on inputs already in `input_dtype`, under the caller's precision."""
        rope = self._rope(inputs.shape[1])
        if self._compile_pending:  # the first compiled call compiles; a failure falls back to eager
            assert self._compiled_estimator is not None  # pending: torch.compile returned it
            started = time.perf_counter()
            try:
                with graph_captures.exclusive():  # no frame-step capture claims the generator meanwhile
                    out = self._compiled_estimator(inputs, timestep, rope)
            except Exception as exc:  # noqa: BLE001
                _raise_if_out_of_memory(exc)  # not a compile failure: the compile stays pending
                self._fall_back(exc)
            else:
                self._compile_pending = False
                self.compile_seconds = time.perf_counter() - started
                logger.info("codec estimator compiled (%s, first call %.1f s)", self.precision,
                            self.compile_seconds)
                return out
        if self._compiled_estimator is not None:
            return self._compiled_estimator(inputs, timestep, rope)
        return self.estimator(inputs, timestep, rope)

    def _estimate(self, inputs: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Velocity [2, S, C] in the codec dtype for inputs [2, S, in_channels] (any dtype) and t [2]."""
        if not self.use_graphs:
            with self._precision():
                return self._run_estimator(inputs.to(self.input_dtype), timestep).to(self.codec.dtype)
        if self._graph is None or self._inputs is None or self._inputs.shape != inputs.shape:
            self._capture(inputs.shape)
        assert self._graph is not None and self._inputs is not None and self._timestep is not None \
            and self._velocity is not None  # _capture set them
        self._inputs.copy_(inputs)
        self._timestep.copy_(timestep)
        self._graph.replay()
        return self._velocity

    def _capture(self, shape: torch.Size) -> None:
        self._inputs = torch.zeros(shape, dtype=self.input_dtype, device=self.device)
        self._timestep = torch.zeros(shape[0], dtype=torch.float32, device=self.device)
        self._rope(shape[1])  # the tables exist before the capture, outside the graph's pool
        try:
            self._warm_up_and_capture()
        except Exception as exc:  # noqa: BLE001
            _raise_if_out_of_memory(exc)
            if self._compiled_estimator is None:
                raise
            self._fall_back(exc)  # the compiled call would not capture: capture the eager estimator instead
            self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> None:
        with graph_captures.exclusive():  # the compile (warm-up) and the capture, apart from the engine's captures
            self._warm_up_and_capture_alone()

    def _warm_up_and_capture_alone(self) -> None:
        inputs, timestep = self._inputs, self._timestep
        assert inputs is not None and timestep is not None  # _capture allocated them
        self._graph = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), self._precision():
            # warm-up: compiles (or falls back), autotunes, creates kernels and cuBLAS handles
            self._run_estimator(inputs, timestep)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._precision():
            self._velocity = self._run_estimator(inputs, timestep).to(self.codec.dtype)
        self._graph = graph

    def solve(self, mu: torch.Tensor, prefix: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """FlowMatching.solve with the estimator replaced; the same draws and the same fp32 Euler update."""
        return self.codec.flow_matching.solve(mu, prefix, generator, estimate=self._estimate)

    def solve_window(self, codes: torch.Tensor, prefix: torch.Tensor | None,
                     generator: torch.Generator) -> torch.Tensor:
        """HeartCodec.solve_window with the fast estimator."""
        return self.solve(self.codec.flow_matching.conditioning(codes), prefix, generator)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """ScalarModel.decode_batch in `sq_dtype`: latents [N, S, C] -> audio [N, 2, S*1920]."""
        latents = latents.to(self.sq_dtype)
        if self._compiled_sq is not None:
            try:
                if self._sq_compile_pending:  # the first call compiles: apart from the engine's captures
                    with graph_captures.exclusive():
                        out = self._compiled_sq(latents)
                    self._sq_compile_pending = False
                    return out
                return self._compiled_sq(latents)
            except Exception as exc:  # noqa: BLE001 - a compile failure: the eager SQ decoder from now on
                _raise_if_out_of_memory(exc)
                self._sq_fall_back(exc)
        return self.scalar_model.decode_batch(latents)

    def decode(self, codes: torch.Tensor, *, generator: torch.Generator,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """HeartCodec.decode's contract: codes [8, T] -> float32 [2, T*3840] on the CPU."""
        return self.codec.decode(codes, generator=generator, progress=progress, solve_window=self.solve_window,
                                 decode_latents=self.decode_latents, sq_batch_windows=self.sq_batch_windows)

    def describe(self) -> dict[str, Any]:
        """What ran, for a stage record: precision, SQ dtype and batch, graphs, compile outcome."""
        return {"precision": self.precision, "sq_dtype": str(self.sq_dtype).removeprefix("torch."),
                "sq_batch_windows": self.sq_batch_windows, "cuda_graphs": self.use_graphs,
                "compile_requested": self.compile_requested, "compile_scope": self.compile_scope,
                "compiled": self.compiled,
                "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
                "compile_error": self.compile_error, "sq_compiled": self.sq_compiled,
                "sq_compile_error": self.sq_compile_error}


def _compiled(estimator: torch.nn.Module, scope: str, backend: str | Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """The estimator under torch.compile, whole or block by block (a shallow copy holding compiled blocks, so
    the eager estimator stays as it is for a fallback)."""
    if scope == "model":
        return torch.compile(estimator, fullgraph=True, dynamic=False, backend=backend)
    regional = copy.copy(estimator)
    regional._modules = dict(estimator._modules)  # the copy's own module table; parameters stay shared
    for name in ("transformer_blocks", "transformer_blocks_2"):
        blocks = getattr(estimator, name)
        compiled = [torch.compile(block, fullgraph=True, dynamic=False, backend=backend) for block in blocks]
        setattr(regional, name, torch.nn.ModuleList(compiled))  # type: ignore[arg-type]  # OptimizedModules
    return regional


def _raise_if_out_of_memory(exc: BaseException) -> None:
    """Out of device memory on a first compiled call is not a failure of the compile: raise it as the
    OutOfMemoryError it is (the stage retries it once), and keep compiling pending for the next call."""
    seen: BaseException | None = exc
    for _ in range(8):  # the compiler wraps its errors (BackendCompilerFailed.inner_exception, __cause__)
        if seen is None:
            return
        if isinstance(seen, torch.OutOfMemoryError):
            if seen is exc:
                raise exc
            raise torch.OutOfMemoryError(str(seen)) from exc
        seen = getattr(seen, "inner_exception", None) or seen.__cause__


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


@contextlib.contextmanager
def _matmul_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def snr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |test - ref|^2) over all samples, in float64."""
    reference, test = reference.double(), test.double()
    noise = (test - reference).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
