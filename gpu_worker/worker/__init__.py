"""The Celery side of the GPU worker: stages, model cache, device choice, CUDA health, faults, batching glue."""
