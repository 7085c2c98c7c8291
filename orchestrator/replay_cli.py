"""`songpipe replay JOB --mode retry|new ...`: the CLI face of orchestrator.replay."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from orchestrator import job_cli
from orchestrator import replay as replay_module
from tasks.artifact_store import ArtifactIntegrityError
from tasks.contracts import STAGES
from tasks.settings import get_settings


@click.command("replay")
@click.argument("job_id")
@click.option("--mode", type=click.Choice(["retry", "new"]), required=True,
              help="retry: new attempts in the same job; new: a new job linked by replay_of")
@click.option("--from-stage", type=click.Choice(STAGES), default=None,
              help="first stage to run again (retry: default the failed stage; new: default refine_lyrics)")
@click.option("--seed", type=int, default=None, help="override (new only)")
@click.option("--tags", default=None, help="override, comma-separated (new only)")
@click.option("--style", default=None, help="override (new only)")
@click.option("--lyrics-file", default=None, help="override the lyrics with this file's text (new only)")
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--cfg-scale", type=float, default=None)
@click.option("--max-audio-length-ms", type=int, default=None)
@click.option("--max-ms", "max_ms_alias", type=int, default=None, hidden=True)
@click.option("--output-format", type=click.Choice(["mp3", "wav"]), default=None)
@click.option("--no-send", is_flag=True, help="write the rows but do not send the Celery chain")
@click.option("--wait", is_flag=True, help="wait until the replayed job has finished; exit 1 unless it succeeded")
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help="with --wait")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def replay_command(job_id: str, mode: str, from_stage: str | None, seed: int | None, tags: str | None,
                   style: str | None, lyrics_file: str | None, temperature: float | None, top_k: int | None,
                   cfg_scale: float | None, max_audio_length_ms: int | None, max_ms_alias: int | None,
                   output_format: str | None, no_send: bool, wait: bool, timeout_s: float, as_json: bool) -> None:
    """Replay JOB_ID from its stored inputs (exit 0 ok, 1 refused or the job failed, 2 invalid input)."""
    max_audio_length_ms = max_audio_length_ms if max_audio_length_ms is not None else max_ms_alias
    lyrics = job_cli.read_lyrics(None, lyrics_file, as_json) if lyrics_file else None
    overrides = {name: value for name, value in {
        "seed": seed, "tags": tags, "style": style, "temperature": temperature, "top_k": top_k,
        "cfg_scale": cfg_scale, "max_audio_length_ms": max_audio_length_ms, "output_format": output_format,
        "lyrics": lyrics}.items() if value is not None}
    settings = get_settings()
    try:
        if mode == "retry":
            if overrides:
                raise replay_module.OverrideError(
                    f"--mode retry re-runs the job's own inputs; overrides ({', '.join(sorted(overrides))}) "
                    f"need --mode new")
            result = replay_module.retry(job_id, from_stage, settings=settings, requested_by="cli", send=not no_send)
        else:
            result = replay_module.rerun_as_new(job_id, from_stage or "refine_lyrics", overrides, settings=settings,
                                                requested_by="cli", send=not no_send)
    except (replay_module.ReplayError, ArtifactIntegrityError) as exc:
        # one exit code per kind of error, with and without --json: 2 invalid input, 1 refused
        extra: dict[str, Any] = {"error": str(exc), "error_type": type(exc).__name__}
        if isinstance(exc, replay_module.OverrideError):
            extra["fields"] = exc.errors
            errors = [{"field": name, "message": message} for name, message in exc.errors.items()]
            job_cli.fail(errors or [{"field": "overrides", "option": "the overrides", "message": str(exc)}],
                         as_json, extra=extra)
        if isinstance(exc, replay_module.JobNotFound):
            job_cli.fail_one("id", str(exc), as_json, extra=extra)
        job_cli.fail_one("replay", str(exc), as_json, code=job_cli.FAILURE_EXIT, option="replay", extra=extra)
    if wait and not no_send:
        view = job_cli.wait_for_job(settings, result.job_id, timeout_s, quiet=as_json)
        if as_json:
            job_cli.print_json({**result.as_dict(), "job": view})
        else:
            click.echo(f"replay {result.mode} of {job_id}: job {result.job_id}, from {result.from_stage}")
            click.echo(job_cli.summary(view, settings))
        sys.exit(job_cli.OK_EXIT if view["status"] == "succeeded" else job_cli.FAILURE_EXIT)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    verb = "retry of" if result.mode == "retry" else "new job replaying"
    click.echo(f"{verb} {job_id}: job {result.job_id}, from {result.from_stage}")
    for stage, attempt in result.attempts.items():
        click.echo(f"  run     {stage} attempt {attempt}")
    for stage, source in result.reused.items():
        click.echo(f"  reuse   {stage} (stage_run {source})")
