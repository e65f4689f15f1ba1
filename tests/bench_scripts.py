"""Run a script of ``benchmarks/`` the way a user does and read its last-line JSON contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *args: str, timeout: float) -> dict:
    """The script's last stdout line, parsed; its ZoomR settings are its own defaults and
    ``args`` (none inherited from the test's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOOMR_")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
