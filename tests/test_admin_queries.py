"""The dashboard's reads: filters, counts, keyset pages, a fixed number of queries, full records.

Runs against SQLite and PostgreSQL with a few hundred seeded jobs (bench/seed_jobs.py's generator)
plus hand-made ones whose values the tests know.
"""
from __future__ import annotations

import datetime as dt
import re
import struct
import zlib

import numpy as np
import pytest
from sqlalchemy import event, insert
from werkzeug.datastructures import MultiDict
from werkzeug.security import generate_password_hash

from bench.seed_jobs import make_rows
from db.engine import get_engine, session_scope
from db.models import Job, StageRun
from orchestrator import compare as compare_module
from orchestrator import images
from orchestrator.admin import queries, stats, workers
from orchestrator.app import create_app
from orchestrator.submission import new_job_rows
from tasks.contracts import STAGES, JobRequest
from tasks.settings import Settings

SEEDED = 300
PASSWORD = "admin-secret-1"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("queries-data"), database_url=database_url,
                    admin_password_hash=generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000"))


@pytest.fixture(scope="module")
def seeded(settings: Settings) -> dict[str, str]:
    """SEEDED generated jobs plus three known ones; returns the known jobs' ids by name."""
    jobs, runs = [], []
    for job, job_runs in make_rows(SEEDED, seed=1, now=NOW - dt.timedelta(hours=1), days=10):
        jobs.append({"replay_of": None, "replay_from_stage": None, "replay_overrides": None, "cancel_reason": None,
                     "client_id": None, "cancel_requested_by": None, "cancel_requested_at": None, **job})
        runs.extend(job_runs)
    keys = [c.key for c in StageRun.__table__.columns if c.key != "id"]
    with get_engine(settings.resolved_database_url).begin() as connection:
        connection.execute(insert(Job.__table__), jobs)
        connection.execute(insert(StageRun.__table__), [{k: r.get(k) for k in keys} for r in runs])
    known = {}
    with session_scope(settings.resolved_database_url) as session:
        special = new_job_rows(session, JobRequest(lyrics="100% pure_fun\nquokka " + "long line " * 200,
                                                   tags="ska,brass"), settings, source="form")
        special.created_at = NOW
        known["special"] = special.id
        other = new_job_rows(session, JobRequest(lyrics="100 percent purexfun", tags="jazz"), settings, source="api")
        other.created_at = NOW - dt.timedelta(minutes=1)
        known["lookalike"] = other.id
    return known


def page(session, **args) -> queries.JobPage:
    return queries.list_jobs(session, queries.JobFilters.from_args(MultiDict(args)))


def all_pages(session, **args) -> list[dict]:
    seen, cursor = [], None
    while True:
        result = page(session, **args, **({"cursor": cursor} if cursor else {}))
        seen.extend(result.rows)
        cursor = result.next_cursor
        if not cursor:
            return seen


