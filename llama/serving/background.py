"""Run the server in a background thread on a free localhost port: for tests, benchmarks and notebooks.

    with BackgroundServer(create_app(served, batcher)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")

The port is chosen by the OS on a socket bound before uvicorn starts (no race with another process), and the
server is ready when ``GET /health`` answers, polled until then, never a fixed sleep.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import uvicorn
from fastapi import FastAPI


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread at ``self.url`` until :meth:`stop` (or the ``with`` ends)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", ready_timeout_s: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="llama-serve", daemon=True
        )
        self.ready_timeout_s = ready_timeout_s

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                if self.get("/health").get("status") == "ok":
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it answered /health (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {self.url} did not answer /health in {self.ready_timeout_s:g} s")
            time.sleep(0.02)  # a poll interval, not a wait for readiness

    def get(self, path: str) -> Any:
        """``GET path`` as parsed JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
