"""`songpipe make-checkpoint --size tiny`: the published folder layout with tiny random weights."""
from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

from gpu_worker.checkpoints.checkpoint_marker import MARKER
from gpu_worker.checkpoints.heartcodec_checkpoint import write_tiny_heartcodec
from gpu_worker.checkpoints.heartmula_checkpoint import write_tiny_heartmula


def make_tiny_checkpoint(out: Path, *, seed: int = 0, codec_layout: str = "sharded",
                         codec_windows: tuple[int, int] | None = None) -> Path:
    """Write a complete checkpoint root (LM, codec, tokenizer, gen_config) into `out`.

    `codec_windows` (window_frames, hop_frames): small codec windows, so a tiny song spans several.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_heartmula(out, seed=seed)
    write_tiny_heartcodec(out, seed=seed, layout=codec_layout, windows=codec_windows)
    (out / MARKER).write_text(
        "Random weights in the published HeartMuLa/HeartCodec layout, for tests and the demo. "
        "It makes noise, not music.\n")
    return out


def ensure_tiny_checkpoint(root: Path, *, seed: int = 0) -> Path:
    """Create the embedded demo checkpoint once; concurrent callers wait for the first one."""
    root = Path(root)
    if (root / MARKER).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / MARKER).exists():
            staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
            make_tiny_checkpoint(staging, seed=seed)
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
    return root


def is_tiny_checkpoint(root: Path) -> bool:
    return (Path(root) / MARKER).exists()
