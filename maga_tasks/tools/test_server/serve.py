"""The test LLM server's process: serve the app on a socket until SIGINT/SIGTERM, and the
command line of ``python -m maga_tasks.tools.test_server``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys

from aiohttp import web

from maga_tasks.tools.test_server.faults import Fault, parse_fault
from maga_tasks.tools.test_server.server import build_app
from maga_tasks.tools.test_server.state import MAX_MODEL_LEN


async def _serve(host: str, port: int, app: web.Application) -> None:
    # Bind our own socket so port 0 works and the printed port is the real one.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    # handler_cancellation: a client that gives up cancels its request, as in vLLM.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Stop cleanly on Ctrl-C or a supervisor's SIGTERM (main thread only).
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"test LLM server listening on http://{shown_host}:{bound_port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory():
    # uvloop roughly doubles aiohttp's request rate; fall back quietly without it.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_server(host: str, port: int, **kwargs) -> None:
    """Serve `build_app(**kwargs)` on host:port until SIGINT/SIGTERM (blocking).

    Prints "test LLM server listening on http://HOST:PORT" to stderr once it accepts
    connections; port 0 picks a free port and the line shows the real one.
    """
    app = build_app(**kwargs)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(host, port, app))


def _fault_arg(spec: str) -> Fault:
    try:
        return parse_fault(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m maga_tasks.tools.test_server",
        description="Deterministic OpenAI-compatible LLM server for tests (no GPU).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="SPEC",
        help="KIND[:RATE[:TIMES]][:KEY=VALUE...], repeatable",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--model", default="maga-default")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help="context length /v1/models reports")
    parser.add_argument("--model-root", default=None, help="weights path or hub id /v1/models reports as root")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-structured-outputs", action="store_true")
    parser.add_argument("--max-running", type=_positive_int, default=None, metavar="N",
                        help="run at most N requests at once, queue the rest (like a saturated vLLM)")
    parser.add_argument("--no-slots-metric", action="store_true",
                        help="with --max-running: do not publish N in /metrics (vLLM publishes no such gauge)")
    args = parser.parse_args(argv)
    run_server(
        args.host,
        args.port,
        faults=args.fault,
        latency_ms=args.latency_ms,
        model=args.model,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        model_root=args.model_root,
        structured_outputs=not args.no_structured_outputs,
        max_running=args.max_running,
        publish_slots=not args.no_slots_metric,
    )
