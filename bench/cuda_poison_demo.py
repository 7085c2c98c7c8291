"""A device-side assert poisons its process's CUDA context; a fresh process is clean (run on a GPU).

    .venv/bin/python bench/cuda_poison_demo.py

1. A child process touches CUDA, then makes the seed story's fault for real: an embedding lookup of
   id 8192 into a codebook of 8192 rows on the GPU (gpu_worker.worker.fault_injection.trigger_device_assert),
   synchronised. We print the exception type and message, and what songpipe's classifier says.
2. The same child then tries an unrelated, valid CUDA call: it fails too (the context is poisoned).
3. A fresh process runs the same valid call: it works. This is why the GPU worker records the
   failure and then ends its prefork child (gpu_worker/worker/cuda_health.py).
Exit 0 when all three behave as described. No CUDA: prints so and exits 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _error(exc: BaseException) -> dict:
    from gpu_worker.worker.cuda_health import is_cuda_poison

    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc).strip()[:400],
            "is_cuda_poison": is_cuda_poison(exc)}


def _valid_cuda_call() -> float:
    import torch

    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    return float((x @ x).item())


def child_assert() -> dict:
    import torch

    from gpu_worker.worker.fault_injection import trigger_device_assert

    report: dict = {"pid": os.getpid(), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "before": _valid_cuda_call()}
    started = time.monotonic()
    try:
        trigger_device_assert(torch.device("cuda"))
        report["assert"] = None
    except Exception as exc:  # noqa: BLE001 - the point is to see exactly what is raised
        report["assert"] = _error(exc)
    report["assert_s"] = round(time.monotonic() - started, 3)
    try:
        report["after"] = {"ok": True, "value": _valid_cuda_call()}
    except Exception as exc:  # noqa: BLE001
        report["after"] = {"ok": False, **_error(exc)}
    return report


def child_fresh() -> dict:
    return {"pid": os.getpid(), "value": _valid_cuda_call()}


def _run_child(mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"exit_code": done.returncode, "stderr_tail": done.stderr[-2000:]}
    return {"exit_code": done.returncode, **json.loads(lines[-1])}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_assert() if sys.argv[2] == "assert" else child_fresh()))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine (the CPU simulation is in bench/chaos.py)")
        return 2
    poisoned = _run_child("assert")
    fresh = _run_child("fresh")
    assert_error = poisoned.get("assert") or {}
    after = poisoned.get("after") or {}
    checks = {
        "device-side assert raised": "device-side assert" in assert_error.get("message", ""),
        "classified as CUDA poison (worker replaces its process)": bool(assert_error.get("is_cuda_poison")),
        "next CUDA call in the same process fails": after.get("ok") is False,
        "a fresh process computes normally": fresh.get("value") == poisoned.get("before"),
    }
    print(f"device: {poisoned.get('device')}  torch {poisoned.get('torch')}  CUDA {poisoned.get('cuda')}")
    print(f"1. process {poisoned.get('pid')}: embedding(8192) on an 8192-row table -> "
          f"{assert_error.get('type')}: {assert_error.get('message', '').splitlines()[0] if assert_error else '-'}"
          f" ({poisoned.get('assert_s')} s)")
    print("2. same process, valid x @ x: " + ("works" if after.get("ok") else
          f"{after.get('type')}: {after.get('message', '').splitlines()[0] if after.get('message') else ''}"))
    print(f"3. fresh process {fresh.get('pid')}, valid x @ x: {fresh.get('value')} (expected {poisoned.get('before')})")
    for name, ok in checks.items():
        print(f"   [{'ok' if ok else 'FAIL'}] {name}")
    if not all(checks.values()):
        print(json.dumps({"poisoned": poisoned, "fresh": fresh}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
