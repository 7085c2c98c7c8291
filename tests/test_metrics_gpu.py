"""The GPU memory gauges: read from torch when CUDA is in use, absent otherwise.

Needs only torch and prometheus-client (no conftest fixtures), so it also runs on a GPU machine
with `pytest --noconftest tests/test_metrics_gpu.py`.
"""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tasks import metrics

torch = pytest.importorskip("torch")


def gpu_memory_samples() -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.process_registry()).decode()
    return {(s.name, s.labels.get("device", "")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("songpipe_gpu_memory")}


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_initialized(), reason="CUDA already in use")
def test_no_gpu_memory_samples_while_cuda_is_unused():
    metrics.record_gpu_memory()
    assert gpu_memory_samples() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_gauges_follow_torch_allocations():
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    metrics.record_gpu_memory()
    samples = gpu_memory_samples()
    assert samples[("songpipe_gpu_memory_allocated_bytes", "cuda:0")] == torch.cuda.memory_allocated(0)
    assert samples[("songpipe_gpu_memory_allocated_bytes", "cuda:0")] >= block.numel()
    assert samples[("songpipe_gpu_memory_reserved_bytes", "cuda:0")] == torch.cuda.memory_reserved(0)
    del block
    torch.cuda.empty_cache()
    metrics.record_gpu_memory()
    assert gpu_memory_samples()[("songpipe_gpu_memory_allocated_bytes", "cuda:0")] == torch.cuda.memory_allocated(0)
