"""One settings object for every process (web, CPU worker, GPU worker, CLI), read from the environment.

Unset values resolve to the embedded defaults (SQLite under the data directory, a local Redis
started by `songpipe run`, a tiny random checkpoint) - and each process records which it used.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SONGPIPE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default=Path("var"), description="where the SQLite file, artifacts and tiny checkpoint live")
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    artifact_dir: Path | None = Field(default=None,
                                      description="artifact store root; share it across hosts (NFS) in multi-host setups")
    # an S3-protocol bucket (s3://bucket/prefix) instead of the directory: what several hosts share;
    # endpoint and credentials come from the usual AWS_* variables (docs/storage.md)
    artifact_url: str | None = None
    artifact_file_mode: int = Field(default=0o644, description="mode of artifact files, octal in the environment (0644)")
    checkpoint_dir: Path | None = Field(default=None, validation_alias="HEARTMULA_CKPT")
    mode: Literal["development", "production"] = "development"

    device: str = "auto"  # "auto" -> cuda when available, else cpu
    lm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    codec_dtype: Literal["float32", "bfloat16"] = "float32"
    # continuous batching of token generation (gpu_worker/generation/engine.py): one engine per GPU worker
    # process serves up to 8 songs at once and `songpipe worker gpu` runs Celery's threads pool.
    # Unset: on where the GPU worker's device is CUDA, off on the CPU (the plain path, one song at a time).
    gpu_batching: bool | None = None
    # engine slots = songs one GPU worker steps together; every step computes all slots (fixed GEMM shapes keep
    # a song's tokens independent of its batch mates), so more slots cost the lone song time and KV memory
    gpu_batch_slots: int = Field(default=8, ge=1, le=256)
    # the batching engine records a song's frames so far every this many frames (125: 10 s of audio; the stage
    # thread writes at most one checkpoint per poll), so a new attempt after a lost worker continues from there
    # with the same tokens (0: no checkpoints)
    token_checkpoint_frames: int = Field(default=125, ge=0)
    # stream a song while it is made (docs/streaming.md): with token checkpoints on, the token stage also
    # checkpoints at every codec window's last frame and starts the decode stage at the first one, which then
    # decodes each window as its frames are recorded
    streaming: bool = True
    # a threads-mode GPU worker on CUDA with the bf16 codec loads and compiles the codec on a background thread
    # at start (gpu_worker/worker/codec_warmup.py), so the first song's first window is not a compile
    codec_warmup: bool = True
    # the frame step's Triton kernels compiled while the LM loads (same module), for a new machine's first frame
    kernel_warmup: bool = True
    loudness_target_lufs: float | None = Field(
        default=None, description="normalise every song to this integrated loudness (e.g. -14); unset: measure only")

    default_lyrics_backend: Literal["rules", "llm", "off"] = "rules"
    default_tags_backend: Literal["embedding", "llm", "given"] = "embedding"
    llm_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = Field(default=30.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0, le=10)

    secret_key: SecretStr | None = None  # Flask session signing; generated per data dir when unset
    admin_user: str = "admin"
    admin_password_hash: str | None = None  # werkzeug hash; `songpipe admin hash-password`
    viewer_user: str = "viewer"
    viewer_password_hash: str | None = None
    session_minutes: int = Field(default=60, ge=1)

    max_queued_jobs: int = Field(default=200, ge=1)
    submissions_per_minute: int = Field(default=60, ge=1)
    max_request_bytes: int = Field(default=256 * 1024, ge=1024)
    max_json_depth: int = Field(default=16, ge=2, le=64)  # nesting of a JSON body; a JobRequest needs 2

    # the production web server (gunicorn, `songpipe web` outside development; docs/web-tier.md)
    web_workers: int = Field(default=2, ge=1, le=64)  # processes; each has its own SQL pool
    web_threads: int = Field(default=8, ge=1, le=256)  # threads per process: the bound on concurrent requests
    web_timeout_s: int = Field(default=60, ge=5)  # a request taking longer gets its worker restarted
    web_graceful_timeout_s: int = Field(default=30, ge=1)  # HUP/TERM: in-flight requests get this long
    web_keepalive_s: int = Field(default=5, ge=0)
    web_max_requests: int = Field(default=10_000, ge=0)  # recycle a worker after this many requests (0: never)
    proxy_hops: int = Field(default=0, ge=0, le=5)  # reverse proxies in front whose X-Forwarded-For is trusted

    fault_injection: bool = False  # allows the CUDA fault switch; refused in production mode
    cpu_soft_time_limit_s: int = Field(default=300, ge=1)
    heartbeat_s: float = Field(default=5.0, gt=0)  # running stages write heartbeat_at this often; lease = 12x
    visibility_timeout_s: int | None = Field(default=None, ge=1)  # broker lease override (tests only)
    # a worker's Prometheus endpoint (tasks/worker_metrics.py); unset or 0: none. One port per worker process.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 so a Prometheus on another host can scrape

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("artifact_url", mode="after")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlparse

        parsed = urlparse(value)
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"must look like s3://bucket/prefix, got {value!r}")
        return value

    @field_validator("artifact_file_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: object) -> object:
        if isinstance(value, str):  # "0644" / "644" / "0o644" in the environment mean octal
            try:
                value = int(value.removeprefix("0o"), 8)
            except ValueError:
                raise ValueError(f"must be an octal file mode such as 0644, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o777:
            raise ValueError(f"must be a file mode between 0000 and 0777, got {value:o}")
        return value

    def fault_injection_refusal(self) -> str | None:
        """Why these settings must not start any process (fault injection in production), or None."""
        if self.fault_injection and self.mode == "production":
            return ("SONGPIPE_FAULT_INJECTION=1 is not allowed with SONGPIPE_MODE=production; "
                    "unset one of them (fault injection is for tests)")
        return None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'songpipe.db'}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").expanduser().resolve()

    @property
    def uses_tiny_checkpoint(self) -> bool:
        return self.checkpoint_dir is None

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return (self.checkpoint_dir or self.data_dir / "checkpoints" / "tiny").expanduser().resolve()

    @property
    def embedded_redis_socket(self) -> Path:
        return self.data_dir / "redis" / "redis.sock"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()
