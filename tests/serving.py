"""A real `minillama serve` process on a free loopback port, for the server and web-page tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def start_server(model: str, *args: str, tmp_path, timeout: float = 120, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None) -> Iterator[Server]:
    """Start `minillama serve MODEL ARGS` on a free port (one torch thread), wait for /health 200, and stop it
    afterwards. Its output goes to a log file (server.log in tmp_path), printed if it fails to come up.
    launcher: what runs `-m minillama` (default: this Python; e.g. torchrun's module for tensor parallelism)."""
    port = free_port()
    log_path = os.path.join(tmp_path, f"server-{port}.log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        command = [*(launcher or [sys.executable]), "-m", "minillama", "serve", str(model), "--port", str(port),
                   "--threads", "1", *args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"minillama serve exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"minillama serve did not become ready in {timeout} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
