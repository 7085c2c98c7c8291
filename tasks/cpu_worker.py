"""Entry point of the CPU worker: `celery -A tasks.cpu_worker worker -Q cpu`."""
from celery.signals import worker_init, worker_process_init

from tasks import (
    cpu_stages,  # noqa: F401  (registers refine_lyrics, generate_tags, encode_audio)
    worker_checks,  # noqa: F401  (schema and broker checked at worker start)
    worker_metrics,  # noqa: F401  (/metrics when SONGPIPE_METRICS_PORT is set)
)
from tasks.celery_app import app
from tasks.settings import get_settings


@worker_init.connect
def _load_models_before_consuming(**_kwargs) -> None:
    # in the main process, before it takes any message or answers a ping: readiness means ready, and
    # the pool children inherit the loaded model instead of each loading it again. One torch thread
    # here: a multi-threaded OpenMP region before fork can hang the children.
    import torch

    torch.set_num_threads(1)
    from tasks.worker_readiness import warm_up_cpu_process

    print("songpipe worker: warming up (the tag model) before taking work", flush=True)
    warm_up_cpu_process(get_settings())
    print("songpipe worker: warm, taking work", flush=True)


@worker_process_init.connect
def _load_embedding_model(**_kwargs) -> None:
    # a child (also one that replaced a dead one) reports in; the model is already loaded in it
    from tasks.worker_readiness import warm_up_cpu_process

    warm_up_cpu_process(get_settings())


__all__ = ["app"]
