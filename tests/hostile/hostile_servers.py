"""Hostile hosts on loopback, shared by the hostile-edge tests (imported by name: this
folder is on the path of its test modules)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingServer:
    """A host on loopback that records every request (path and Authorization header).
    It answers 200 to everything, or with `redirect_to`, a 307 to that URL plus the path
    (a configured endpoint that sends its callers elsewhere)."""

    def __init__(self, redirect_to: str | None = None):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                recorder.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"" if redirect_to else b'{"data": [{"id": "maga-default"}]}'
                self.send_response(307 if redirect_to else 200)
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
