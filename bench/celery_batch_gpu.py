"""Issue 12, must-shows 3 and 4: `songpipe run` on the GPU with batching on, through the JSON API.

Two supervised stacks (`songpipe run`: embedded Redis, SQLite, web, CPU worker, GPU worker in
batching mode, reconciler, all under orchestrator/supervisor.py) over one random real-size
checkpoint (as bench/e2e_celery.py writes it), bf16 codec estimator, WAV output:

A (must-show 3), the default engine (SONGPIPE_GPU_BATCH_SLOTS unset: 8 slots): after one short
  warm-up song, N songs (32) of S s (60) with mixed sampling settings are submitted at once over
  HTTP. Wall time from the first POST to the last WAV; each token record's batch_size. After the
  batch has drained, one of them is replayed alone (`songpipe replay JOB --mode new --from-stage
  generate_tokens`, the stored seed) and another is submitted again alone with the same request
  (same seed); their token artifacts' sha256 are compared with the batched ones.
B (must-show 4), an engine of M+1 slots (9): M (8) songs of S2 s (120) run together; once every
  one has a token checkpoint, a job tagged `songpipe-fault-cuda-assert` joins their engine and
  raises a real device-side assert (SONGPIPE_FAULT_INJECTION=1). The worker process must be
  replaced by the supervisor and all M songs must finish, each with exactly one succeeded token
  attempt; the culprit itself fails. One of the M is then submitted again alone (uninterrupted) and
  its tokens compared with the resumed song's.

    python bench/celery_batch_gpu.py                    # on the GPU machine: both parts
    python bench/celery_batch_gpu.py --only b           # one part
    SONGPIPE_GPU_BATCHING=1 python bench/celery_batch_gpu.py --tiny   # CPU, tiny checkpoint, small sizes
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.table import print_table  # noqa: E402
from tests.stack_fixtures import REPO_ROOT, wait_until  # noqa: E402
from tests.supervised_stack import SupervisedStack, supervised_stack  # noqa: E402

LYRICS = "[verse]\nde doo doo doo\nde blaa blaa blaa\n\n[chorus]\nis all i want to sing to you"
TERMINAL = ("succeeded", "failed", "cancelled")
# per-song settings cycle through these, so batch mates differ in CFG scale, temperature and top-k
CFG = (1.5, 1.0, 2.0)
TEMPERATURE = (1.0, 0.9, 1.1, 1.2)
TOP_K = (50, 100, 20, 200, 80)

GPU_ENV = {
    "SONGPIPE_DEVICE": "cuda", "SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_CODEC_DTYPE": "bfloat16",
    # lease 12 s, engine stall limit 36 s (a cold engine's first steps compile Triton kernels for seconds)
    "SONGPIPE_HEARTBEAT_S": "1",
    # the product's liveness defaults, not the CPU tests' 0.5 s (a compiling codec holds the GIL)
    "SONGPIPE_LIVENESS_INTERVAL_S": "5", "SONGPIPE_LIVENESS_FAILURES": "3",
}
TINY_ENV = {"SONGPIPE_DEVICE": "cpu", "SONGPIPE_GPU_BATCHING": "1", "SONGPIPE_TOKEN_CHECKPOINT_FRAMES": "16"}


DEADLINE = [float("inf")]  # monotonic; --deadline-s: every wait stops there, so the stacks are stopped in time


def remaining(timeout_s: float) -> float:
    return max(min(timeout_s, DEADLINE[0] - time.monotonic()), 1.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the record, read from the stack's SQLite file ----------------------------------------------

def _db(stack: SupervisedStack) -> sqlite3.Connection:
    return sqlite3.connect(stack.data_dir / "songpipe.db", timeout=30)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _time(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


STAGE_COLUMNS = ("stage", "attempt", "status", "progress", "environment", "outputs", "worker_pid", "started_at",
                 "finished_at", "duration_s", "error_type", "error_message")


def attempts(stack: SupervisedStack, job_id: str, stage: str | None = None) -> list[dict[str, Any]]:
    where = "job_id = ?" + (" AND stage = ?" if stage else "")
    with _db(stack) as db:
        rows = db.execute(f"SELECT {', '.join(STAGE_COLUMNS)} FROM stage_runs WHERE {where} ORDER BY id",
                          (job_id, stage) if stage else (job_id,)).fetchall()
    out = []
    for row in rows:
        item = dict(zip(STAGE_COLUMNS, row))
        for key in ("progress", "environment", "outputs"):
            item[key] = _json(item[key]) or {}
        out.append(item)
    return out


def job_rows(stack: SupervisedStack, ids: list[str]) -> dict[str, dict[str, Any]]:
    marks = ",".join("?" * len(ids))
    with _db(stack) as db:
        rows = db.execute(f"SELECT id, status, created_at, finished_at, error_type, error_message, seed "
                          f"FROM jobs WHERE id IN ({marks})", ids).fetchall()
    return {r[0]: dict(zip(("id", "status", "created_at", "finished_at", "error_type", "error_message", "seed"), r))
            for r in rows}


def wait_all(stack: SupervisedStack, ids: list[str], timeout_s: float) -> float:
    """Poll SQL until every job is terminal; returns the perf_counter time it was first seen so."""
    timeout_s = remaining(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = job_rows(stack, ids)
        if len(jobs) == len(ids) and all(j["status"] in TERMINAL for j in jobs.values()):
            return time.perf_counter()
        time.sleep(0.25)
    jobs = job_rows(stack, ids)
    raise TimeoutError(f"jobs not terminal within {timeout_s:g} s: "
                       f"{Counter(j['status'] for j in jobs.values())}\n{stack.output()[-6000:]}")


def succeeded_output(stack: SupervisedStack, job_id: str, stage: str) -> dict[str, Any]:
    done = [a for a in attempts(stack, job_id, stage) if a["status"] == "succeeded"]
    return done[-1] if done else {}


def token_sha(stack: SupervisedStack, job_id: str) -> str | None:
    return (succeeded_output(stack, job_id, "generate_tokens").get("outputs", {}).get("tokens") or {}).get("sha256")


def request_body(i: int, seconds: float, tags: list[str], seed: int) -> dict[str, Any]:
    return {"lyrics": LYRICS, "tags": tags, "output_format": "wav", "max_audio_length_ms": int(seconds * 1000),
            "seed": seed, "cfg_scale": CFG[i % len(CFG)], "temperature": TEMPERATURE[i % len(TEMPERATURE)],
            "top_k": TOP_K[i % len(TOP_K)]}


def token_row(stack: SupervisedStack, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    tokens = attempts(stack, job_id, "generate_tokens")
    ok = [a for a in tokens if a["status"] == "succeeded"]
    last = ok[-1] if ok else (tokens[-1] if tokens else {})
    out, env = last.get("outputs") or {}, last.get("environment") or {}
    frames = out.get("frames")
    decodes = attempts(stack, job_id, "decode_audio")
    decoded = succeeded_output(stack, job_id, "decode_audio")
    wav = (decoded.get("outputs", {}).get("wav") or {}).get("sha256")
    streamed = ((decoded.get("environment") or {}).get("streamed") or {}).get("windows_before_tokens_finished")
    return {"job": job_id[:8], "seed": body["seed"], "cfg": body["cfg_scale"], "temp": body["temperature"],
            "top_k": body["top_k"], "status": job_rows(stack, [job_id])[job_id]["status"],
            "token attempts": ",".join(a["status"] for a in tokens), "batch_size": out.get("batch_size"),
            "slots": env.get("engine_slots"), "frames": frames, "queued s": env.get("queued_s"),
            "token s": last.get("duration_s"),
            "ms/frame": round(1000 * last["duration_s"] / frames, 2) if frames and last.get("duration_s") else None,
            "decode attempts": ",".join(a["status"] for a in decodes), "windows streamed": streamed,
            "decode stage s": decoded.get("duration_s"),
            "tokens sha256": (out.get("tokens") or {}).get("sha256", "")[:16], "wav sha256": (wav or "")[:16]}


def new_songpipe_shim(work: Path) -> dict[str, str]:
    """`songpipe` for the Procfile's lines, running THIS tree's code with this interpreter.

    The GPU machine has no entry point installed, and an installed one (an editable install of another
    checkout) would run other code than the supervisor's: the shim always comes first on PATH."""
    bindir = work / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "songpipe"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m orchestrator.cli "$@"\n')
    shim.chmod(0o755)
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": pythonpath}


