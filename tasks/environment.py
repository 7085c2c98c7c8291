"""What a stage ran on: versions, host, device and code, recorded with every stage attempt."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when running from a checkout."""
    try:
        version = importlib.metadata.version("songpipe")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        if Path(top).resolve() != REPO_ROOT:  # a copy without its own .git inside another checkout
            return version
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{version}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return version


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_snapshot() -> dict[str, Any]:
    """Torch facts, only if this process already imported torch (a CPU worker need not load it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {"torch": None}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu_name=props.name, gpu_memory_total=props.total_memory,
                    gpu_memory_allocated=torch.cuda.memory_allocated(index),
                    gpu_memory_reserved=torch.cuda.memory_reserved(index),
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # driver queries are best-effort facts, never a reason to fail a stage
            info["driver"] = None
    else:
        info["gpu_name"] = "cpu"
    return info


def environment_snapshot(**extra: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "hostname": socket.gethostname(), "pid": os.getpid(),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "code_version": code_version(),
        "celery": _package_version("celery"), "sqlalchemy": _package_version("sqlalchemy"),
        "pydantic": _package_version("pydantic"),
    }
    snapshot.update(torch_snapshot())
    snapshot.update(extra)
    return snapshot
