"""``benchmarks/decode_step.py`` at small sizes on the CPU: it runs the real controller step and
ends with its JSON contract, so the GPU run is not the first time it runs."""

from __future__ import annotations

import json

from bench_scripts import run_benchmark


def test_decode_step_prints_its_contract_for_the_largest_batch(tmp_path):
    rows_file = tmp_path / "rows.json"
    result = run_benchmark("decode_step.py", "--contexts", "400,1200", "--batches", "1,2", "--iters", "1",
                           "--results", str(rows_file), timeout=300)
    assert set(result) == {"device", "step_ratio", "selection_overhead", "batch", "host_us_per_request",
                           "tier_copy_gbps", "worst_step_ratio", "worst_selection_overhead"}
    assert result["device"] == "cpu" and result["batch"] == 2
    assert set(result["step_ratio"]) == set(result["worst_step_ratio"]) == {"400", "1200"}
    assert all(ratio > 0 for ratio in [*result["step_ratio"].values(), *result["worst_step_ratio"].values()])
    assert -1.0 < result["selection_overhead"] < 1.0 and -1.0 < result["worst_selection_overhead"] < 1.0
    assert result["host_us_per_request"] > 0 and result["tier_copy_gbps"] > 0
    # The history is real: with the host tier on, cold thoughts left the device before the timed steps.
    written = json.loads(rows_file.read_text())
    assert written["summary"] == result and written["zoomr_config"]["host_pool_gb"] is None  # the server default
    rows = written["rows"]
    assert [(r["context"], r["batch"]) for r in rows] == [(400, 1), (1200, 1), (400, 2), (1200, 2)]
    assert all(r["slots"] == "tiered" for r in rows)
    assert all(r["tier"]["evicted_tokens"] > 0 for r in rows if r["context"] == 1200)


def test_decode_step_refuses_bad_sizes():
    import subprocess
    import sys

    from bench_scripts import REPO

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_step.py"), "--contexts", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--contexts='100'" in proc.stderr and ">= 384" in proc.stderr
