"""``benchmarks/memory.py`` at tiny sizes on the CPU: it runs end to end (one zoomr engine, then a
torch_native and a zoomr server) and its last stdout line is the JSON contract other tools read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "memory.py"


def test_memory_benchmark_smoke_run_prints_the_contract(tmp_path):
    plot = tmp_path / "memory.png"
    # A small budget that bites at these sizes: 116 device tokens per zoomr request for admission,
    # against 300-token outputs; the pool fits two dense requests.
    command = [
        sys.executable, str(BENCH), "--lengths", "256,512", "--requests", "4", "--max-new-tokens", "300",
        "--max-total-tokens", "700", "--poll", "0.1", "--plot", str(plot),
        "--zoomr-env", "ZOOMR_WINDOW=16", "ZOOMR_MAX_THOUGHT_TOKENS=16", "ZOOMR_ZOOM_CACHE=0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOOMR_")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == {"resident_ratio", "concurrent_dense", "concurrent_zoomr"}
    assert set(summary["resident_ratio"]) == {"256", "512"}
    assert all(ratio > 1 for ratio in summary["resident_ratio"].values()), summary
    assert isinstance(summary["concurrent_dense"], int) and isinstance(summary["concurrent_zoomr"], int)
    assert summary["concurrent_dense"] >= 1
    assert summary["concurrent_zoomr"] / summary["concurrent_dense"] > 1, summary

    assert plot.stat().st_size > 0
    full = json.loads(plot.with_suffix(".json").read_text())
    assert full["summary"] == summary
    assert all(row["dense_check"] and row["over_bound_steps"] == 0 for row in full["resident"])
    for run in (full["concurrency"]["dense"], full["concurrency"]["zoomr"]):
        assert run["finished"] == 4 and not run["errors"]
    assert full["concurrency"]["zoomr"]["host_tier"]["zoom_in_failures"] == 0
    assert full["resident_host_tier"]["zoom_in_failures"] == 0
