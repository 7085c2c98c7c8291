"""`songpipe replay JOB --mode retry|new ...`: the CLI face of orchestrator.replay."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

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
@click.option("--lyrics-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="override the lyrics with this file's text (new only)")
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--cfg-scale", type=float, default=None)
@click.option("--max-audio-length-ms", type=int, default=None)
@click.option("--output-format", type=click.Choice(["mp3", "wav"]), default=None)
@click.option("--no-send", is_flag=True, help="write the rows but do not send the Celery chain")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def replay_command(job_id: str, mode: str, from_stage: str | None, seed: int | None, tags: str | None,
                   style: str | None, lyrics_file: Path | None, temperature: float | None, top_k: int | None,
                   cfg_scale: float | None, max_audio_length_ms: int | None, output_format: str | None,
                   no_send: bool, as_json: bool) -> None:
    """Replay JOB_ID from its stored inputs."""
    overrides = {name: value for name, value in {
        "seed": seed, "tags": tags, "style": style, "temperature": temperature, "top_k": top_k,
        "cfg_scale": cfg_scale, "max_audio_length_ms": max_audio_length_ms, "output_format": output_format,
        "lyrics": lyrics_file.read_text(encoding="utf-8") if lyrics_file else None}.items() if value is not None}
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
        if as_json:
            body = {"error": str(exc), "error_type": type(exc).__name__}
            if isinstance(exc, replay_module.OverrideError):
                body["fields"] = exc.errors
            click.echo(json.dumps(body))
            sys.exit(2)
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    verb = "retry of" if result.mode == "retry" else "new job replaying"
    click.echo(f"{verb} {job_id}: job {result.job_id}, from {result.from_stage}")
    for stage, attempt in result.attempts.items():
        click.echo(f"  run     {stage} attempt {attempt}")
    for stage, source in result.reused.items():
        click.echo(f"  reuse   {stage} (stage_run {source})")
