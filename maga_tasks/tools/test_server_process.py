"""The test LLM server as a child process: the one launcher that the tests, the
benchmark and trial setups share."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_READY = re.compile(r"listening on (http://\S+)")
# Loopback only: never through a proxy taken from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TestServerProcess:
    """`python -m maga_tasks.tools.test_server` in a session of its own on 127.0.0.1.

    It binds port 0 and names the port in its ready line, so two servers never race for
    one port. Its output goes to a log file in `log_dir` (the system's temporary folder
    when not given), which is where the ready line is read and where failures are shown
    from. `start` only spawns; `wait_ready` blocks, so many servers can boot at once.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(
        self,
        *,
        faults: tuple[str, ...] | list[str] = (),
        latency_ms: float = 0.0,
        max_running: int | None = None,
        extra: tuple[str, ...] | list[str] = (),
        log_dir: Path | str | None = None,
        cpu: int | None = None,
    ):
        self.argv = [sys.executable, "-m", "maga_tasks.tools.test_server", "--host", "127.0.0.1", "--port", "0"]
        for spec in faults:
            self.argv += ["--fault", spec]
        if latency_ms:
            self.argv += ["--latency-ms", str(latency_ms)]
        if max_running is not None:  # a saturated engine: the rest wait in its queue
            self.argv += ["--max-running", str(max_running)]
        self.argv += list(extra)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.cpu = cpu
        self.popen: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.url = ""
        self.port = 0

    @property
    def name(self) -> str:
        return f"test-llm-{self.popen.pid if self.popen else 'unstarted'}"

    def start(self) -> "TestServerProcess":
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="test-llm-", suffix=".log", dir=self.log_dir)
        self.log_path = Path(path)
        pin = (lambda: os.sched_setaffinity(0, {self.cpu})) if self.cpu is not None else None
        with os.fdopen(handle, "wb") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=pin,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> "TestServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log_text())
            if match:
                self.url = match.group(1)
                self.port = int(self.url.rsplit(":", 1)[1])
                return self
            if not self.alive():
                raise RuntimeError(f"the test LLM server exited with {self.popen.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the test LLM server did not start within {timeout}s: {self.log_tail()}")

    def __enter__(self) -> "TestServerProcess":
        if self.popen is None:
            self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def stats(self) -> dict:
        """Requests, tokens and per-document counts since the start or the last reset."""
        with _OPENER.open(f"{self.url}/_stats", timeout=10) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/_reset", data=b"", method="POST")
        _OPENER.open(request, timeout=10).read()

    # -- stopping --------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM its process group without waiting (stop many servers in parallel)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM its process group, then SIGKILL whatever is left after `timeout`."""
        if self.popen is None:
            return
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
