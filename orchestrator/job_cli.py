"""The job commands of `songpipe`: submit, show, list, cancel, download (and the waiting `replay` uses).

One exit-code scheme, with and without --json: 0 ok, 1 the job or the command failed, 2 invalid
input (a bad option value, an unreadable file, an unknown job id). User errors are one line on
stderr that names the command-line option, never a traceback; --json also prints them on stdout
as {"errors": [{"field", "option", "message"}]}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from db.status import STAGE_CLAIMABLE, JobStatus
from tasks.settings import Settings, get_settings, reset_settings_cache

OK_EXIT, FAILURE_EXIT, VALIDATION_EXIT = 0, 1, 2

# API field -> the option that sets it, where the plain `--field-name` spelling is not the option
FIELD_OPTIONS = {"lyrics": "--lyrics/--lyrics-file", "id": "JOB_ID", "body": "the request"}


def option_for(field: str) -> str:
    name = field.split(".")[0]
    return FIELD_OPTIONS.get(name, "--" + name.replace("_", "-"))


def _settings() -> Settings:
    reset_settings_cache()  # the environment may have changed since import (tests, `run`)
    return get_settings()


def print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


def fail(errors: list[dict[str, str]], as_json: bool, code: int = VALIDATION_EXIT,
         extra: dict[str, Any] | None = None) -> NoReturn:
    """Print field errors as `--option: message` lines, or with --json as one JSON object on stdout
    (nothing else, so a script can parse the whole output), and exit with `code` either way."""
    items = [{**item, "option": item.get("option") or option_for(item["field"])} for item in errors]
    if as_json:
        print_json({**(extra or {}), "errors": items})
    else:
        for item in items:
            click.echo(f"{item['option']}: {item['message']}", err=True)
    sys.exit(code)


def fail_one(field: str, message: str, as_json: bool, code: int = VALIDATION_EXIT, option: str | None = None,
             extra: dict[str, Any] | None = None) -> NoReturn:
    fail([{"field": field, "message": message, **({"option": option} if option else {})}], as_json, code, extra)


def read_lyrics(lyrics: str | None, lyrics_file: str | None, as_json: bool) -> str | None:
    if lyrics is not None and lyrics_file is not None:
        fail_one("lyrics", "give --lyrics or --lyrics-file, not both", as_json)
    if lyrics_file is None:
        return lyrics
    if lyrics_file == "-":
        return sys.stdin.read()
    try:
        return Path(lyrics_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        fail_one("lyrics", f"cannot read {lyrics_file!r}: {reason}", as_json, option="--lyrics-file")


def job_view_or_fail(settings: Settings, job_id: str, as_json: bool) -> dict[str, Any]:
    from orchestrator.job_views import load_job_view

    view = load_job_view(settings, job_id)
    if view is None:
        fail_one("id", f"no job with id {job_id!r}", as_json)
    return view


def wait_for_job(settings: Settings, job_id: str, timeout_s: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it is terminal, printing each stage's status changes on stderr."""
    from orchestrator.job_views import TERMINAL_JOB_STATUSES, load_job_view

    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        view = load_job_view(settings, job_id)
        if view is None:
            raise click.ClickException(f"no job with id {job_id!r}")
        for stage in view["stages"]:
            key = (stage["stage"], stage["attempt"])
            if seen.get(key) != stage["status"]:
                seen[key] = stage["status"]
                if not quiet and stage["status"] not in STAGE_CLAIMABLE:
                    click.echo(f"  {stage['stage']:<16} {stage['status']}", err=True)
        if view["status"] in TERMINAL_JOB_STATUSES:
            return view
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} still {view['status']} after {timeout_s:g} s (--timeout)")
        time.sleep(0.5)


