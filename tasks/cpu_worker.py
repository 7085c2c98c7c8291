"""Entry point of the CPU worker: `celery -A tasks.cpu_worker worker -Q cpu`."""
from celery.signals import worker_process_init

from tasks import (
    cpu_stages,  # noqa: F401  (registers refine_lyrics, generate_tags, encode_audio)
    worker_checks,  # noqa: F401  (schema and broker checked at worker start)
    worker_metrics,  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
)
from tasks.celery_app import app
from tasks.settings import get_settings


@worker_process_init.connect
def _load_embedding_model(**_kwargs) -> None:
    # the tagger's model loads once per worker process, before the first job waits for it; the
    # process says so in Redis, so the song page can tell a waiting user what is warming up
    from tasks.worker_readiness import warm_up_cpu_process

    warm_up_cpu_process(get_settings())


__all__ = ["app"]
