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
* optionally with the SQ decoder in bf16 (`sq_dtype`), also only behind the SNR check;
* as one CUDA graph per estimator call (static [2, 744, 1024] input: every window has 744 latents),
  replayed 10 times per window.
Everything else is the plain path: the same windows, the same `randn [1, 744, 256]` per window from the
caller's generator, the Euler update and CFG mix in fp32, the SQ decoder in the codec's dtype, the same
overlap-add. On the CPU the same code runs without graphs.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from gpu_worker.heartcodec import (
    HeartCodec,
)

PRECISIONS = ("fp32", "tf32", "bf16-mixed", "bf16")


class FastCodec:
    def __init__(self, codec: HeartCodec, *, precision: str = "bf16", use_graphs: bool | None = None,
                 sq_dtype: torch.dtype | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.codec = codec
        self.precision = precision
        self.device = codec.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        estimator = codec.flow_matching.estimator
        if precision in ("bf16", "bf16-mixed"):
            estimator = copy.deepcopy(estimator).to(torch.bfloat16)
        self.estimator = estimator
        self.input_dtype = torch.bfloat16 if precision == "bf16" else codec.dtype
        # the SQ decoder in another dtype (a copy), or the codec's own in the codec's dtype
        self.scalar_model = codec.scalar_model
        if sq_dtype is not None and sq_dtype != codec.dtype:
            self.scalar_model = copy.deepcopy(codec.scalar_model).to(sq_dtype)
        self.sq_dtype = sq_dtype or codec.dtype
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: torch.Tensor | None = None
        self._timestep: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None

    def _precision(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.precision == "tf32":
            stack.enter_context(_matmul_tf32())
        if self.precision == "bf16-mixed":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack

    def _estimate(self, inputs: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Velocity [2, S, C] in the codec dtype for inputs [2, S, in_channels] (any dtype) and t [2]."""
        if not self.use_graphs:
            with self._precision():
                return self.estimator(inputs.to(self.input_dtype), timestep).to(self.codec.dtype)
        if self._graph is None or self._inputs.shape != inputs.shape:
            self._capture(inputs.shape)
        self._inputs.copy_(inputs)
        self._timestep.copy_(timestep)
        self._graph.replay()
        return self._velocity

    def _capture(self, shape: torch.Size) -> None:
        self._inputs = torch.zeros(shape, dtype=self.input_dtype, device=self.device)
        self._timestep = torch.zeros(shape[0], dtype=torch.float32, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), self._precision():
            self.estimator(self._inputs, self._timestep)  # warm-up: kernels and cuBLAS handles
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._precision():
            self._velocity = self.estimator(self._inputs, self._timestep).to(self.codec.dtype)
        self._graph = graph

    def solve(self, mu: torch.Tensor, prefix: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """FlowMatching.solve with the estimator replaced; the same draws and the same fp32 Euler update."""
        return self.codec.flow_matching.solve(mu, prefix, generator, estimate=self._estimate)

    def decode_window(self, codes: torch.Tensor, prefix: torch.Tensor | None,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """HeartCodec.decode_window with the fast estimator and the SQ decoder in `sq_dtype`."""
        latents = self.solve(self.codec.flow_matching.conditioning(codes), prefix, generator)
        return latents, self.scalar_model.decode(latents.to(self.sq_dtype))

    def decode(self, codes: torch.Tensor, *, generator: torch.Generator,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """HeartCodec.decode's contract: codes [8, T] -> float32 [2, T*3840] on the CPU."""
        return self.codec.decode(codes, generator=generator, progress=progress, window_decoder=self.decode_window)


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
