"""Entry point of the CPU worker: `celery -A tasks.cpu_worker worker -Q cpu`."""
from tasks.celery_app import app
from tasks import worker_checks  # noqa: F401  (schema and broker checked at worker start)
from tasks import cpu_stages  # noqa: F401  (registers refine_lyrics, generate_tags, encode_audio)

__all__ = ["app"]
