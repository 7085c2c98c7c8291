"""Entry point of the CPU worker: `celery -A tasks.cpu_worker worker -Q cpu`."""
from tasks.celery_app import app
from tasks.settings import get_settings
from tasks import worker_checks  # noqa: F401  (schema and broker checked at worker start)
from tasks import worker_metrics  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
from tasks import cpu_stages  # noqa: F401  (registers refine_lyrics, generate_tags, encode_audio)

from celery.signals import worker_process_init


@worker_process_init.connect
def _load_embedding_model(**_kwargs) -> None:
    # the tagger's model loads once per worker process, before the first job waits for it
    if get_settings().default_tags_backend == "embedding":
        from tasks.embedding_tagger import warm_up

        warm_up()


__all__ = ["app"]
