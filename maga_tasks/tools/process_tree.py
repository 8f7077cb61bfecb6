"""Run a command and, whatever way it ends, stop every process it started.

`airflow dags test --use-executor` starts executor workers that ignore SIGINT and task
processes the supervisors move to process groups of their own; a killed or timed-out run
leaves them running, and `setproctitle` has wiped their environment, so neither a process
group nor an inherited variable finds them. A child subreaper does: every process this one
starts that loses its parent is re-parented here instead of to init, so the whole tree
stays below us and can be walked and stopped. Linux only (prctl, /proc).

    python -m maga_tasks.tools.process_tree [--timeout S] [--grace S] -- COMMAND...

Exits with the command's status, 124 past the timeout (as coreutils' `timeout`), or
128+N when stopped by signal N; the PIDs it had to stop are printed on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
TIMED_OUT = 124


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else int(fields[1])  # a zombie has exited already


def started_at(pid: int) -> int | None:
    """When a live process started (clock ticks since boot): with its PID, who it is, as a
    PID alone is reused once the process has ended. None once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def descendants(pid: int) -> list[int]:
    """Live processes below `pid`, children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        below = [child for parent in frontier for child in children.get(parent, [])]
        found += below
        frontier = below
    return found


def _reap() -> None:
    """Collect the exit status of every child that has ended (ours or re-parented here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(grace_s: float) -> list[int]:
    """SIGTERM every process below this one, SIGKILL what is left after `grace_s`; the
    PIDs found."""
    me = os.getpid()
    stopped = descendants(me)
    for pid in stopped:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap()
        if not descendants(me):
            return stopped
        time.sleep(0.1)
    for _ in range(50):  # a process may fork while it is being stopped: until none is left
        left = descendants(me)
        if not left:
            break
        stopped += [pid for pid in left if pid not in stopped]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
        _reap()
    return stopped


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run(command: list[str], timeout_s: float | None, grace_s: float) -> int:
    become_subreaper()
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        stop_signal.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    child = subprocess.Popen(command)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = None
    while status is None:
        status = child.poll()
        if status is None and stop_signal:
            status = 128 + stop_signal[0]
        elif status is None and deadline is not None and time.monotonic() >= deadline:
            print(f"[process_tree] {command[0]} still running after {timeout_s:g}s: stopping it", file=sys.stderr)
            status = TIMED_OUT
        elif status is None:
            time.sleep(0.2)
    stopped = stop_tree(grace_s)
    if stopped:
        print(f"[process_tree] stopped {len(stopped)} process(es) left by {command[0]}: "
              f"{' '.join(map(str, stopped))}", file=sys.stderr, flush=True)
    return status if status >= 0 else 128 - status  # Popen reports death by signal N as -N


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, help="seconds the command may run (default: no limit)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run(command, args.timeout, args.grace)


if __name__ == "__main__":
    sys.exit(main())
