"""One HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (ready to serve)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict]]


class OpsServer:
    """Serves in a daemon thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, *, health: Probe, ready: Probe, registry=REGISTRY,
                 before_scrape: Callable[[], None] | None = None) -> None:
        """``before_scrape``: refreshes what is computed at scrape time (the threads' CPU)."""
        probes = {"/healthz": health, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    if before_scrape is not None:
                        try:
                            before_scrape()
                        except Exception:  # a scrape still answers with what is there
                            log.exception("refreshing metrics before a scrape failed")
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    try:
                        ok, detail = probes[path]()
                    except Exception as e:  # a probe that raises is a failing probe
                        ok, detail = False, {"error": f"{type(e).__name__}: {e}"}
                    body = json.dumps({"status": "ok" if ok else "unavailable", **detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:  # scrapes are not news
                log.debug("http %s", fmt % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    def start(self) -> "OpsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 at this instant (for a process about to bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` from an ops port on 127.0.0.1: (status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""
