"""Entry point of the GPU worker: `celery -A gpu_worker.celery_worker worker -Q gpu --concurrency 1`."""
from tasks.celery_app import app
from tasks import worker_checks  # noqa: F401  (schema and broker checked at worker start)
from gpu_worker import stages  # noqa: F401  (registers generate_tokens and decode_audio)

__all__ = ["app"]
