"""Compiled kernels kept in the data directory, so a restarted GPU worker reuses them (docs/streaming.md).

Triton (the fused token kernels) and TorchInductor (the compiled codec) cache what they compile under a
directory named by an environment variable, by default somewhere under /tmp that a new container or a
reboot loses. The GPU worker points both at `<data_dir>/compile-cache` unless the operator set them:
the caches are keyed by source and compiler versions, so a reused entry is the very kernel a fresh
compile would make.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_VARIABLES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def use_data_dir_compile_caches(data_dir: Path) -> dict[str, str]:
    """Set the cache variables that are unset to folders under `data_dir`; returns what each one is now."""
    root = Path(data_dir) / "compile-cache"
    for variable, folder in CACHE_VARIABLES.items():
        if not os.environ.get(variable):
            path = root / folder
            path.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(path)
    return {variable: os.environ[variable] for variable in CACHE_VARIABLES}
