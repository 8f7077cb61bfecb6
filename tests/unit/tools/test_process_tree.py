"""The guard `scripts/demo.sh` runs `airflow dags test` under: whatever way the command
ends, every process it started is stopped, even one that left its session, ignores
SIGTERM and outlived its parent (as Airflow's task processes do)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from maga_tasks.tools.process_tree import parent_of
from tests.support.paths import REPO

GUARD = [sys.executable, "-m", "maga_tasks.tools.process_tree", "--grace", "1"]
# Starts a grandchild that leaves the session and ignores SIGTERM, prints its PID once it
# is so, then ends (the grandchild is orphaned) or sleeps (with "wait").
STUBBORN_GRANDCHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c",
    "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(os.getpid(), flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
print(grandchild.stdout.readline().strip(), flush=True)
if sys.argv[1:] == ["wait"]:
    time.sleep(300)
sys.exit(3)
"""


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while parent_of(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_orphan_the_command_left_is_stopped_and_its_status_kept():
    done = subprocess.run([*GUARD, "--", sys.executable, "-c", STUBBORN_GRANDCHILD], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    grandchild = int(done.stdout.split()[0])
    assert done.returncode == 3, done.stderr
    assert _gone(grandchild)
    assert re.search(rf"stopped 1 process\(es\) left by .*: {grandchild}$", done.stderr.strip()), done.stderr


def test_past_the_timeout_the_whole_tree_is_stopped_with_124():
    started = time.monotonic()
    done = subprocess.run([*GUARD, "--timeout", "2", "--", sys.executable, "-c", STUBBORN_GRANDCHILD, "wait"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    grandchild = int(done.stdout.split()[0])
    assert done.returncode == 124, done.stderr
    assert "still running after 2s" in done.stderr
    assert _gone(grandchild)
    assert time.monotonic() - started < 30  # not the 300 s the tree would sleep


def test_a_guard_told_to_stop_stops_the_tree_first():
    guard = subprocess.Popen([*GUARD, "--", sys.executable, "-c", STUBBORN_GRANDCHILD, "wait"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    grandchild = int(guard.stdout.readline())
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=30) == 128 + signal.SIGTERM
    assert _gone(grandchild)
    guard.stdout.close()
    guard.stderr.close()


def test_a_stack_process_is_stopped_with_what_left_its_group(tmp_path):
    """`airflow_stack`'s processes (scheduler, workers) fork LocalExecutor workers and
    tasks that leave the group; stopping the process stops them too."""
    from maga_tasks.tools.airflow_stack import start_process

    process = start_process("stubborn", [sys.executable, "-c", STUBBORN_GRANDCHILD, "wait"], {**os.environ,
                            "PYTHONPATH": str(REPO)}, tmp_path)
    deadline = time.monotonic() + 30
    while not process.log_path.read_text().strip():
        assert time.monotonic() < deadline, "the grandchild never started"
        time.sleep(0.1)
    grandchild = int(process.log_path.read_text().split()[0])
    process.stop(timeout=2)
    assert not process.alive()
    assert _gone(grandchild)
