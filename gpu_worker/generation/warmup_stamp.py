"""A record that the kernel warm-up completed for one configuration, so that a restart skips it (torch-free).

The warm-up's children cost seconds of the host even when every kernel is already in Triton's cache (each
starts torch and traces a frame step), and on a restart they would only compete with the worker's own
start. The stamp lives inside the Triton cache directory, so emptying the cache removes it too. Its name
is a hash of everything that decides which kernels the frame step asks for: the checkpoint's configs, the
LM dtype, the card's compute capability, the Python, Triton and torch versions, and the source of the
packages that build the step. A stale stamp can only cost time: the first frame compiles whatever the
cache lacks (docs/streaming.md, "Cold start").
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

STAMP_FOLDER = "songpipe-kernel-warmup"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # gpu_worker/
SOURCE_PACKAGES = ("kernels", "generation", "model")  # what the warm-up's frame step is built from


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def stamp_path(checkpoint_root: Path, dtype: str, capability: int) -> Path | None:
    """Where the stamp for this configuration is, or None where there is no Triton cache directory set (or
    the checkpoint's configs cannot be read): then there is no stamp and the warm-up always runs."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache:
        return None
    digest = hashlib.sha256()
    for part in (dtype, str(capability), sys.version, _version("triton"), _version("torch")):
        digest.update(part.encode() + b"\0")
    root = Path(checkpoint_root)
    configs = [*sorted(root.glob("*/config.json")), root / "gen_config.json"]
    sources = sorted(path for package in SOURCE_PACKAGES for path in (_PACKAGE_ROOT / package).glob("*.py"))
    try:
        for path in (*configs, *sources):
            digest.update(str(path.relative_to(root if path in configs else _PACKAGE_ROOT)).encode() + b"\0")
            digest.update(path.read_bytes())
    except OSError:
        return None
    return Path(cache) / STAMP_FOLDER / f"{digest.hexdigest()[:32]}.json"


def write_stamp(path: Path, report: dict[str, Any]) -> None:
    """Record a completed warm-up at `path` (atomically: a half-written stamp is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(report))
    os.replace(partial, path)
