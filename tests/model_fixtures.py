"""Shared builders for the tests of the generation path and of the stage-recording wrapper.

- The tiny HeartMuLa checkpoint (CPU, fp32): the `lm` fixture, its songs' prompts, sampling
  parameters and the `no_eos` logits hook (tests/test_generate.py, test_fast_generate.py,
  test_generation_engine.py). Import the fixture into a test module to use it there.
- Running one stage through the StageRunner directly, no broker (tests/test_recording.py,
  test_reliability_rules.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

# torch and gpu_worker are imported where used: the stage-recording tests never load them (a loaded
# torch would also change what environment_snapshot() records).

VOCAB = 8197
EOS = 8193
FRAME_MS = 80
# (tags, lyrics) of the songs the generation tests run; the first is the single-song tests' prompt.
SONGS = [
    ("pop,piano", "[verse]\nla la la"),
    ("rock,guitar,loud", "[verse]\nyeah yeah yeah oh\n[chorus]\nna na na"),
    ("ambient", "[intro]\nhm"),
    ("jazz", "[outro]\nbye"),
]


def tiny_params(frames: int):
    """The sampling parameters of the tiny-checkpoint tests, for a song of at most `frames` frames."""
    from gpu_worker.generation.generate import SamplingParams

    return SamplingParams(temperature=1.0, top_k=50, cfg_scale=1.5, max_audio_length_ms=frames * FRAME_MS)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The tiny checkpoint (seed 2), written and loaded once per test module."""
    from gpu_worker.checkpoints.heartmula_checkpoint import load_heartmula, write_tiny_heartmula

    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_heartmula(root, seed=2)
    return load_heartmula(root)


def tiny_prompts(lm, count: int) -> list:
    """Prompts of the first `count` of SONGS."""
    from gpu_worker.model.prompt import build_prompt

    return [build_prompt(lm.tokenizer, lm.gen_config, tags, lyrics) for tags, lyrics in SONGS[:count]]


def no_eos(frame, codebook, logits):
    """Keep a random model from ending early where a test needs the full length."""
    import torch

    return logits.index_fill(-1, torch.tensor([EOS]), float("-inf"))


# -- one stage through the recording wrapper ---------------------------------------------------

def echo_lyrics(inp, ctx):
    """A refine_lyrics compute function: the lyrics upper-cased, the backend echoed."""
    from tasks.contracts import RefineLyricsOutput

    return RefineLyricsOutput(lyrics=inp.lyrics.upper(), backend_used=inp.backend)


def raising(exc: BaseException) -> Callable[[Any, Any], Any]:
    """A compute function that raises `exc`."""
    def compute(inp, ctx):
        raise exc

    return compute


def run_stage(settings, job_id: str, compute: Callable[[Any, Any], Any], *, stage: str = "refine_lyrics",
              attempt: int = 1, **run_kwargs: Any) -> dict[str, Any] | None:
    """One attempt of `stage` with `compute` through StageRunner.run (inputs resolved from SQL)."""
    from tasks.recording import StageRunner
    from tasks.stage_inputs import RESOLVERS

    return StageRunner(stage, RESOLVERS[stage], compute).run(job_id, attempt, settings=settings, **run_kwargs)