def summary(view: dict[str, Any], settings: Settings) -> str:
    from orchestrator.song_page import display_status, latest_attempts
    from orchestrator.stack import audio_path

    latest = latest_attempts(view)
    lines = [f"job {view['id']}: {view['status']}  seed {view['seed']} ({view['seed_source']})",
             f"  tags: {view['tags_used'] or '-'}",
             f"  length: {view['request'].get('max_audio_length_ms', 0) / 1000:g} s"]
    if view.get("notice"):
        lines.append(f"  model: {view['notice']}")
    for stage in view["stages"]:
        took = f"{stage['duration_s']:.1f} s" if stage["duration_s"] is not None else ""
        shown = display_status(stage, view, latest)  # a stage that will never run reads skipped/superseded
        lines.append(f"  {stage['stage']:<16} #{stage['attempt']} {stage['queue']:<4} {shown:<10} {took}")
        if stage["error_type"]:
            lines.append(f"      {stage['error_type']}: {stage['error_message']}")
    path = audio_path(view, settings)
    if path is not None:
        lines.append(f"  audio: {path}")
    return "\n".join(lines)


def finish(view: dict[str, Any], settings: Settings, as_json: bool, waited: bool) -> None:
    if as_json:
        print_json(view)
    elif waited:
        click.echo(summary(view, settings))
    if waited and view["status"] != "succeeded":
        sys.exit(FAILURE_EXIT)


# -- submit -------------------------------------------------------------------------------------

def _merge_alias(value: Any, alias: Any, name: str, as_json: bool) -> Any:
    if value is not None and alias is not None and value != alias:
        fail_one(name.lstrip("-").replace("-", "_"), "given twice with different values", as_json, option=name)
    return value if value is not None else alias


@click.command()
@click.option("--lyrics", default=None, help="lyrics text (or --lyrics-file)")
@click.option("--lyrics-file", default=None, help="file with the lyrics; '-' reads stdin")
@click.option("--tags", default=None, help="comma-separated, e.g. 'ska,upbeat'")
@click.option("--style", default=None, help="free-text style description")
@click.option("--seed", type=int, default=None, help="drawn at submission when omitted (and recorded)")
@click.option("--max-audio-length-ms", type=int, default=None,
              help="song length in milliseconds; default: 240000, capped at what the deployed model allows")
@click.option("--max-ms", "max_ms_alias", type=int, default=None, hidden=True)
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", "top_k", type=int, default=None)
@click.option("--cfg-scale", "cfg_scale", type=float, default=None)
@click.option("--output-format", type=click.Choice(["mp3", "wav"]), default=None)
@click.option("--format", "format_alias", type=click.Choice(["mp3", "wav"]), default=None, hidden=True)
@click.option("--lyrics-backend", type=click.Choice(["rules", "llm", "off"]), default=None)
@click.option("--tags-backend", type=click.Choice(["embedding", "llm", "given"]), default=None)
@click.option("--wait", is_flag=True, help="wait until the job has finished; exit 1 unless it succeeded")
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help="with --wait")
@click.option("--json", "as_json", is_flag=True, help="print the job record as JSON (the API's shape)")
def submit(lyrics: str | None, lyrics_file: str | None, wait: bool, timeout_s: float, as_json: bool,
           max_ms_alias: int | None, format_alias: str | None, **fields: Any) -> None:
    """Submit a song job (same validation as the API); prints the job id, or the record with --json."""
    from orchestrator.cli import _broker_settings, _require_schema
    from orchestrator.request_parsing import RequestInvalid, parse_job_request
    from orchestrator.submission import submit_job

    fields["max_audio_length_ms"] = _merge_alias(fields["max_audio_length_ms"], max_ms_alias,
                                                 "--max-audio-length-ms", as_json)
    fields["output_format"] = _merge_alias(fields["output_format"], format_alias, "--output-format", as_json)
    payload = {name: value for name, value in fields.items() if value is not None}
    text = read_lyrics(lyrics, lyrics_file, as_json)
    payload["lyrics"] = text if text is not None else ""
    try:
        request = parse_job_request(payload, _settings())
    except RequestInvalid as exc:
        fail(exc.errors, as_json)
    settings = _broker_settings()
    _require_schema(settings)
    submitted = submit_job(request, settings, source="cli")
    if not as_json:
        click.echo(f"job {submitted.id} queued (seed {submitted.seed}, {submitted.seed_source}, "
                   f"{request.max_audio_length_ms / 1000:g} s)")
    view = wait_for_job(settings, submitted.id, timeout_s, quiet=as_json) if wait \
        else job_view_or_fail(settings, submitted.id, as_json)
    finish(view, settings, as_json, wait)


