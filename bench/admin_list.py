"""p50/p95 of the admin jobs list page at 100k jobs (Flask test client, logged in, real SQL).

Seeds the jobs first unless the database already holds at least --jobs of them, then requests each
list variant 50 times (after 3 warm-up requests) and prints a table. Also reports the number of
SQL statements one page runs (a fixed count: no N+1).

    .venv/bin/python -m bench.admin_list --data-dir /tmp/songpipe-bench
    DATABASE_URL=postgresql://user@host/db .venv/bin/python -m bench.admin_list
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import time

from sqlalchemy import event, func, select

from bench.seed_jobs import seed
from bench.table import print_table
from db.engine import get_engine, session_scope
from db.models import Job
from orchestrator.admin.auth import hash_password
from tasks.settings import Settings

PASSWORD = "bench-password-123"
VARIANTS = (
    ("newest first (default)", "/admin/jobs"),
    ("status=failed", "/admin/jobs?status=failed"),
    ("failing stage decode_audio", "/admin/jobs?stage=decode_audio"),
    ("error type", "/admin/jobs?error_type=gpu_worker.model.token_validation.InvalidCodesError"),
    ("text 'river' (common word)", "/admin/jobs?q=river"),
    ("text 'zebra' (no match: full scan)", "/admin/jobs?q=zebra"),
    ("date range (3 days)", None),  # filled in with dates relative to now
    ("page 2 (keyset cursor)", None),
    ("oldest first, 200 per page", "/admin/jobs?sort=created_asc&limit=200"),
    ("JSON list API", "/admin/api/jobs"),
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    settings = Settings(data_dir=args.data_dir, admin_password_hash=hash_password(PASSWORD)) if args.data_dir \
        else Settings(admin_password_hash=hash_password(PASSWORD))
    url = settings.resolved_database_url
    from db.schema import upgrade

    upgrade(url)
    with session_scope(url) as session:
        have = session.scalar(select(func.count()).select_from(Job)) or 0
    if have < args.jobs:
        print(f"seeding {args.jobs - have} jobs ...", flush=True)
        seed(url, args.jobs - have)
        have = args.jobs

    from orchestrator.app import create_app

    app = create_app(settings)
    client = app.test_client()
    page = client.get("/admin/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post("/admin/login", data={"username": settings.admin_user, "password": PASSWORD,
                                                 "csrf_token": token})
    assert response.status_code == 302, response.status_code

    first = client.get("/admin/jobs").get_data(as_text=True)
    cursor = re.search(r'href="[^"]*cursor=([^"&]+)', first).group(1)
    with session_scope(url) as session:
        newest = session.scalar(select(func.max(Job.created_at)))
    day = newest.date()
    variants = []
    for name, path in VARIANTS:
        if name.startswith("date range"):
            path = f"/admin/jobs?from={(day - dt.timedelta(days=3)).isoformat()}&to={day.isoformat()}"
        elif name.startswith("page 2"):
            path = f"/admin/jobs?cursor={cursor}"
        variants.append((name, path))

    statements = []
    engine = get_engine(url)
    listener = lambda *a, **k: statements.append(1)  # noqa: E731
    rows = []
    for name, path in variants:
        for _ in range(3):
            assert client.get(path).status_code == 200, path
        statements.clear()
        event.listen(engine, "before_cursor_execute", listener)
        client.get(path)
        event.remove(engine, "before_cursor_execute", listener)
        per_page = len(statements)
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get(path)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        rows.append({"variant": name, "requests": len(times), "sql statements": per_page,
                     "p50 ms": statistics.median(times), "p95 ms": percentile(times, 95), "max ms": max(times)})
    backend = url.split(":", 1)[0]
    print_table(f"/admin/jobs at {have:,} jobs ({backend}, Flask test client, {args.requests} requests each)", rows)


if __name__ == "__main__":
    main()
