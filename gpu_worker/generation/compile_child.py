"""One kernel warm-up child: compiles its share of the frame step's Triton kernels for a card (no GPU used).

Started by gpu_worker/generation/compile_children.py as `python -m`, with the card's compute capability
and its share (k/n: the k-th of every n kernels, in the order the frame step asks for them), into the
Triton cache directory it inherits. Where a recorded manifest matches the checkpoint and dtype
(gpu_worker/generation/kernel_manifest.py), the calls are replayed and torch is never imported; otherwise
(or where this Triton refuses a recorded call) the frame step is traced on the meta device
(gpu_worker/generation/kernel_warmup.py). The last line of its output is a JSON report: kernels asked for,
compiled, launchers built, and which way they were found.
"""
from __future__ import annotations

import argparse
import importlib.abc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_worker.generation import card_compile, kernel_manifest
from gpu_worker.kernels.triton_kernels import triton


class _NoTorch(importlib.abc.MetaPathFinder):
    """Makes `import torch` fail at once. Some Tritons (3.6) import torch at their first argument
    specialisation, to recognise its tensors; a manifest's stand-ins are none, torch's import would be most
    of the child's time, and Triton takes the failed import as "no torch"."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"no torch in a kernel manifest's compile child ({fullname})", name=fullname)
        return None


def _share(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


def _replayed(calls: list[dict[str, Any]]) -> bool:
    """Replay the manifest's calls with torch kept out; False (said on stderr) where this Triton refuses one of
    them (a manifest recorded under another Triton can bind differently): the child then traces instead."""
    finder = None if "torch" in sys.modules else _NoTorch()
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        kernel_manifest.replay(calls)
        return True
    except Exception as refused:  # noqa: BLE001 - any refusal: tracing still compiles the right kernels
        print(f"kernel manifest not replayable here ({type(refused).__name__}: {refused}); tracing the frame step",
              file=sys.stderr)
        return False
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compile a share of the frame step's Triton kernels for a card "
                                     "(a child of compile_children.start_children; touches no GPU)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint root (the LM folder inside)")
    parser.add_argument("--dtype", required=True, choices=("bfloat16", "float16"))
    parser.add_argument("--capability", type=int, required=True, help="compute capability, e.g. 90")
    parser.add_argument("--share", type=_share, default=(0, 1), help="k/n: the k-th of every n kernels")
    parser.add_argument("--manifests", type=Path, default=kernel_manifest.MANIFEST_DIR,
                        help="folder of recorded kernel manifests")
    opts = parser.parse_args(argv)
    report: dict[str, object] = {"asked": 0, "compiled": 0, "launchers": 0, "source": "none"}
    if triton is not None:
        calls = kernel_manifest.find_calls(opts.checkpoint, opts.dtype, opts.manifests)
        source = "trace"
        with card_compile.compile_only(opts.capability, opts.share) as counts:
            if calls is not None and _replayed(calls):
                source = "manifest"
            else:
                from gpu_worker.generation.kernel_warmup import trace_frame_step  # torch

                trace_frame_step(opts.checkpoint, opts.dtype)
        report = {**counts, "source": source}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
