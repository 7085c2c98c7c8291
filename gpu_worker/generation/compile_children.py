"""The processes that compile the frame step's Triton kernels at a GPU worker's start (torch-free).

The compiling itself is gpu_worker/generation/compile_child.py, run as `python -m` in each child: it needs
no GPU, and no torch where a recorded manifest of the kernel calls matches the checkpoint, so the children
can start before the worker has imported torch or made its CUDA context. The GPU
worker's entry module starts them first thing (`start_for_worker`); the engine does not wait for them
(on a restart every kernel is already cached, and waiting measured slower; bench/RESULTS.md). This module imports
neither torch nor Triton, so starting the children costs the worker almost nothing (docs/streaming.md,
"Cold start").
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpu_worker.generation import warmup_stamp

log = logging.getLogger(__name__)

MAX_CHILDREN = 10  # about the number of kernels one frame step asks for (bench/RESULTS.md)
CHILD_TIMEOUT_S = 300.0
CHILD_NICENESS = 10
HALF_DTYPES = ("bfloat16", "float16")
_CU_COMPUTE_CAPABILITY_MAJOR, _CU_COMPUTE_CAPABILITY_MINOR = 75, 76


@dataclasses.dataclass(frozen=True)
class CompileReport:
    seconds: float
    children: int
    asked: int  # distinct kernels the frame step asked for (each child sees them all)
    compiled: int  # kernels the children compiled or found in the cache, together
    launchers: int
    source: str  # how the children found the kernels: "manifest" (no torch), "trace", or "mixed"



def _cuda_driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    status = lib.cuInit(0)
    if status:
        raise RuntimeError(f"CUDA driver error {status} at cuInit")
    return lib


def cuda_device_count() -> int:
    """CUDA devices visible to this process, from the driver library alone (0 without one)."""
    try:
        lib = _cuda_driver()
    except (OSError, RuntimeError):
        return 0
    count = ctypes.c_int()
    return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def cuda_capability(ordinal: int) -> int:
    """Compute capability of CUDA device `ordinal` (90 for sm_90) from the driver library alone: no context
    is made, so it costs nothing of the device and can come before the worker's own CUDA start."""
    lib = _cuda_driver()
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    for status in (lib.cuDeviceGet(ctypes.byref(device), ordinal),
                   lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_COMPUTE_CAPABILITY_MAJOR, device),
                   lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_COMPUTE_CAPABILITY_MINOR, device)):
        if status:
            raise RuntimeError(f"CUDA driver error {status} reading the capability of device {ordinal}")
    return major.value * 10 + minor.value


def child_count(cpus: int | None = None) -> int:
    """Compiling processes to start: one core left to the worker itself, at most `MAX_CHILDREN`."""
    available = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(MAX_CHILDREN, available - 1))


class CompileChildren:
    """Running compile children; `wait` collects them once (any thread, any number of times)."""

    def __init__(self, procs: list[subprocess.Popen[str]], stamp: Path | None = None):
        self.procs, self.started, self.stamp = procs, time.monotonic(), stamp
        self._lock = threading.Lock()
        self._report: CompileReport | None = None
        self._error: RuntimeError | None = None

    def wait(self, timeout: float = CHILD_TIMEOUT_S) -> CompileReport:
        """Their joint report; raises RuntimeError if any failed or ran past `timeout` (then killed)."""
        with self._lock:
            if self._report is None and self._error is None:
                self._collect(timeout)
            if self._error is not None:
                raise self._error
            assert self._report is not None
            return self._report

    def _collect(self, timeout: float) -> None:
        failures, reports = [], []
        deadline = self.started + timeout
        for k, proc in enumerate(self.procs):
            try:
                out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            if proc.returncode:
                failures.append(f"share {k}/{len(self.procs)}: exit {proc.returncode}: {err.strip()[-500:]}")
            else:
                reports.append(json.loads(out.strip().splitlines()[-1]))
        if failures:
            self._error = RuntimeError("kernel warm-up children failed: " + "; ".join(failures))
            return
        self._report = CompileReport(seconds=time.monotonic() - self.started, children=len(self.procs),
                                     asked=max(r["asked"] for r in reports),
                                     compiled=sum(r["compiled"] for r in reports),
                                     launchers=sum(r["launchers"] for r in reports),
                                     source=_joint_source({r["source"] for r in reports}))
        if self.stamp is not None and 0 < self._report.asked <= self._report.compiled:
            try:
                warmup_stamp.write_stamp(self.stamp, dataclasses.asdict(self._report))
            except OSError:
                log.exception("kernel warm-up stamp not written; the next start compiles again")