def save_log(workdir: Path, logs_dir: Path | None, name: str) -> None:
    """The stack's `songpipe run` output (every program's lines), kept past the temporary directory."""
    source = workdir / "songpipe-run.log"
    if logs_dir is None or not source.exists():
        return
    logs_dir.mkdir(parents=True, exist_ok=True)
    (logs_dir / f"{name}-songpipe-run.log").write_bytes(source.read_bytes()[-12_000_000:])


# -- A: 32 songs at once, then a replay alone ---------------------------------------------------

def part_a(stack: SupervisedStack, songs: int, seconds: float, warm_seconds: float, summary: dict) -> None:
    start = time.perf_counter()
    warm = stack.submit({**request_body(0, warm_seconds, ["ska"], 1), "max_audio_length_ms": int(warm_seconds * 1000)})
    wait_all(stack, [warm], 600)
    log(f"A: warm-up song of {warm_seconds:g} s (cold GPU worker: loads both models, compiles): "
        f"{job_rows(stack, [warm])[warm]['status']} in {time.perf_counter() - start:.1f} s")

    bodies = [request_body(i, seconds, ["ska", "upbeat", "brass"], 1000 + i) for i in range(songs)]
    first_post = time.perf_counter()
    ids = [stack.submit(body) for body in bodies]
    posted = time.perf_counter()
    log(f"A: {songs} songs of {seconds:g} s submitted in {posted - first_post:.2f} s")
    done_at = wait_all(stack, ids, 900)
    wall = done_at - first_post
    jobs = job_rows(stack, ids)
    rows = [token_row(stack, job_id, body) for job_id, body in zip(ids, bodies)]
    print_table(f"A: {songs} songs of {seconds:g} s submitted at once: token stage per song (SQL record)", rows)

    created = min(_time(j["created_at"]) for j in jobs.values())
    encodes = [succeeded_output(stack, job_id, "encode_audio") for job_id in ids]
    last_wav = max((_time(e.get("finished_at")) for e in encodes if e.get("finished_at")), default=None)
    token_attempts = [attempts(stack, job_id, "generate_tokens") for job_id in ids]
    token_start = min(_time(a[0]["started_at"]) for a in token_attempts if a and a[0]["started_at"])
    token_end = max(_time(a[-1]["finished_at"]) for a in token_attempts if a and a[-1]["finished_at"])
    decodes = [succeeded_output(stack, job_id, "decode_audio") for job_id in ids]
    decode_s = [d["duration_s"] for d in decodes if d.get("duration_s") is not None]
    statuses = Counter(j["status"] for j in jobs.values())
    sizes = Counter(r["batch_size"] for r in rows)
    audio_s = songs * seconds
    facts = [
        {"measure": "jobs succeeded", "value": f"{statuses.get('succeeded', 0)} of {songs}"},
        {"measure": "wall s, first POST to every job terminal (script, 0.25 s polls)", "value": round(wall, 2)},
        {"measure": "wall s, first job created to last WAV written (SQL)",
         "value": round((last_wav - created).total_seconds(), 2) if last_wav else None},
        {"measure": "token stages s, first start to last finish (SQL)",
         "value": round((token_end - token_start).total_seconds(), 2)},
        {"measure": "decode_audio stage s per song, mean / max (streaming: from its start beside the tokens)",
         "value": f"{sum(decode_s) / max(len(decode_s), 1):.3f} / {max(decode_s, default=0):.3f}"},
        {"measure": "audio s produced per wall s", "value": round(audio_s / wall, 1)},
        {"measure": "recorded batch_size: songs",
         "value": ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items(), key=str))},
        {"measure": "token attempts per song", "value": dict(Counter(len(a) for a in token_attempts))},
    ]
    print_table(f"A: summary ({songs} x {seconds:g} s)", facts)
    summary["a"] = {"wall_s": wall, "statuses": dict(statuses), "batch_sizes": {str(k): v for k, v in sizes.items()},
                    "rows": rows, "facts": facts}

    # replays alone, after the batch has drained: one through `songpipe replay`, one as a new submission
    full = [i for i, r in enumerate(rows) if r["status"] == "succeeded"]
    if len(full) < 2:
        log("A: fewer than two succeeded songs: no replay")
        return
    biggest = max(rows[i]["batch_size"] or 0 for i in full)
    picks = [i for i in full if rows[i]["batch_size"] == biggest]
    first, second = picks[0], picks[-1] if len(picks) > 1 else full[-1]
    checks = []
    started = time.perf_counter()
    proc = stack.cli("replay", ids[first], "--mode", "new", "--from-stage", "generate_tokens", "--wait", "--json",
                     timeout=remaining(600))
    if proc.returncode != 0:
        log(f"A: songpipe replay exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    replay_id = json.loads(proc.stdout)["job_id"] if proc.stdout.strip().startswith("{") else None
    replay_wall = time.perf_counter() - started
    started = time.perf_counter()
    again_id = stack.submit(bodies[second])
    wait_all(stack, [again_id], 600)
    again_wall = time.perf_counter() - started
    for how, source, other, wall_s in (
            (f"`songpipe replay {ids[first][:8]} --mode new --from-stage generate_tokens` (stored seed)", first,
             replay_id, replay_wall),
            ("the same request (same seed) submitted again over the API", second, again_id, again_wall)):
        original = token_sha(stack, ids[source])
        again = token_sha(stack, other) if other else None
        other_row = token_row(stack, other, bodies[source]) if other else {}
        checks.append({"replay": how, "job in the batch": ids[source][:8], "its batch_size": rows[source]["batch_size"],
                       "replay job": (other or "")[:8], "replay batch_size": other_row.get("batch_size"),
                       "replay status": other_row.get("status"), "wall s": round(wall_s, 1),
                       "tokens sha256 (batch)": (original or "")[:16], "tokens sha256 (alone)": (again or "")[:16],
                       "identical": bool(original) and original == again})
    print_table("A: one song replayed alone after the batch drained (token artifacts' sha256)", checks)
    summary["a"]["replays"] = checks


# -- B: a device-side assert among 8 songs ------------------------------------------------------

def _checkpoint_done(stack: SupervisedStack, job_id: str) -> int:
    tokens = attempts(stack, job_id, "generate_tokens")
    if not tokens or tokens[-1]["status"] != "running":
        return 0
    return int(((tokens[-1]["progress"] or {}).get("checkpoint") or {}).get("done", 0))


def part_b(stack: SupervisedStack, mates: int, seconds: float, extra_tags: list[str], summary: dict) -> None:
    bodies = [request_body(i, seconds, ["ska", *extra_tags], 2000 + i) for i in range(mates)]
    old_pid, old_restarts = stack.pid("gpu"), stack.restarts("gpu")
    start = time.perf_counter()
    ids = [stack.submit(body) for body in bodies]
    wait_until(lambda: all(_checkpoint_done(stack, job_id) > 0 for job_id in ids), remaining(400),
               f"a token checkpoint of each of the {mates} songs", interval_s=0.25)
    at_checkpoint = {job_id: _checkpoint_done(stack, job_id) for job_id in ids}
    log(f"B: every song has a checkpoint ({sorted(at_checkpoint.values())} frames) "
        f"{time.perf_counter() - start:.1f} s after the first POST; gpu worker pid {old_pid}")
    fault_at = time.perf_counter()
    culprit = stack.submit({**request_body(mates, seconds, ["ska", "songpipe-fault-cuda-assert"], 99)})
    new_pid_s = None
    try:
        new_pid = stack.wait_for_new_pid("gpu", old_pid, timeout_s=remaining(400))
        new_pid_s = time.perf_counter() - fault_at
        log(f"B: gpu worker replaced: pid {old_pid} -> {new_pid}, {new_pid_s:.1f} s after the culprit's POST")
    except TimeoutError:
        new_pid = stack.pid("gpu")
        log(f"B: the gpu worker pid did not change within 400 s (still {new_pid})")
    done_at = wait_all(stack, [*ids, culprit], 500)
    rows, ok = [], True
    for job_id in ids:
        tokens = attempts(stack, job_id, "generate_tokens")
        succeeded = [a for a in tokens if a["status"] == "succeeded"]
        first = tokens[0] if tokens else {}
        final = succeeded[-1] if succeeded else {}
        resumed = (final.get("environment") or {}).get("resumed_from") or {}
        status = job_rows(stack, [job_id])[job_id]["status"]
        ok = ok and status == "succeeded" and len(succeeded) == 1
        rows.append({"job": job_id[:8], "status": status, "token attempts": ",".join(a["status"] for a in tokens),
                     "succeeded attempts": len(succeeded),
                     "attempt 1 error": (first.get("error_type") or "").rsplit(".", 1)[-1],
                     "attempt 1 frames done": (first.get("progress") or {}).get("done"),
                     "pids": ",".join(str(a["worker_pid"]) for a in tokens),
                     "resumed from frame": resumed.get("frames"), "resume replay s": resumed.get("replay_s"),
                     "frames": (final.get("outputs") or {}).get("frames"),
                     "batch_size": (final.get("outputs") or {}).get("batch_size"),
                     "decode attempts": ",".join(a["status"] for a in attempts(stack, job_id, "decode_audio")),
                     "tokens sha256": ((final.get("outputs") or {}).get("tokens") or {}).get("sha256", "")[:16]})
    print_table(f"B: {mates} songs of {seconds:g} s, a device-side assert from a batch mate mid-song", rows)
    culprit_tokens = attempts(stack, culprit, "generate_tokens")
    culprit_job = job_rows(stack, [culprit])[culprit]
    culprit_rows = [{"job": culprit[:8], "job status": culprit_job["status"], "attempt": a["attempt"],
                     "status": a["status"], "error": (a.get("error_type") or "").rsplit(".", 1)[-1],
                     "message": (a.get("error_message") or "")[:140].replace("|", "/").replace("\n", " "),
                     "replaced_after_this_failure": ((a.get("environment") or {}).get("worker_process") or {})
                     .get("replaced_after_this_failure"), "pid": a["worker_pid"]} for a in culprit_tokens]
    print_table("B: the culprit (tag songpipe-fault-cuda-assert)", culprit_rows)
    lines = [line for line in stack.output().splitlines() if "CRITICAL" in line or "supervisor:" in line]
    print("\nB: supervisor / worker lines:\n" + "\n".join(line[:300] for line in lines[:30]), flush=True)
    facts = [
        {"measure": f"all {mates} songs succeeded, each with exactly one succeeded token attempt", "value": ok},
        {"measure": "gpu worker pid before / after", "value": f"{old_pid} / {new_pid}"},
        {"measure": "gpu restarts by the supervisor (state file)", "value": stack.restarts("gpu") - old_restarts},
        {"measure": "s from the culprit's POST to the new gpu pid",
         "value": round(new_pid_s, 1) if new_pid_s else None},
        {"measure": "s from the culprit's POST to every song terminal", "value": round(done_at - fault_at, 1)},
        {"measure": "culprit job status", "value": culprit_job["status"]},
    ]
    # the same request as a resumed song, never interrupted: are the tokens the same?
    ref_body = bodies[0]
    reference = stack.submit(ref_body)
    wait_all(stack, [reference], 600)
    resumed_sha, ref_sha = token_sha(stack, ids[0]), token_sha(stack, reference)
    facts.append({"measure": f"song {ids[0][:8]} (resumed) vs the same request run alone, uninterrupted: tokens",
                  "value": f"{(resumed_sha or '')[:16]} vs {(ref_sha or '')[:16]}: "
                           f"{'identical' if resumed_sha and resumed_sha == ref_sha else 'DIFFERENT'}"})
    print_table("B: summary", facts)
    summary["b"] = {"ok": ok, "rows": rows, "culprit": culprit_rows, "facts": facts}


def _interrupt(*_args: Any) -> None:
    """SIGTERM (a `timeout` around this script) unwinds like Ctrl-C: the supervised stacks are stopped."""
    raise KeyboardInterrupt("SIGTERM")


def write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny checkpoint, small sizes (a local check)")
    parser.add_argument("--only", choices=["a", "b"], default=None)
    parser.add_argument("--songs", type=int, default=None, help="A: songs at once [32; tiny 4]")
    parser.add_argument("--seconds", type=float, default=None, help="A: song length [60; tiny 5]")
    parser.add_argument("--mates", type=int, default=None, help="B: songs beside the culprit [8; tiny 2]")
    parser.add_argument("--mate-seconds", type=float, default=None, help="B: song length [120; tiny 10.24]")
    parser.add_argument("--logs-dir", type=Path, default=None, help="copy each stack's songpipe-run.log here")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for both stacks, e.g. SONGPIPE_STREAMING=0")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the stacks' files here (default: a temporary directory)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="every wait ends this long after the start (then the stacks are stopped)")
    args = parser.parse_args()
    if args.deadline_s:
        DEADLINE[0] = time.monotonic() + args.deadline_s
    signal.signal(signal.SIGTERM, _interrupt)
    tiny = args.tiny
    songs = args.songs or (4 if tiny else 32)
    seconds = args.seconds or (5.0 if tiny else 60.0)
    mates = args.mates or (2 if tiny else 8)
    mate_seconds = args.mate_seconds or (10.24 if tiny else 120.0)
    summary: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with contextlib.ExitStack() as keep:
        if args.workdir:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="sp-")))
        ckpt = work / "ckpt"
        started = time.perf_counter()
        if tiny:
            from gpu_worker.checkpoints.tiny_checkpoint import make_tiny_checkpoint

            make_tiny_checkpoint(ckpt, seed=0)
        else:
            import torch

            from bench.e2e_celery import write_real_size_checkpoint

            for what, took in write_real_size_checkpoint(ckpt).items():
                log(f"{what}: {took:.1f} s")
            props = torch.cuda.get_device_properties(0)
            summary["card"] = {"name": props.name, "torch": torch.__version__, "cuda": torch.version.cuda}
            import triton

            summary["card"]["triton"] = triton.__version__
            log(f"card: {summary['card']}")
        log(f"checkpoint ready in {time.perf_counter() - started:.1f} s")
        env = {**(TINY_ENV if tiny else GPU_ENV), **new_songpipe_shim(work),
               **dict(item.split("=", 1) for item in args.env)}
        summary["env"] = env
        log(f"stack environment (besides tests/supervised_stack.FAST_ENV): {env}")
        try:
            if args.only in (None, "a"):
                started = time.perf_counter()
                try:
                    with supervised_stack(work / "a", ckpt, env, start_timeout_s=300) as stack:
                        log(f"A: `songpipe run` up in {time.perf_counter() - started:.1f} s (default engine slots)")
                        part_a(stack, songs, seconds, 1.0 if tiny else 2.0, summary)
                except Exception as exc:  # part B still runs; the log says what went wrong
                    log(f"A failed: {type(exc).__name__}: {str(exc)[:3000]}")
                    summary["a_error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    save_log(work / "a", args.logs_dir, "a")
                    write_summary(args.json_out, summary)
            if args.only in (None, "b") and DEADLINE[0] - time.monotonic() < 150:
                log("B skipped: less than 150 s left before --deadline-s")
                summary["b_error"] = "skipped: deadline"
            elif args.only in (None, "b"):
                started = time.perf_counter()
                env_b = {**env, "SONGPIPE_GPU_BATCH_SLOTS": str(mates + 1)}
                try:
                    with supervised_stack(work / "b", ckpt, env_b, start_timeout_s=300) as stack:
                        log(f"B: `songpipe run` up in {time.perf_counter() - started:.1f} s ({mates + 1} engine slots)")
                        part_b(stack, mates, mate_seconds, ["songpipe-fault-slow-40"] if tiny else [], summary)
                except Exception as exc:
                    log(f"B failed: {type(exc).__name__}: {str(exc)[:3000]}")
                    summary["b_error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    save_log(work / "b", args.logs_dir, "b")
        finally:
            write_summary(args.json_out, summary)
    print(f"\nrepo {REPO_ROOT}", flush=True)


if __name__ == "__main__":
    main()
