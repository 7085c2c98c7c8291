"""Streaming a song while it is made (issue 15): `songpipe run` with batching on, real processes.

The tiny checkpoint here has small codec windows (48 frames, hop 40), so a 10.24 s tiny song (128 frames)
spans 3 windows, like a 75 s song at the published 372/320. The token stage starts the decode stage at
the first window's frames; the decode records each window (`stream_windows`) as its frames are
checkpointed. The checks: the first window is recorded before the token stage ends; the streamed
samples are the final WAV's samples; a SIGKILL of the GPU worker between windows 1 and 2 still ends in
one succeeded song whose audio equals an uninterrupted run with the same seed.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tasks.storage.base import artifact_key
from tests.stack_fixtures import wait_until
from tests.supervised_stack import supervised_stack

pytestmark = pytest.mark.integration

WINDOWS = (48, 40)  # window frames, hop frames: windows need 48, 88 and (the last, wrapped) 128 frames
STREAM_ENV = {"SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_TOKEN_CHECKPOINT_FRAMES": "16"}
BODY = {"lyrics": "de doo doo doo\nde blaa blaa blaa", "seed": 4242, "max_audio_length_ms": 10_240,
        "tags": ["ska", "songpipe-fault-slow-60"],  # a frame step every 60 ms: the stream runs ahead of the end
        "output_format": "wav"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-windows", codec_windows=WINDOWS)
    with supervised_stack(tmp_path_factory.mktemp("streaming"), checkpoint, STREAM_ENV) as running:
        yield running


def _rows(stack, sql: str, *args: Any) -> list[dict[str, Any]]:
    with sqlite3.connect(stack.data_dir / "songpipe.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(row) for row in db.execute(sql, args).fetchall()]
    for row in rows:
        for key in ("progress", "environment", "outputs", "inputs"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
    return rows


def attempts(stack, job_id: str, stage: str) -> list[dict[str, Any]]:
    return _rows(stack, "SELECT * FROM stage_runs WHERE job_id = ? AND stage = ? ORDER BY attempt", job_id, stage)


def windows(stack, job_id: str) -> list[dict[str, Any]]:
    return _rows(stack, "SELECT * FROM stream_windows WHERE job_id = ? ORDER BY attempt, window", job_id)


def artifact(stack, sha256: str) -> bytes:
    return (Path(stack.data_dir) / "artifacts" / artifact_key(sha256)).read_bytes()


def _when(value: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _arrivals(heard: list[tuple[dt.datetime, bytes]]):
    """(arrival time of the chunk that carried the first PCM byte, ...) - the 44 header bytes skipped."""
    read = 0
    for at, chunk in heard:
        read += len(chunk)
        yield (at if read > 44 else None), chunk


def succeeded(stack, job_id: str, stage: str) -> dict[str, Any]:
    (row,) = [r for r in attempts(stack, job_id, stage) if r["status"] == "succeeded"]
    return row


def listen(stack, job_id: str, heard: list) -> threading.Thread:
    """What a listener receives from GET /api/jobs/<id>/stream, read as it arrives, with arrival times."""
    def read() -> None:
        with urllib.request.urlopen(f"{stack.base_url}/api/jobs/{job_id}/stream", timeout=240) as response:
            while chunk := response.read1(1 << 16):
                heard.append((dt.datetime.now(dt.UTC), chunk))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_three_window_song_streams_before_its_tokens_end_and_the_stream_is_the_wav(stack):
    job_id = stack.submit(BODY)
    heard: list[tuple[dt.datetime, bytes]] = []
    listener = listen(stack, job_id, heard)
    view = stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", view.get("error_message")
    listener.join(60)

    tokens, decode = succeeded(stack, job_id, "generate_tokens"), succeeded(stack, job_id, "decode_audio")
    assert tokens["outputs"]["frames"] == 128, "the song must run its full length to span 3 windows"
    rows = windows(stack, job_id)
    assert [r["window"] for r in rows] == [0, 1, 2] and {r["attempt"] for r in rows} == {decode["attempt"]}
    # the first two windows were decoded while the token stage still ran
    assert _when(rows[0]["finished_at"]) < _when(tokens["finished_at"])
    assert _when(rows[1]["finished_at"]) < _when(tokens["finished_at"])
    assert tokens["environment"]["stream_started"] == {"decode_attempt": decode["attempt"]}
    assert decode["environment"]["streamed"]["windows_before_tokens_finished"] == 2
    # the decode recorded the finished grid it decoded, and that it followed the token stage
    assert decode["inputs"]["tokens"] == tokens["outputs"]["tokens"] and decode["inputs"]["frames"] == 128
    assert decode["inputs"]["follow"]["attempt"] == tokens["attempt"]

    # contiguous final samples; their bytes are the WAV's data chunk, sample for sample
    assert rows[0]["sample_start"] == 0
    assert all(a["sample_end"] == b["sample_start"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["sample_end"] == decode["outputs"]["samples"] == 128 * 3840
    streamed = b"".join(artifact(stack, r["pcm_sha256"]) for r in rows)
    wav = artifact(stack, decode["outputs"]["wav"]["sha256"])
    assert wav[:4] == b"RIFF" and wav[36:40] == b"data"
    assert streamed == wav[44:]
    # what the listener was sent, while it was made: the WAV's samples, the first ones before the tokens ended
    body = b"".join(chunk for _, chunk in heard)
    assert body[:4] == b"RIFF" and body[44:] == wav[44:]
    first_audio = next(at for at, _ in _arrivals(heard) if at is not None)
    assert first_audio < _when(tokens["finished_at"])
    # each window's frames digest is the finished grid's slice (what was decoded is what was generated)
    import numpy as np

    from gpu_worker.worker.streaming_decode import slice_sha256
    grid = np.load(stack.data_dir / "artifacts" / artifact_key(tokens["outputs"]["tokens"]["sha256"]))
    padded = grid[:, np.arange(128) % 128]
    assert [r["tokens_sha256"] for r in rows] == [slice_sha256(padded[:, 40 * w:40 * w + 48]) for w in range(3)]

    # the encode stage ran once, sent by the decode that streamed (the chain's own delivery backed off)
    assert [r["status"] for r in attempts(stack, job_id, "encode_audio")] == ["succeeded"]

    # replayed from its stored inputs (the finished grid it recorded) outside Celery: the same WAV, bit for bit
    replayed = stack.cli("stage", "decode-audio", "--from-job", job_id)
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert report["inputs"]["tokens"] == tokens["outputs"]["tokens"] and report["same_artifact_as_recorded"] is True


def test_cancelling_a_song_while_it_streams_ends_both_stages_and_the_stream(stack):
    job_id = stack.submit({**BODY, "seed": 4545})
    heard: list[tuple[dt.datetime, bytes]] = []
    listener = listen(stack, job_id, heard)
    wait_until(lambda: bool(windows(stack, job_id)), 180, "window 0 of the stream")
    assert stack.cli("cancel", job_id).returncode == 0
    assert stack.wait_for_job(job_id)["status"] == "cancelled"
    listener.join(60)
    assert not listener.is_alive(), "the stream did not end with the job"
    statuses = {stage: [r["status"] for r in attempts(stack, job_id, stage)]
                for stage in ("generate_tokens", "decode_audio", "encode_audio")}
    assert statuses == {"generate_tokens": ["cancelled"], "decode_audio": ["cancelled"], "encode_audio": ["skipped"]}
    # what was final before the cancel was heard, and it is the recorded windows' samples
    rows = windows(stack, job_id)
    assert b"".join(chunk for _, chunk in heard)[44:] == b"".join(artifact(stack, r["pcm_sha256"]) for r in rows)


def test_a_gpu_worker_killed_between_windows_1_and_2_still_ends_in_one_song_equal_to_an_uninterrupted_run(stack):
    job_id = stack.submit({**BODY, "seed": 4343})

    def window_1_recorded() -> bool:
        return any(r["window"] == 1 for r in windows(stack, job_id))

    wait_until(window_1_recorded, 180, "window 1 of the stream")
    (tokens_running,) = attempts(stack, job_id, "generate_tokens")
    assert tokens_running["status"] == "running", "the token stage finished before the kill"
    old = stack.pid("gpu")
    os.killpg(old, signal.SIGKILL)
    assert stack.wait_for_new_pid("gpu", old) != old
    view = stack.wait_for_job(job_id)
    assert view["status"] == "succeeded", view.get("error_message")

    token_rows, decode_rows = attempts(stack, job_id, "generate_tokens"), attempts(stack, job_id, "decode_audio")
    assert [r["status"] for r in token_rows] == ["lost", "succeeded"]
    assert token_rows[1]["environment"]["resumed_from"]["attempt"] == 1
    # the decode that died with the process is replaced, never mixed with its successor
    assert decode_rows[0]["status"] in ("superseded", "lost") and decode_rows[-1]["status"] == "succeeded"
    assert [r["status"] for r in decode_rows].count("succeeded") == 1
    final = decode_rows[-1]
    wav = artifact(stack, final["outputs"]["wav"]["sha256"])
    rows = [r for r in windows(stack, job_id) if r["attempt"] == final["attempt"]]
    # the new decode streamed again from window 0, or (the resumed tokens finished first) decoded plainly
    assert [r["window"] for r in rows] in ([0, 1, 2], []), rows
    if rows:
        assert b"".join(artifact(stack, r["pcm_sha256"]) for r in rows) == wav[44:]
    heard: list[tuple[dt.datetime, bytes]] = []
    listen(stack, job_id, heard).join(60)  # a listener now gets the song, whichever way it was decoded
    assert b"".join(chunk for _, chunk in heard)[44:] == wav[44:]

    again = stack.submit({**BODY, "seed": 4343})  # the same request, never interrupted
    assert stack.wait_for_job(again)["status"] == "succeeded"
    for stage, key in (("generate_tokens", "tokens"), ("decode_audio", "wav")):
        assert succeeded(stack, job_id, stage)["outputs"][key]["sha256"] == \
            succeeded(stack, again, stage)["outputs"][key]["sha256"], stage


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Two engine slots (four pool threads) for six songs: most songs wait for a slot."""
    from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-windows", codec_windows=WINDOWS)
    with supervised_stack(tmp_path_factory.mktemp("crowded"), checkpoint,
                          {**STREAM_ENV, "SONGPIPE_GPU_BATCH_SLOTS": "2"}) as running:
        yield running


def test_songs_beyond_the_engine_slots_wait_in_the_broker_so_every_admitted_song_still_streams(crowded):
    """A token task that finds every slot taken goes back to the broker instead of holding a pool thread,
    so the decodes that follow the admitted songs always find a thread."""
    jobs = [crowded.submit({**BODY, "seed": 600 + i}) for i in range(6)]
    for job_id in jobs:
        assert crowded.wait_for_job(job_id, timeout_s=400)["status"] == "succeeded", job_id
    spans = []
    for job_id in jobs:
        tokens = succeeded(crowded, job_id, "generate_tokens")
        rows = windows(crowded, job_id)
        assert rows and _when(rows[0]["finished_at"]) < _when(tokens["finished_at"]), f"job {job_id} did not stream"
        spans.append((_when(tokens["started_at"]), _when(tokens["finished_at"])))
    # never more token stages at once than slots: the others waited in the broker, their rows queued
    busiest = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert busiest <= 2, spans