# -- show, list ---------------------------------------------------------------------------------

@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="the job with every stage row, as the API returns it")
def show(job_id: str, as_json: bool) -> None:
    """Show a job and every stage attempt."""
    settings = _settings()
    view = job_view_or_fail(settings, job_id, as_json)
    if as_json:
        print_json(view)
    else:
        click.echo(summary(view, settings))


def recent_jobs(settings: Settings, limit: int, status: str | None) -> list[dict[str, Any]]:
    """The newest jobs, one line each: id, status, created, length, tags used, title."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import Job, StageRun
    from tasks.stage_inputs import song_title

    with session_scope(settings.resolved_database_url) as session:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        jobs = list(session.scalars(query))
        tags: dict[str, str] = {}
        if jobs:
            rows = session.scalars(select(StageRun).where(StageRun.job_id.in_([j.id for j in jobs]),
                                                          StageRun.stage == "generate_tags")
                                   .order_by(StageRun.attempt))
            for row in rows:
                if row.outputs and row.outputs.get("tags_string"):
                    tags[row.job_id] = row.outputs["tags_string"]
        return [{"id": job.id, "status": job.status, "created_at": job.created_at.isoformat(),
                 "length_s": (job.request or {}).get("max_audio_length_ms", 0) / 1000,
                 "tags_used": tags.get(job.id), "title": song_title((job.request or {}).get("lyrics", "")),
                 "replay_of": job.replay_of} for job in jobs]


@click.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--status", type=click.Choice([status.value for status in JobStatus]), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the jobs as a JSON list")
def list_jobs(limit: int, status: str | None, as_json: bool) -> None:
    """List the newest jobs (id, status, created, length, tags used, title)."""
    jobs = recent_jobs(_settings(), limit, status)
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        click.echo("no jobs")
    for job in jobs:
        click.echo(f"{job['id']}  {job['status']:<9}  {job['created_at'][:19].replace('T', ' ')}  "
                   f"{job['length_s']:>6g} s  {(job['tags_used'] or '-'):<24.24}  {job['title']}")


# -- cancel, download ---------------------------------------------------------------------------

@click.command()
@click.argument("job_id")
@click.option("--reason", default=None, help="recorded on the job")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, reason: str | None, as_json: bool) -> None:
    """Ask a queued or running job to stop (its stages end as cancelled)."""
    from orchestrator import replay

    try:
        changed = replay.cancel(job_id, reason=reason or "cancelled from the command line", requested_by="cli",
                                settings=_settings())
    except replay.JobNotFound:
        fail_one("id", f"no job with id {job_id!r}", as_json)
    except replay.ReplayConflict as exc:
        fail_one("id", str(exc), as_json, code=FAILURE_EXIT)
    if as_json:
        print_json({"job_id": job_id, "cancel_requested": True, "changed": changed})
    else:
        click.echo(f"job {job_id}: cancel {'requested' if changed else 'was already requested'}")


@click.command()
@click.argument("job_id")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="file or folder to write to; default: a readable name in the current folder")
@click.option("--json", "as_json", is_flag=True)
def download(job_id: str, out: Path | None, as_json: bool) -> None:
    """Save a finished job's audio file (named after its first lyric line and job id)."""
    from db.engine import session_scope
    from orchestrator.job_views import audio_artifact
    from tasks.artifact_store import open_store
    from tasks.audio_files import song_filename
    from tasks.stage_inputs import song_title

    settings = _settings()
    view = job_view_or_fail(settings, job_id, as_json)
    with session_scope(settings.resolved_database_url) as session:
        artifact = audio_artifact(session, job_id)
        sha256 = artifact.sha256 if artifact is not None else None
    if sha256 is None:
        fail_one("id", f"job {job_id} is {view['status']} and has no audio", as_json, code=FAILURE_EXIT)
    name = song_filename(song_title(view["request"].get("lyrics", "")), job_id, view["output_format"])
    target = (out / name if out.is_dir() else out) if out is not None else Path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(open_store(settings.resolved_artifact_dir).get(sha256))
    if as_json:
        print_json({"job_id": job_id, "path": str(target), "sha256": sha256})
    else:
        click.echo(str(target))


COMMANDS = (submit, show, list_jobs, cancel, download)
