"""The command line of ``python -m maga_tasks.llm.vllm_local``: a detached local vLLM
server for the demo and benchmarks (start, stop, status, metrics), found again through
state files (NAME.pid, NAME.url, NAME.json, NAME.log under --state-dir)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from maga_tasks.llm.vllm_local import (
    DEFAULT_HOST,
    VLLM_ENTRYPOINT,
    VllmError,
    _signal_group,
    _wait_group_gone,
    read_metrics,
    start_vllm_server,
)


def _state_paths(state_dir: Path, name: str) -> dict[str, Path]:
    return {kind: state_dir / f"{name}.{kind}" for kind in ("pid", "url", "json", "log")}


def _is_vllm_process(pid: int) -> bool:
    """Guard against PID reuse before signalling a PID read from a file."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return VLLM_ENTRYPOINT.encode() in cmdline


def _cli_start(args: argparse.Namespace) -> int:
    paths = _state_paths(args.state_dir, args.name)
    if paths["pid"].exists():
        pid = int(paths["pid"].read_text().strip() or 0)
        if pid and _is_vllm_process(pid):
            print(f"already running: pid {pid}, {paths['url'].read_text().strip()}", file=sys.stderr)
            return 1
    args.state_dir.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = start_vllm_server(
        args.model, python=args.python, host=args.host, port=args.port,
        served_model_name=args.served_model_name, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, block_size=args.block_size or None, dtype=args.dtype,
        enforce_eager=not args.compile, api_key=api_key, kv_cache_space_gib=args.kv_cache_space_gib,
        extra_args=args.extra_args, log_path=paths["log"],
    )
    # Recorded before the wait, so `stop` finds a server interrupted during startup.
    paths["pid"].write_text(f"{server.pid}\n")
    paths["url"].write_text(f"{server.url}\n")
    try:
        elapsed = server.wait_healthy(args.timeout)
    except BaseException as error:
        server.stop()
        paths["pid"].unlink(missing_ok=True)
        if not isinstance(error, VllmError):
            raise
        print(error, file=sys.stderr)
        return 1
    paths["json"].write_text(json.dumps({
        "pid": server.pid, "url": server.url, "served_model_name": server.served_model_name,
        "model": server.model, "log": str(paths["log"]), "auth": bool(api_key),
        "startup_s": round(elapsed, 1),
    }, indent=2) + "\n")
    print(server.url)
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    paths = _state_paths(args.state_dir, args.name)
    if not paths["pid"].exists():
        print(f"no server recorded in {paths['pid']}", file=sys.stderr)
        return 0
    pid = int(paths["pid"].read_text().strip() or 0)
    if pid and _is_vllm_process(pid):
        _signal_group(pid, signal.SIGTERM)
        if not _wait_group_gone(pid, timeout=args.timeout):
            _signal_group(pid, signal.SIGKILL)
            _wait_group_gone(pid, timeout=5.0)
        print(f"stopped pid {pid}")
    for kind in ("pid", "url", "json"):
        paths[kind].unlink(missing_ok=True)
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    paths = _state_paths(args.state_dir, args.name)
    if not paths["json"].exists():
        print("not running")
        return 1
    state = json.loads(paths["json"].read_text())
    alive = _is_vllm_process(state["pid"])
    print(json.dumps({**state, "alive": alive}, indent=2))
    return 0 if alive else 1


def _cli_metrics(args: argparse.Namespace) -> int:
    metrics = read_metrics(args.url)
    wanted = {k: v for k, v in sorted(metrics.items()) if not args.prefix or k.startswith(args.prefix)}
    print(json.dumps(wanted, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maga_tasks.llm.vllm_local",
        description="Run a local vLLM CPU server in the background (for the demo and benchmarks).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_state(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--state-dir", type=Path, default=Path("var/vllm"),
                         help="where NAME.pid, NAME.url, NAME.json and NAME.log live")
        sub.add_argument("--name", default="vllm", help="server name, for several servers")
        return sub

    start = with_state(commands.add_parser("start", help="start a server, wait for /health, print its URL"))
    start.add_argument("--model", required=True, help="model directory (or hub id)")
    start.add_argument("--served-model-name")
    start.add_argument("--python", type=Path, help="vLLM venv interpreter")
    start.add_argument("--host", default=DEFAULT_HOST)
    start.add_argument("--port", type=int, help="default: a free port")
    start.add_argument("--max-model-len", type=int, default=2048)
    start.add_argument("--max-num-seqs", type=int, default=64)
    # On AVX2 CPUs without AVX-512, a real model runs about 4x faster in float32.
    start.add_argument("--dtype", default="bfloat16", help="bfloat16 (tiny model) or float32 (a real model on AVX2)")
    start.add_argument("--block-size", type=int, default=32, help="0: vLLM's default")
    start.add_argument("--kv-cache-space-gib", type=int, default=1,
                       help="VLLM_CPU_KVCACHE_SPACE: too small a cache preempts requests and evicts shared prefixes")
    start.add_argument("--compile", action="store_true",
                       help="let vLLM torch.compile the model (slower start; for benchmarks)")
    start.add_argument("--api-key-env", default="MAGA_API_KEY",
                       help="environment variable holding the API key (empty: no key)")
    start.add_argument("--timeout", type=float, default=300.0)
    start.add_argument("extra_args", nargs="*", help="more vLLM flags, after --")
    start.set_defaults(handler=_cli_start)

    stop = with_state(commands.add_parser("stop", help="stop the recorded server"))
    stop.add_argument("--timeout", type=float, default=30.0)
    stop.set_defaults(handler=_cli_stop)

    status = with_state(commands.add_parser("status", help="show the recorded server"))
    status.set_defaults(handler=_cli_status)

    metrics = commands.add_parser("metrics", help="print a server's metrics, summed over labels")
    metrics.add_argument("url")
    metrics.add_argument("--prefix", default="vllm:")
    metrics.set_defaults(handler=_cli_metrics)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)