def _joint_source(sources: set[str]) -> str:
    return sources.pop() if len(sources) == 1 else "mixed"


def start_children(checkpoint_root: Path, dtype: str, capability: int, children: int | None = None,
                   stamp: Path | None = None, manifests: Path | None = None) -> CompileChildren:
    """Start `children` (default `child_count()`) processes, each compiling its share of the frame step's
    kernels for the LM under `checkpoint_root` in `dtype` on a card of `capability`, into the Triton cache
    directory this process uses (the environment is inherited, less TRITON_INTERPRET: they compile for the
    card). `manifests`: the folder of recorded kernel manifests (default: the shipped ones)."""
    count = child_count() if children is None else children
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gpu_worker.generation.compile_child", "--checkpoint", str(checkpoint_root),
         "--dtype", dtype, "--capability", str(capability), "--share", f"{k}/{count}",
         *(["--manifests", str(manifests)] if manifests is not None else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(count)]
    for proc in procs:  # an optimisation: the worker's own start comes first on a busy host
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, CHILD_NICENESS)
    return CompileChildren(procs, stamp)


def _device_ordinal(device: str) -> int | None:
    """The CUDA ordinal `device` (a SONGPIPE_DEVICE value) means, or None for no CUDA device."""
    if device == "auto":
        return 0 if cuda_device_count() else None
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        return None  # not CUDA, or a malformed value that resolve_device refuses, naming SONGPIPE_DEVICE
    return int(index) if index else 0


def should_compile(settings: Any) -> bool:
    """Where the engine runs the fused kernels in this process: a CUDA device, a half-precision LM, Triton
    installed, the batching engine (threads mode: the process that starts the children runs the tasks),
    and SONGPIPE_KERNEL_WARMUP on."""
    if not settings.kernel_warmup or settings.lm_dtype not in ("auto", *HALF_DTYPES):
        return False
    if importlib.util.find_spec("triton") is None or _device_ordinal(settings.device) is None:
        return False
    return settings.gpu_batching is not False  # unset: batching is the default on CUDA


def _lm_dtype_name(settings: Any) -> str:
    return "bfloat16" if settings.lm_dtype == "auto" else settings.lm_dtype


_running: CompileChildren | None = None
_running_lock = threading.Lock()


def start_for_worker(settings: Any) -> CompileChildren | None:
    """Start the children for this worker's checkpoint and device once, where `should_compile`; the ones
    already started otherwise. None where nothing is compiled (or the card cannot be read: logged, and the
    first frame compiles), and where a stamp says an earlier warm-up of this configuration completed."""
    global _running
    with _running_lock:
        if _running is None and should_compile(settings):
            ordinal = _device_ordinal(settings.device)
            assert ordinal is not None
            try:
                root, dtype, capability = settings.resolved_checkpoint_dir, _lm_dtype_name(settings), \
                    cuda_capability(ordinal)
                stamp = warmup_stamp.stamp_path(root, dtype, capability)
                if stamp is not None and stamp.exists():
                    log.info("frame kernels already compiled for this configuration (%s)", stamp)
                    return None
                _running = start_children(root, dtype, capability, stamp=stamp)
            except (OSError, RuntimeError):
                log.exception("kernel warm-up not started; the first frame compiles the kernels")
        return _running
