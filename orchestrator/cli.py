"""`songpipe`: run the stack, submit and inspect jobs, and run one model stage by hand.

Commands that need the broker import the Celery app only after the Redis URL is known (an
embedded Redis started by `songpipe run` is found through its socket under the data dir).
Exit codes: 0 success, 1 a job or command failed, 2 invalid input (printed as "field: message").
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from tasks.settings import Settings, get_settings, reset_settings_cache

VALIDATION_EXIT = 2
FAILURE_EXIT = 1


def _settings() -> Settings:
    reset_settings_cache()  # the environment may have changed since import (tests, `run`)
    return get_settings()


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


def _fail_validation(errors: list[dict[str, str]], as_json: bool) -> None:
    from orchestrator.job_cli import fail

    fail(errors, as_json)


def _broker_settings() -> Settings:
    """Settings naming a reachable broker, with the Celery app configured to it (tasks.celery_app.use_broker).

    Every job command (submit, show, replay, cancel...) calls this; one line, no traceback, when
    no broker can be found or reached.
    """
    from tasks.broker import BrokerNotConfigured, BrokerUnreachable
    from tasks.celery_app import use_broker

    try:
        settings = use_broker(_settings())
    except (BrokerNotConfigured, BrokerUnreachable) as exc:
        raise click.ClickException(str(exc)) from None
    os.environ["REDIS_URL"] = settings.redis_url or ""  # an exec'd worker inherits the same broker
    return settings


def _require_schema(settings: Settings) -> None:
    from db.schema import SchemaOutOfDateError, require_current_schema

    try:
        require_current_schema(settings.resolved_database_url)
    except SchemaOutOfDateError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """songpipe: lyrics + tags -> HeartMuLa tokens -> HeartCodec audio -> MP3, every stage recorded."""


# -- the stack ---------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address the web server listens on")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--procfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="defaults to ./Procfile, then the repository's")
@click.option("--demo", is_flag=True, help="submit the demo song once the stack is up and say where to listen")
@click.option("--exit-after-demo", is_flag=True, help="stop the stack when the demo job has finished")
def run(host: str, port: int, procfile: Path | None, demo: bool, exit_after_demo: bool) -> None:
    """Start everything: embedded Redis (when REDIS_URL is unset), schema, tiny checkpoint, web and workers."""
    from orchestrator.stack import run_stack

    code = run_stack(_settings(), host=host, port=port, procfile=procfile, demo=demo or exit_after_demo,
                     exit_after_demo=exit_after_demo, echo=lambda line: click.echo(f"songpipe | {line}"))
    sys.exit(code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="processes [SONGPIPE_WEB_WORKERS: 2]")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="threads each [SONGPIPE_WEB_THREADS: 8]")
def web(host: str, port: int, workers: int | None, threads: int | None) -> None:
    """Serve the form, the JSON API and the dashboard through gunicorn (docs/web-tier.md)."""
    from orchestrator.app import create_app
    from orchestrator.job_views import TINY_CHECKPOINT_NOTICE, checkpoint_is_tiny
    from orchestrator.web_server import serve

    settings = _broker_settings()
    click.echo(f"serving on http://{host}:{port}/")
    if checkpoint_is_tiny(settings):
        click.echo(f"model: {TINY_CHECKPOINT_NOTICE}")
    serve(lambda: create_app(settings), settings, host, port, workers=workers, threads=threads)


WORKERS = {
    # kind: (Celery app module, queue, default concurrency, pool)
    "cpu": ("tasks.cpu_worker", "cpu", 2, "prefork"),
    # one process per GPU: the model is loaded once per child, and one song owns the device at a time
    "gpu": ("gpu_worker.worker.celery_worker", "gpu", 1, "prefork"),
}


def worker_argv(kind: str, concurrency: int | None, loglevel: str, *, gpu_batching: bool = False) -> list[str]:
    module, queue, default_concurrency, pool = WORKERS[kind]
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(",", "-") if kind == "gpu" else ""
    extra: list[str] = []
    if kind == "gpu" and gpu_batching:
        # SONGPIPE_GPU_BATCHING=1: one process per GPU still, but a threads pool with one thread per
        # engine slot, so every token task of the process shares one engine, model and CUDA context.
        # After a CUDA poison the whole process exits (warm, after in-flight tasks recorded their
        # failure; gpu_worker/worker/batching.py) and the supervisor (systemd, a restart loop) must
        # start it again - there is no prefork child to replace.
        # With streaming, a song's decode runs beside its token task (docs/streaming.md): two threads a slot.
        settings = _settings()
        pool, default_concurrency = "threads", settings.gpu_batch_slots * (2 if settings.streaming else 1)
        extra = ["--include", "gpu_worker.worker.batching"]
    return [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue,
            "--concurrency", str(concurrency or default_concurrency), "--pool", pool, *extra,
            # SONGPIPE_WORKER_NAME: the node name the supervisor of `songpipe run` pings (its Procfile line)
            "--hostname", os.environ.get("SONGPIPE_WORKER_NAME") or f"{kind}{device}@%h", "--loglevel", loglevel]


def _gpu_batching() -> bool:
    from gpu_worker.worker.device import gpu_batching_enabled

    return gpu_batching_enabled(_settings())


@main.command()
@click.argument("kind", type=click.Choice(sorted(WORKERS)))
@click.option("--concurrency", "-c", type=int, default=None,
              help="cpu: 2; gpu: always 1 per GPU (SONGPIPE_GPU_BATCHING=1: one thread per engine slot, two "
                   "with SONGPIPE_STREAMING)")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(kind: str, concurrency: int | None, loglevel: str) -> None:
    """Exec a Celery worker for the cpu or gpu queue (for the gpu: one per GPU, CUDA_VISIBLE_DEVICES)."""
    batching = kind == "gpu" and _gpu_batching()
    if kind == "gpu" and not batching and concurrency not in (None, 1):
        raise click.BadParameter("the GPU worker runs one process per GPU; start one worker per device",
                                 param_hint="--concurrency")
    if batching and concurrency is not None:
        raise click.BadParameter("with SONGPIPE_GPU_BATCHING=1 the GPU worker runs one thread per engine slot "
                                 "(SONGPIPE_GPU_BATCH_SLOTS)", param_hint="--concurrency")
    _require_schema(_broker_settings())  # refuse here with one line; the exec'd worker checks again
    argv = worker_argv(kind, concurrency, loglevel, gpu_batching=batching)
    os.execv(argv[0], argv)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the current schema (creates it when empty)."""
    from db.schema import upgrade

    settings = _settings()
    revision = upgrade(settings.resolved_database_url)
    click.echo(f"schema at {revision}")


