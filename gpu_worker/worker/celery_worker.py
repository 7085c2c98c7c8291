"""Entry point of the GPU worker: `celery -A gpu_worker.worker.celery_worker worker -Q gpu --concurrency 1`."""
from gpu_worker.worker import (
    fault_injection,  # noqa: F401  (per-job faults when SONGPIPE_FAULT_INJECTION is on)
    stages,  # noqa: F401  (registers generate_tokens and decode_audio)
)
from tasks import (
    worker_checks,  # noqa: F401  (schema and broker checked at worker start)
    worker_metrics,  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
)
from tasks.celery_app import app

__all__ = ["app"]
