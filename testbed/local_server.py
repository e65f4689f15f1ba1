"""What the benchmarks' and the tests' ``sglang.launch_server`` processes share: a free loopback
port and the wait for ``/health`` (failing early, with the log's tail, if the server exits)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, name: str, timeout: float) -> None:
    """Return once ``url/health`` answers 200; ``proc`` writes its stderr to ``log_path``."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.time() > deadline:
            raise TimeoutError(f"{name} server did not become healthy in {timeout:.0f} s (log: {log_path})")
        time.sleep(0.5)
