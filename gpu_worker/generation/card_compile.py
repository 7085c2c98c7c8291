"""Triton told a card's target and asked to compile kernels instead of launching them (torch-free).

Triton keys a compiled kernel by its source, its constants, how its arguments specialise (dtype,
alignment, divisibility by 16, the value 1) and the target (CUDA, compute capability, warp size), never
by the card it runs on. So a process with no CUDA context, no device memory and no torch can fill the
Triton cache for a card, as long as Triton sees that card's target and launches nothing: `compile_only`
arranges both, and `recording_only` (same target, nothing compiled) lists the distinct kernels asked for.
gpu_worker/generation/kernel_warmup.py (the frame step on the meta device) and
gpu_worker/generation/kernel_manifest.py (a recorded list of the step's kernel calls) ask for the kernels.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

WARP_SIZE = 32


class _CompileOnlyDriver:
    """Triton's view of the card while compiling only: the target given, device 0, stream 0. Whatever else
    is asked of it (a launcher's helpers) comes from the real CUDA driver, where its library loads."""

    def __init__(self, target: Any):
        self.target = target
        self._real: Any = None

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    @property
    def launcher_cls(self) -> Any:
        """The class that builds a kernel's C launcher. Taken from the CUDA driver module, not from a driver
        object: making one imports torch, which a manifest's compile child keeps out."""
        from triton.backends.nvidia.driver import CudaLauncher

        return CudaLauncher

    def get_active_torch_device(self) -> Any:
        import torch  # only a benchmarking helper of Triton's asks; the compile path never does

        return torch.device("meta")

    def __getattr__(self, name: str) -> Any:
        if self._real is None:
            from triton.backends.nvidia.driver import CudaDriver

            self._real = CudaDriver()  # loads libcuda; no context, no device memory
        return getattr(self._real, name)


@contextlib.contextmanager
def _card_target(capability: int, hook: Callable[..., bool], run: Callable[..., Any]) -> Iterator[_CompileOnlyDriver]:
    """Inside, Triton sees a CUDA card of `capability` (90: sm_90), asks `hook` whether to skip each kernel
    not yet compiled in this process (Triton's jit_cache_hook), and `JITFunction.run` is `run`."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    fake = _CompileOnlyDriver(GPUTarget("cuda", capability, WARP_SIZE))
    real_run = JITFunction.run
    saved_hook, saved_driver = knobs.runtime.jit_cache_hook, getattr(driver, "_active", None)
    driver.set_active(fake)
    knobs.runtime.jit_cache_hook = hook
    JITFunction.run = run  # type: ignore[method-assign]
    try:
        yield fake
    finally:
        JITFunction.run = real_run  # type: ignore[method-assign]
        knobs.runtime.jit_cache_hook = saved_hook
        driver.set_active(saved_driver)  # not reset_active(): that makes a real driver, which a CPU host lacks


@contextlib.contextmanager
def compile_only(capability: int, share: tuple[int, int] = (0, 1)) -> Iterator[dict[str, int]]:
    """Inside, a Triton kernel asked for is compiled for a CUDA card of `capability` into the Triton cache,
    and never launched. `share` (k, n): only the k-th of every n distinct kernels (in the order first asked
    for) is compiled; the others are skipped. Yields counts: kernels asked for, compiled, launchers built."""
    from triton.runtime.jit import JITFunction

    index, count = share
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count}")
    seen: dict[tuple[str, str], int] = {}
    done: set[int] = set()
    counts = {"asked": 0, "compiled": 0, "launchers": 0}
    real_run = JITFunction.run

    def skip_others(*, key: Any, fn: Any, **_kwargs: Any) -> bool:
        ordinal = seen.setdefault((fn.name, str(key)), len(seen))
        return ordinal % count != index  # True: not compiled here

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        counts["asked"] = len(seen)
        if kernel is not None and id(kernel) not in done:
            done.add(id(kernel))
            counts["compiled"] += 1
            with contextlib.suppress(Exception):  # no CUDA driver library (a CPU host): the kernel is enough
                fake.launcher_cls(kernel.src, kernel.metadata)
                counts["launchers"] += 1
        return kernel

    with _card_target(capability, skip_others, compile_instead) as fake:
        yield counts


@contextlib.contextmanager
def recording_only(capability: int, describe: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
                   ) -> Iterator[list[Any]]:
    """Inside, nothing is compiled or launched; the list yielded gets `describe(kernel, args, kwargs)` of the
    first call of each distinct kernel (as Triton tells them apart for a card of `capability`), in order."""
    from triton.runtime.jit import JITFunction

    seen: set[tuple[str, str]] = set()
    recorded: list[Any] = []
    asking: list[Any] = []  # the description of the call being bound, for the hook to keep
    real_run = JITFunction.run

    def keep_first(*, key: Any, fn: Any, **_kwargs: Any) -> bool:
        if (fn.name, str(key)) not in seen:
            seen.add((fn.name, str(key)))
            recorded.append(asking[-1])
        return True  # compile nothing

    def describe_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        asking.append(describe(self, args, kwargs))
        real_run(self, *args, grid=grid, warmup=True, **kwargs)

    with _card_target(capability, keep_first, describe_instead):
        yield recorded