@main.command("make-checkpoint")
@click.option("--size", type=click.Choice(["tiny"]), default="tiny", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
def make_checkpoint(size: str, out: Path, seed: int) -> None:
    """Write a random-weight checkpoint in the published folder layout (noise, not music)."""
    from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(out, seed=seed)
    click.echo(f"{size} checkpoint written to {path} (random weights: noise, not music)")


# -- one stage by hand: the minimal reproduction -----------------------------------------------

@dataclass
class LocalStageContext:
    """What a stage's compute function needs, without SQL: progress goes to stderr, nothing cancels.

    Artifacts go to the content-addressed store (by sha256, so a reproduction never overwrites
    a recorded artifact with different bytes) but get no SQL row: a reproduction is not a job.
    """

    stage: str
    settings: Settings
    store: Any
    job_id: str = "local"
    attempt: int = 0
    environment_extra: dict[str, Any] = field(default_factory=dict)
    _last: float = 0.0

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    def progress(self, done: int, total: int, unit: str = "frames", *, force: bool = False) -> None:
        now = time.monotonic()
        if force or done >= total or now - self._last >= 1.0:
            self._last = now
            _echo_err(f"{self.stage}: {done}/{total} {unit}")

    def heartbeat(self) -> None:
        pass

    def should_cancel(self) -> bool:
        return False

    def put_artifact(self, data: bytes, kind: str):
        return self.store.put(data, kind)


def _recorded_stage(settings: Settings, job_id: str, stage: str, attempt: int | None) -> dict[str, Any]:
    """Inputs (and outputs, for comparison) of a stored stage attempt, verbatim."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import StageRun

    with session_scope(settings.resolved_database_url) as session:
        query = select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                       StageRun.inputs.is_not(None))
        if attempt is not None:
            query = query.where(StageRun.attempt == attempt)
        row = session.scalar(query.order_by(StageRun.attempt.desc()).limit(1))
        if row is None:
            which = f"attempt {attempt}" if attempt is not None else "any attempt"
            raise click.ClickException(f"job {job_id} has no recorded inputs for stage {stage} ({which}); "
                                       "a stage records its inputs when it starts")
        return {"attempt": row.attempt, "status": row.status, "inputs": row.inputs, "outputs": row.outputs}


def _run_stage(stage: str, inputs_payload: dict[str, Any], source: dict[str, Any], out: Path | None,
               recorded_outputs: dict[str, Any] | None) -> None:
    from pydantic import BaseModel, ValidationError

    from orchestrator.request_parsing import field_errors
    from tasks.artifact_store import open_store
    from tasks.contracts import STAGE_CONTRACTS

    input_model, output_model = STAGE_CONTRACTS[stage]
    try:
        inputs = input_model.model_validate(inputs_payload)
    except ValidationError as exc:
        _fail_validation(field_errors(exc), as_json=False)
    settings = _settings()
    from gpu_worker.worker import stages
    computes: dict[str, Callable[[Any, Any], BaseModel]] = {"generate_tokens": stages.generate_tokens,
                                                            "decode_audio": stages.decode_audio}
    compute = computes[stage]
    ctx = LocalStageContext(stage, settings, open_store(settings))
    started = time.monotonic()
    outputs = output_model.model_validate(compute(inputs, ctx).model_dump())
    result = outputs.model_dump(mode="json")
    artifact = result["tokens"] if stage == "generate_tokens" else result["wav"]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(ctx.store.get(artifact["sha256"]))
    report: dict[str, Any] = {"stage": stage, "source": source, "inputs": inputs.model_dump(mode="json"),
                              "outputs": result, "environment": ctx.environment_extra,
                              "duration_s": round(time.monotonic() - started, 3),
                              "out": str(out) if out is not None else None}
    if recorded_outputs is not None:
        recorded = recorded_outputs.get("tokens" if stage == "generate_tokens" else "wav") or {}
        report["recorded_outputs"] = recorded_outputs
        report["same_artifact_as_recorded"] = recorded.get("sha256") == artifact["sha256"]
    _print_json(report)


def _run_recorded(stage_name: str, job_id: str, attempt: int | None, checkpoint: str | None,
                  out: Path | None) -> None:
    """Re-run a stored stage input verbatim; only the checkpoint folder may be pointed elsewhere
    (the same files on another machine), and the report says so."""
    recorded = _recorded_stage(_settings(), job_id, stage_name, attempt)
    inputs = dict(recorded["inputs"])
    source: dict[str, Any] = {"job": job_id, "attempt": recorded["attempt"]}
    if checkpoint is not None:
        source["overrides"] = {"checkpoint": {"recorded": inputs["checkpoint"], "used": _checkpoint_option(checkpoint)}}
        inputs["checkpoint"] = _checkpoint_option(checkpoint)
    _run_stage(stage_name, inputs, source, out, recorded["outputs"])


@main.group()
def stage() -> None:
    """Run one model stage outside Celery: from arguments, or from a stored stage input (--from-job)."""


def _checkpoint_option(value: str | None) -> str:
    return str(Path(value).resolve()) if value else str(_settings().resolved_checkpoint_dir)


@stage.command("generate-tokens")
@click.option("--from-job", "job_id", default=None, help="reuse the recorded inputs of this job's token stage")
@click.option("--attempt", type=int, default=None, help="with --from-job; default: the latest with inputs")
@click.option("--lyrics", default=None)
@click.option("--lyrics-file", default=None, help="'-' reads stdin")
@click.option("--tags", default=None, help="exactly the tags string the model gets, e.g. 'ska,upbeat'")
@click.option("--seed", type=int, default=None)
@click.option("--max-audio-length-ms", type=int, default=None)
@click.option("--max-ms", "max_ms_alias", type=int, default=None, hidden=True)
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", "top_k", type=int, default=None)
@click.option("--cfg-scale", "cfg_scale", type=float, default=None)
@click.option("--checkpoint", default=None,
              help="checkpoint root; default: the configured one (with --from-job: the recorded one)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write the .npy tokens here")
def stage_generate_tokens(job_id: str | None, attempt: int | None, lyrics: str | None, lyrics_file: str | None,
                          tags: str | None, seed: int | None, checkpoint: str | None, out: Path | None,
                          max_ms_alias: int | None, **params: Any) -> None:
    """Generate music tokens for fixed inputs and print the stage output as JSON."""
    if job_id is not None:
        _run_recorded("generate_tokens", job_id, attempt, checkpoint, out)
        return
    from orchestrator.job_cli import read_lyrics

    if max_ms_alias is not None:
        params["max_audio_length_ms"] = params["max_audio_length_ms"] or max_ms_alias
    text = read_lyrics(lyrics, lyrics_file, as_json=False)
    # Every field is explicit: no silent default for the tags or the seed (seed-story.md, point 1).
    payload = {"lyrics": text or "", "tags": tags or "", "seed": seed, "checkpoint": _checkpoint_option(checkpoint),
               "params": {name: value for name, value in params.items() if value is not None}}
    _run_stage("generate_tokens", payload, {"arguments": True}, out, None)


@stage.command("decode-audio")
@click.option("--from-job", "job_id", default=None, help="reuse the recorded inputs of this job's decode stage")
@click.option("--attempt", type=int, default=None)
@click.option("--tokens", "tokens_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="a .npy token grid [8, frames] (e.g. from `stage generate-tokens --out`)")
@click.option("--seed", type=int, default=None)
@click.option("--checkpoint", default=None,
              help="checkpoint root; default: the configured one (with --from-job: the recorded one)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write the WAV here")
def stage_decode_audio(job_id: str | None, attempt: int | None, tokens_file: Path | None, seed: int | None,
                       checkpoint: str | None, out: Path | None) -> None:
    """Decode a token grid to a WAV and print the stage output as JSON."""
    if job_id is not None:
        _run_recorded("decode_audio", job_id, attempt, checkpoint, out)
        return
    if tokens_file is None:
        raise click.UsageError("give --tokens FILE.npy or --from-job JOB")
    from gpu_worker.worker.stages import tokens_from_bytes
    from tasks.artifact_store import open_store

    data = tokens_file.read_bytes()
    frames = int(tokens_from_bytes(data).shape[-1])
    ref = open_store(_settings()).put(data, "tokens")
    payload = {"tokens": ref.model_dump(mode="json"), "frames": frames, "seed": seed,
               "checkpoint": _checkpoint_option(checkpoint)}
    _run_stage("decode_audio", payload, {"arguments": True, "tokens_file": str(tokens_file)}, out, None)


@main.group()
def admin() -> None:
    """Admin dashboard helpers."""


def _register_commands() -> None:
    # imported here so `songpipe --help` stays fast and the web-only modules load on demand
    from orchestrator.admin.auth import hash_password_command
    from orchestrator.job_cli import COMMANDS as JOB_COMMANDS
    from orchestrator.replay_cli import replay_command
    from tasks.reconciler_cli import reconcile

    for command in JOB_COMMANDS:
        main.add_command(command)
    main.add_command(replay_command)
    main.add_command(reconcile)
    admin.add_command(hash_password_command)


_register_commands()


if __name__ == "__main__":
    main()
