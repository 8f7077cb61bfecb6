"""The `maga` command line in a process of its own, as an operator runs it."""

from __future__ import annotations

import subprocess
import sys


def maga(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maga_tasks.cli", *args], capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("maga: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]
