"""Hostile hosts on loopback, shared by the hostile-edge tests (tests/integration/hostile/)."""

from __future__ import annotations

import json
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingServer:
    """A host on loopback that records every request (path and Authorization header).
    It answers 200 to everything (or `status`: 500, a backend that is down), or with
    `redirect_to`, a 307 to that URL plus the path (a configured endpoint that sends its
    callers elsewhere)."""

    def __init__(self, redirect_to: str | None = None, status: int = 200):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                recorder.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"" if redirect_to else b'{"data": [{"id": "maga-default"}]}'
                self.send_response(307 if redirect_to else status)
                if redirect_to:
                    self.send_header("Location", f"{redirect_to}{self.path}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RecordingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _LoopbackServer:
    """Serves a handler class on a free loopback port in a thread; a context manager."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class IdleClosingServer(_LoopbackServer):
    """An OpenAI-style chat host on loopback whose keep-alive ends after `idle_s`: a
    request that arrives on a connection idle that long is dropped unanswered, as
    uvicorn's keep-alive timer (5 s in vLLM) drops a request that races it. Counts the
    connections it accepted and the requests it dropped."""

    ANSWER = json.dumps({
        "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }).encode()

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self.connections = 0
        self.dropped = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self):
                super().setup()
                server.connections += 1
                self.idle_since = None

            def handle_one_request(self):
                ready, _, _ = select.select([self.connection], [], [], 30)
                if ready and self.idle_since is not None and time.monotonic() - self.idle_since >= server.idle_s:
                    server.dropped += 1
                    self.close_connection = True  # the timer fired first: closed, unanswered
                    return
                super().handle_one_request()
                self.idle_since = time.monotonic()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(server.ANSWER)

            def do_GET(self):  # /health: the server is alive, only its timer closed the connection
                self._answer(b"{}")

            def _answer(self, body: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._serve(Handler)


class StallingServer(_LoopbackServer):
    """A vLLM-like host on loopback that is healthy, serves `model` with room enough,
    and never answers a completion: each one is held open until the server stops (a
    worker whose engine hangs while its API lives). Counts the completions it holds."""

    def __init__(self, model: str, max_model_len: int = 4096):
        self.held = 0
        self.released = threading.Event()
        server = self
        card = json.dumps({"data": [{"id": model, "max_model_len": max_model_len}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/metrics"):
                    self.send_error(404)
                    return
                body = card if self.path.startswith("/v1/models") else b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.held += 1
                server.released.wait()  # no answer, no error: the caller's clock is all it has

            def log_message(self, *args):
                pass

        self._serve(Handler)

    def stop(self) -> None:
        self.released.set()  # the held completions end (unanswered) before the server closes
        super().stop()