def test_status_counts_add_up_and_match_the_status_filter(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        everything = page(session, limit="200")
        assert everything.total == SEEDED + 2
        for status, count in everything.counts.items():
            assert len(all_pages(session, status=status, limit="200")) == count, status


def test_keyset_pages_cover_every_job_once_newest_first(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        rows = all_pages(session, limit="25")
    assert len(rows) == SEEDED + 2 and len({r["id"] for r in rows}) == SEEDED + 2
    keys = [(queries._naive_utc(r["created_at"]), r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    assert rows[0]["id"] == seeded["special"]


def test_oldest_first_and_offset_sorts_page_consistently(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        ascending = all_pages(session, sort="created_asc", limit="50")
        first = page(session, sort="finished_desc", limit="25")
        second = page(session, sort="finished_desc", limit="25", page=str(first.next_page))
    assert [r["id"] for r in ascending] == [r["id"] for r in reversed(all_pages_desc(settings))]
    assert not {r["id"] for r in first.rows} & {r["id"] for r in second.rows}


def all_pages_desc(settings):
    with session_scope(settings.resolved_database_url) as session:
        return all_pages(session, limit="200")


def test_failing_stage_and_error_type_filters(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        failed = all_pages(session, status="failed", limit="200")
        decode = all_pages(session, stage="decode_audio", limit="200")
        by_type = all_pages(session, error_type="gpu_worker.model.token_validation.InvalidCodesError", limit="200")
    assert decode and all(r["failed_stage"] == "decode_audio" for r in decode)
    assert {r["id"] for r in decode} == {r["id"] for r in failed if r["failed_stage"] == "decode_audio"}
    assert {r["id"] for r in by_type} == {r["id"] for r in decode}


def test_text_filter_is_literal_and_case_insensitive(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        percent = page(session, q="100% PURE_fun")
        word = page(session, q="Quokka")
        many = page(session, q="river", limit="25")
    assert [r["id"] for r in percent.rows] == [seeded["special"]]  # % and _ are not wildcards
    assert [r["id"] for r in word.rows] == [seeded["special"]] and word.total == 1
    assert many.total > 25 and len(many.rows) == 25 and many.next_cursor


def test_text_filter_pages_match_the_sql_order_for_few_and_many_matches(settings, seeded, monkeypatch):
    with session_scope(settings.resolved_database_url) as session:
        via_sql = all_pages(session, q="river", limit="25")
        monkeypatch.setattr(queries, "TEXT_SCAN_MAX_MATCHES", 10**9)
        via_scan = all_pages(session, q="river", limit="25")
    assert [r["id"] for r in via_scan] == [r["id"] for r in via_sql]


def test_date_range_filter(settings, seeded):
    today = NOW.date()
    with session_scope(settings.resolved_database_url) as session:
        recent = all_pages(session, **{"from": today.isoformat(), "to": today.isoformat()}, limit="200")
    assert seeded["special"] in {r["id"] for r in recent}
    assert all(queries._naive_utc(r["created_at"]).date() == today for r in recent)


def test_bad_filters_are_refused_with_the_reason(settings):
    for args, message in (({"status": "lost"}, "status"), ({"sort": "random"}, "sort"), ({"limit": "7"}, "limit"),
                          ({"from": "yesterday"}, "from"), ({"cursor": "@@"}, "cursor"),
                          ({"limit": "many"}, "^limit must be a whole number"),
                          ({"page": "two"}, "^page must be a whole number"),
                          ({"page": "9" * 30}, "^page must be at most"), ({"to": "2026-13-01"}, "^to must")):
        with pytest.raises(queries.BadFilter, match=message):
            with session_scope(settings.resolved_database_url) as session:
                page(session, **args)


@pytest.fixture(scope="module")
def client(settings: Settings, seeded):
    client = create_app(settings).test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/admin/login").get_data(as_text=True)).group(1)
    assert client.post("/admin/login", data={"username": "admin", "password": PASSWORD,
                                             "csrf_token": token}).status_code == 302
    return client


def count_statements(settings: Settings, action) -> int:
    statements = []
    engine = get_engine(settings.resolved_database_url)

    def listener(*_args, **_kwargs):
        statements.append(1)

    event.listen(engine, "before_cursor_execute", listener)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    return len(statements)


def test_the_list_page_runs_the_same_few_queries_for_25_or_200_rows(settings, client):
    small = count_statements(settings, lambda: client.get("/admin/jobs?limit=25"))
    large = count_statements(settings, lambda: client.get("/admin/jobs?limit=200"))
    assert small == large <= 4  # counts, the page, error types, the tags used


def test_the_job_page_runs_a_fixed_number_of_queries(settings, client, seeded):
    with session_scope(settings.resolved_database_url) as session:
        busy = all_pages(session, status="succeeded", limit="25")[0]["id"]
    assert count_statements(settings, lambda: client.get(f"/admin/jobs/{busy}")) <= 6


def test_the_job_page_shows_long_text_in_full(client, seeded):
    html = client.get(f"/admin/jobs/{seeded['special']}").get_data(as_text=True)
    assert "quokka " + "long line " * 200 in html.replace("\n", "") or ("long line " * 200).strip() in html
    assert "<details" in html


def test_list_filter_form_round_trips_through_the_page(client, seeded):
    html = client.get("/admin/jobs?q=quokka").get_data(as_text=True)
    assert seeded["special"][:12] in html and seeded["lookalike"][:12] not in html


def test_compare_reports_field_level_input_differences():
    diffs = compare_module.diff({"a": 1, "p": {"seed": 1, "t": 1.0}, "x": [1]}, {"a": 1, "p": {"seed": 2, "t": 1.0}})
    assert [(d.path, d.a, d.b) for d in diffs] == [("p.seed", 1, 2), ("x", [1], None)]


def test_token_grid_picture_is_a_png_with_invalid_codes_in_red():
    codes = np.zeros((8, 10), dtype=np.int16)
    codes[3, 5] = 8192
    data = images.token_grid_png(codes)
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (120, 8 * 12 + 7)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:-16])
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width * 3 + 1)[:, 1:].reshape(height, width, 3)
    assert tuple(pixels[3 * 13 + 2, 5 * 12 + 1]) == images.BAD_CODE_RGB
    assert tuple(pixels[2, 2]) != images.BAD_CODE_RGB


def test_waveform_picture_reads_16_bit_stereo_wav():
    from tasks.audio_files import wav_bytes

    audio = np.stack([np.sin(np.linspace(0, 60, 4800)), np.zeros(4800)]).astype(np.float32) * 0.5
    data = images.waveform_png(wav_bytes(audio)[0], width=200)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (200, 161)


def test_stats_percentiles_failures_and_counts_over_one_window(settings, seeded):
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and stats.percentile([], 95) is None
    with session_scope(settings.resolved_database_url) as session:
        overview = stats.stats_overview(session, window_hours=24 * 30)
    assert len(overview["over_time"]) == stats.BUCKETS and sum(b["total"] for b in overview["over_time"]) >= 2
    assert overview["bucket_hours"] == 30  # the chart covers the same 30 days as every table
    waits = next(d for d in overview["queue_waits"] if d["stage"] == "generate_tokens")
    assert waits["count"] > 0 and 0 <= waits["p50"] <= waits["p95"]
    audio = overview["submission_to_audio"]
    assert audio["count"] > 0 and 0 < audio["p50"] <= audio["p95"] <= audio["max"]
    assert {f["stage"] for f in overview["failures"]} <= set(STAGES)
    tokens = next(d for d in overview["durations"] if d["stage"] == "generate_tokens")
    assert tokens["count"] > 0 and tokens["p50"] <= tokens["p95"] <= tokens["max"]


def test_workers_are_listed_from_their_newest_recorded_environment(settings, seeded):
    with session_scope(settings.resolved_database_url) as session:
        recorded = workers.recorded_workers(session)
    assert {(w["host"][:3], w["queue"]) for w in recorded} == {("gpu", "gpu"), ("cpu", "cpu")}
    assert all(w["last_heartbeat"] is not None for w in recorded)


def test_queue_lengths_say_why_when_no_broker_is_configured(settings):
    assert "REDIS_URL" in workers.queue_lengths(settings)["error"]
