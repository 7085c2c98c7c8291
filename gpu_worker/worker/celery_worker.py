"""Entry point of the GPU worker: `celery -A gpu_worker.worker.celery_worker worker -Q gpu --concurrency 1`."""
from gpu_worker.worker import (
    codec_warmup,
    fault_injection,  # noqa: F401  (per-job faults when SONGPIPE_FAULT_INJECTION is on)
    stages,  # noqa: F401  (registers generate_tokens and decode_audio)
)
from gpu_worker.worker.compile_cache import use_data_dir_compile_caches
from tasks import (
    worker_checks,  # noqa: F401  (schema and broker checked at worker start)
    worker_metrics,  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
)
from tasks.celery_app import app
from tasks.settings import get_settings

use_data_dir_compile_caches(get_settings().data_dir)  # before anything compiles: restarts reuse the kernels
codec_warmup.connect()  # the compiled codec is made ready in the background at worker start

__all__ = ["app"]
