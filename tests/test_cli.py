"""`songpipe` against a running stack (SQLite, real workers): submit, show, and the stage reproductions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.audio_files import SAMPLE_RATE, decoded_samples
from tasks.contracts import STAGES
from tests.stack_fixtures import Stack

pytestmark = pytest.mark.integration

LYRICS = "de doo doo doo\nde blaa blaa blaa\nis all I want to sing to you\n"
# The example command (seed 7); the tiny checkpoint cannot sample EOS by chance, so the
# song runs to the requested 50 frames.
SEED = 7
FRAME_SAMPLES = SAMPLE_RATE * 80 // 1000
_jobs: dict[str, dict] = {}


@pytest.fixture
def submitted(sqlite_stack: Stack, tmp_path_factory) -> dict:
    """`songpipe submit ... --wait --json` once for this module: its exit code and printed record."""
    if "song" not in _jobs:
        lyrics = tmp_path_factory.mktemp("cli") / "lyrics.txt"
        lyrics.write_text(LYRICS)
        result = sqlite_stack.run_cli("submit", "--lyrics-file", str(lyrics), "--tags", "ska", "--seed", str(SEED),
                                      "--max-audio-length-ms", "4000", "--wait", "--json")
        _jobs["song"] = {"result": result, "job": json.loads(result.stdout) if result.stdout.strip() else None}
    return _jobs["song"]


@pytest.fixture
def shown(sqlite_stack: Stack, submitted) -> dict:
    result = sqlite_stack.run_cli("show", submitted["job"]["id"], "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _stage(job: dict, name: str) -> dict:
    return next(row for row in job["stages"] if row["stage"] == name)


def test_submit_wait_json_exits_zero_with_the_finished_job(submitted):
    assert submitted["result"].returncode == 0, submitted["result"].stderr
    assert submitted["job"]["status"] == "succeeded"


def test_show_json_lists_five_stage_rows(shown):
    assert [row["stage"] for row in shown["stages"]] == list(STAGES)


def test_show_json_has_the_api_shape(shown, sqlite_stack):
    assert shown == sqlite_stack.job(shown["id"])


def test_seed_from_the_command_line_reaches_the_token_stage(shown):
    assert _stage(shown, "generate_tokens")["inputs"]["seed"] == SEED


def test_tags_from_the_command_line_reach_the_model(shown):
    assert _stage(shown, "generate_tokens")["inputs"]["tags"] == "ska"


def test_mp3_lasts_the_requested_length_within_one_frame(shown, sqlite_stack):
    tokens = _stage(shown, "generate_tokens")["outputs"]
    assert tokens["stop_reason"] == "max_length" and tokens["frames"] == 4000 // 80
    audio = _stage(shown, "encode_audio")["outputs"]["audio"]
    assert audio["kind"] == "mp3"
    path = sqlite_stack.settings.resolved_artifact_dir / audio["sha256"][:2] / audio["sha256"][2:4] / audio["sha256"]
    samples = decoded_samples(path.read_bytes())
    assert abs(samples - 4 * SAMPLE_RATE) <= FRAME_SAMPLES


def test_submit_without_wait_prints_the_job_id(sqlite_stack):
    result = sqlite_stack.run_cli("submit", "--lyrics", "la la la", "--tags", "ska", "--max-ms", "160")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("job ") and "queued" in result.stdout


def test_invalid_input_exits_2_with_field_and_message(sqlite_stack):
    result = sqlite_stack.run_cli("submit", "--lyrics", "  ", "--tags", "ska", "--temperature", "0")
    assert result.returncode == 2
    assert "--lyrics/--lyrics-file: must not be empty" in result.stderr
    assert "--temperature: " in result.stderr  # every error at once, each naming its option


def test_length_beyond_the_model_exits_2_naming_the_option(sqlite_stack):
    result = sqlite_stack.run_cli("submit", "--lyrics", "la", "--tags", "ska", "--max-audio-length-ms", "600000")
    assert result.returncode == 2 and result.stderr.startswith("--max-audio-length-ms: ")


def test_old_max_ms_spelling_still_works_as_a_hidden_alias(sqlite_stack):
    result = sqlite_stack.run_cli("submit", "--lyrics", "la", "--tags", "ska", "--max-ms", "600000")
    assert result.returncode == 2 and "--max-audio-length-ms: " in result.stderr
    assert "--max-ms" not in sqlite_stack.run_cli("submit", "--help").stdout


def test_missing_lyrics_file_exits_2_with_one_line_and_no_traceback(sqlite_stack, tmp_path):
    result = sqlite_stack.run_cli("submit", "--lyrics-file", str(tmp_path / "missing.txt"), "--tags", "ska")
    print(result.stderr)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("--lyrics-file: cannot read") and "No such file" in result.stderr


def test_missing_lyrics_file_with_json_exits_2_too(sqlite_stack, tmp_path):
    result = sqlite_stack.run_cli("submit", "--lyrics-file", str(tmp_path / "missing.txt"), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["errors"][0]["option"] == "--lyrics-file"


def test_default_length_fits_the_deployed_model_and_is_recorded(sqlite_stack):
    result = sqlite_stack.run_cli("submit", "--lyrics", "la la la", "--tags", "ska", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["request"]["max_audio_length_ms"] == 10_240  # the tiny model's limit


@pytest.mark.parametrize("as_json", [False, True])
def test_show_unknown_job_exits_2_with_and_without_json(sqlite_stack, as_json):
    result = sqlite_stack.run_cli("show", "0" * 32, *(["--json"] if as_json else []))
    assert result.returncode == 2
    assert "no job" in (json.loads(result.stdout)["errors"][0]["message"] if as_json else result.stderr)


def test_list_shows_the_job_with_the_tags_used_and_its_title(sqlite_stack, submitted):
    result = sqlite_stack.run_cli("list", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    row = next(job for job in json.loads(result.stdout) if job["id"] == submitted["job"]["id"])
    assert row["status"] == "succeeded" and row["tags_used"] == "ska" and row["title"] == "de doo doo doo"
    text = sqlite_stack.run_cli("list", "--status", "succeeded", "--limit", "1000").stdout
    assert submitted["job"]["id"] in text


def test_download_writes_the_mp3_under_a_readable_name_with_id3_tags(sqlite_stack, submitted, tmp_path):
    from tasks.audio_files import read_mp3_tags

    job_id = submitted["job"]["id"]
    result = sqlite_stack.run_cli("download", job_id, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    path = tmp_path / f"de-doo-doo-doo-{job_id[:8]}.mp3"
    assert result.stdout.strip() == str(path) and path.is_file()
    tags = read_mp3_tags(path.read_bytes())
    assert tags["TIT2"] == "de doo doo doo" and tags["TXXX:songpipe_job_id"] == job_id
    assert tags["TXXX:songpipe_seed"] == str(SEED) and tags["TXXX:AI_GENERATED"] == "AI-generated"
    assert len(tags["TXXX:songpipe_model_checksum"]) == 16


def test_encode_stage_records_the_loudness(shown):
    outputs = _stage(shown, "encode_audio")["outputs"]
    assert outputs["loudness_lufs"] is not None and outputs["gain_db"] == 0.0  # no target configured


def test_cancel_a_queued_job_and_refuse_a_finished_one(sqlite_stack, submitted):
    from db.engine import session_scope
    from orchestrator.submission import new_job_rows
    from tasks.contracts import JobRequest

    # rows written but nothing sent: the job stays queued, whatever the workers do
    with session_scope(sqlite_stack.settings.resolved_database_url) as session:
        queued = new_job_rows(session, JobRequest(lyrics="la", tags="ska", max_audio_length_ms=160),
                              sqlite_stack.settings, source="cli")
        queued_id = queued.id
    result = sqlite_stack.run_cli("cancel", queued_id, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cancel_requested"] is True
    assert sqlite_stack.job(queued_id)["cancel_requested"] is True
    finished = sqlite_stack.run_cli("cancel", submitted["job"]["id"])
    assert finished.returncode == 1 and "only queued or running jobs" in finished.stderr


def test_replay_wait_runs_the_new_job_to_the_end(sqlite_stack, submitted):
    result = sqlite_stack.run_cli("replay", submitted["job"]["id"], "--mode", "new", "--from-stage", "encode_audio",
                                  "--wait", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["job"]["status"] == "succeeded" and body["job"]["replay_of"] == submitted["job"]["id"]


def test_replay_of_an_unknown_job_exits_2_with_and_without_json(sqlite_stack):
    plain = sqlite_stack.run_cli("replay", "0" * 32, "--mode", "retry")
    as_json = sqlite_stack.run_cli("replay", "0" * 32, "--mode", "retry", "--json")
    assert plain.returncode == as_json.returncode == 2


def test_generate_tokens_from_a_stored_input_reproduces_the_recorded_tokens(shown, sqlite_stack, tmp_path):
    out = tmp_path / "tokens.npy"
    result = sqlite_stack.run_cli("stage", "generate-tokens", "--from-job", shown["id"], "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"] == _stage(shown, "generate_tokens")["inputs"]
    assert report["same_artifact_as_recorded"] is True
    assert np.load(out).shape == (8, 50)


def test_decode_audio_from_plain_arguments_writes_a_wav(sqlite_stack, tmp_path):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 8192, size=(8, 10), dtype=np.int16))
    out = tmp_path / "out.wav"
    result = sqlite_stack.run_cli("stage", "decode-audio", "--tokens", str(tokens), "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["samples"] == 10 * FRAME_SAMPLES
    assert decoded_samples(out.read_bytes()) == 10 * FRAME_SAMPLES


def test_generate_tokens_requires_a_seed(sqlite_stack):
    result = sqlite_stack.run_cli("stage", "generate-tokens", "--lyrics", "la", "--tags", "ska", "--max-audio-length-ms", "160")
    assert result.returncode == 2 and "--seed: " in result.stderr


def test_from_job_with_another_checkpoint_path_reports_the_override(shown, sqlite_stack, tmp_path):
    copy = tmp_path / "same-files-elsewhere"
    copy.symlink_to(sqlite_stack.checkpoint, target_is_directory=True)
    result = sqlite_stack.run_cli("stage", "generate-tokens", "--from-job", shown["id"], "--checkpoint", str(copy))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"]["overrides"]["checkpoint"]["recorded"] == str(sqlite_stack.checkpoint)
    assert report["same_artifact_as_recorded"] is True
