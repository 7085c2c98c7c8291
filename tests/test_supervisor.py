"""The supervisor on its own, with small shell programs: restart, back-off, refusal, liveness, hold, stop."""
from __future__ import annotations

import io
import shlex
import sys
import threading
import time

from orchestrator.supervisor import REFUSED_EXIT, Program, Supervisor
from tests.stack_fixtures import wait_until


def _running(programs: list[Program], **options) -> tuple[Supervisor, threading.Thread, list[str]]:
    lines: list[str] = []
    sup = Supervisor(programs, echo=lines.append, log_stream=io.StringIO(), **options)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    wait_until(lambda: all(sup.pids()[p.name] for p in programs if p.name != "refuses"), 10, "programs started")
    return sup, thread, lines


def _stop(sup: Supervisor, thread: threading.Thread) -> None:
    sup.request_stop()
    thread.join(30)
    assert not thread.is_alive()


def test_a_child_that_exits_is_restarted_and_the_others_keep_running():
    sup, thread, lines = _running([Program("dies", ["sh", "-c", "sleep 0.2; exit 7"]),
                                   Program("steady", ["sleep", "60"])])
    steady = sup.pids()["steady"]
    wait_until(lambda: sup.restarts()["dies"] >= 2, 20, "two restarts")
    assert sup.pids()["steady"] == steady
    assert any("dies exited with 7" in line and "restarting in 0.5 s" in line for line in lines)
    assert any("restarting in 1 s" in line for line in lines)  # the back-off doubles
    _stop(sup, thread)


def test_a_child_that_refuses_to_start_is_not_restarted():
    sup, thread, lines = _running([Program("refuses", ["sh", "-c", f"exit {REFUSED_EXIT}"]),
                                   Program("steady", ["sleep", "60"])])
    wait_until(lambda: any("refuses refused to start" in line for line in lines), 10, "refusal noticed")
    time.sleep(1.5)
    assert sup.restarts()["refuses"] == 0 and sup.pids()["refuses"] is None
    _stop(sup, thread)


def test_a_child_that_fails_its_probes_is_killed_with_its_group_and_restarted():
    answering = threading.Event()
    answering.set()
    probe_program = Program("hangs", ["sleep", "60"], probe=lambda: answering.is_set(), start_grace_s=0)
    sup, thread, lines = _running([probe_program], probe_interval_s=0.1, probe_failures=3)
    first = sup.pids()["hangs"]
    time.sleep(0.5)
    assert sup.pids()["hangs"] == first  # answering: left alone
    answering.clear()
    wait_until(lambda: sup.pids()["hangs"] not in (None, first), 10, "a new process")
    answering.set()
    assert any(f"hangs (pid {first}) did not answer 3 liveness probes" in line for line in lines)
    _stop(sup, thread)


def test_no_verdict_is_not_a_failure():
    sup, thread, _ = _running([Program("unjudged", ["sleep", "60"], probe=lambda: None, start_grace_s=0)],
                              probe_interval_s=0.05, probe_failures=1)
    first = sup.pids()["unjudged"]
    time.sleep(0.5)
    assert sup.pids()["unjudged"] == first
    _stop(sup, thread)


def test_a_held_program_is_not_restarted_until_the_hold_is_removed(tmp_path):
    sup, thread, _ = _running([Program("held", ["sleep", "60"])], hold_dir=tmp_path)
    (tmp_path / "held").touch()
    first = sup.pids()["held"]
    import os
    import signal

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: sup.pids()["held"] is None, 10, "reaped")
    time.sleep(1.5)
    assert sup.pids()["held"] is None
    (tmp_path / "held").unlink()
    wait_until(lambda: sup.pids()["held"] is not None, 10, "started again")
    _stop(sup, thread)


def test_stop_sends_sigterm_to_the_main_process_and_waits_for_it(tmp_path):
    marker = tmp_path / "graceful"
    program = Program("graceful", ["sh", "-c", f"trap 'sleep 0.3; touch {marker}; exit 0' TERM; "
                                                 "while true; do sleep 0.05; done"])
    sup, thread, lines = _running([program], stop_timeout_s=10)
    _stop(sup, thread)
    assert marker.exists()
    assert any("graceful stopped (0)" in line for line in lines)


def test_procfile_lines_become_programs_with_probes_and_may_start_with_assignments(tmp_path):
    from orchestrator.stack import parse_procfile, stack_programs
    from tasks.settings import Settings

    out = tmp_path / "out"
    processes = parse_procfile(f"# comment\nweb: songpipe web --port 1\ngpu1: CUDA_VISIBLE_DEVICES=1 songpipe worker gpu\n"
                               f"job: SONGPIPE_X=7 sh -c 'echo $SONGPIPE_X > {out}; sleep 30'\n")
    programs = {p.name: p for p in stack_programs(Settings(data_dir=tmp_path), processes, {"PATH": "/usr/bin:/bin"},
                                                  "redis://127.0.0.1:1/0", "http://127.0.0.1:1")}
    assert programs["web"].probe is not None and programs["gpu1"].probe is not None
    assert programs["gpu1"].env["SONGPIPE_WORKER_NAME"].startswith("gpu1@")
    assert programs["job"].probe is None
    # a `songpipe` line runs this interpreter's own code, whatever entry point PATH would find
    python = shlex.quote(sys.executable)
    assert programs["gpu1"].argv[-1] == f"exec env CUDA_VISIBLE_DEVICES=1 {python} -m orchestrator.cli worker gpu"
    assert programs["web"].argv[-1] == f"exec env {python} -m orchestrator.cli web --port 1"
    assert programs["job"].argv[-1].startswith("exec env SONGPIPE_X=7 sh -c ")
    sup, thread, _ = _running([programs["job"]])
    wait_until(lambda: out.exists() and out.read_text().strip() == "7", 10, "the line ran with its assignment")
    _stop(sup, thread)
