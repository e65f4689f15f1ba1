"""``benchmarks/gpu_kernels_bench.py --smoke`` runs on the CPU and ends with its JSON summary, so CI
proves the GPU benchmark is not broken before it ever reaches a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "gpu_kernels_bench.py"


def _run(*args: str, **env: str) -> dict:
    full_env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_smoke_run_reports_every_section(tmp_path):
    out_file = tmp_path / "bench.json"
    summary = _run("--smoke", "--device", "cpu", "--json", str(out_file))
    assert summary == json.loads(out_file.read_text())
    assert summary["ok"] and summary["errors"] == [] and summary["mode"] == "smoke"
    assert summary["device"].startswith("cpu")
    assert [c["name"] for c in summary["checks"] if c["ok"]] == [
        "kv_indices_odd_sizes", "kv_indices_vs_old_gather", "sparse_attention_vs_masked_reference",
        "algorithm_on_device_vs_cpu",
    ]
    by_section = {}
    for row in summary["results"]:
        by_section.setdefault(row["section"], []).append(row)
    assert set(by_section) == {"attention", "kv_indices", "scoring"}
    attention = by_section["attention"]
    assert {r["mode"] for r in attention} == {"dense", "sparse"}
    for row in attention:
        assert row["total_ms"] > 0 and row["sdpa_ms"] > 0 and row["loop_ms"] > 0
        if row["mode"] == "sparse":
            assert 0 < row["attended"] < row["seq_len"] and row["speedup_total"] > 0
    for row in by_section["kv_indices"]:
        assert row["nnz"] > 0 and row["kernel_ms"] > 0 and row["old_step_ms"] > 0 and row["impl"] == "torch"
    for row in by_section["scoring"]:
        assert row["vote_layer_ms"] > 0 and row["vote_step_ms"] > 0


def test_check_mode_runs_the_triton_interpreter():
    summary = _run("--smoke", "--check", "--device", "cpu", TRITON_INTERPRET="1")
    assert summary["ok"] and summary["mode"] == "check" and summary["results"] == []
    assert summary["kv_indices_impl"] == "triton-interpreter"
    assert len(summary["checks"]) == 4 and all(c["ok"] for c in summary["checks"])
