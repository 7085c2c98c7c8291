"""Entry point of the GPU worker: `celery -A gpu_worker.worker.celery_worker worker -Q gpu --concurrency 1`."""
import sys

from gpu_worker.generation import compile_children
from gpu_worker.worker.compile_cache import use_data_dir_compile_caches
from tasks.settings import get_settings

use_data_dir_compile_caches(get_settings().data_dir)  # before anything compiles: restarts reuse the kernels
if "worker" in sys.argv[1:]:  # a worker starting (not another celery command): kernels compile from now on,
    compile_children.start_for_worker(get_settings())  # beside the imports below (their children need no GPU)

from gpu_worker.worker import (  # noqa: E402  (after the compile children start)
    codec_warmup,
    fault_injection,  # noqa: F401  (per-job faults when SONGPIPE_FAULT_INJECTION is on)
    stages,  # noqa: F401  (registers generate_tokens and decode_audio)
)
from tasks import (  # noqa: E402
    worker_checks,  # noqa: F401  (schema and broker checked at worker start)
    worker_metrics,  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
)
from tasks.celery_app import app  # noqa: E402

codec_warmup.connect()  # the compiled codec is made ready in the background at worker start

__all__ = ["app"]
