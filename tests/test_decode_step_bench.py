"""``benchmarks/decode_step.py`` at small sizes on the CPU: it runs the real controller step and
ends with its JSON contract, so the GPU run is not the first time it runs."""

from __future__ import annotations

from bench_scripts import run_benchmark


def test_decode_step_prints_its_contract_for_the_largest_batch():
    result = run_benchmark("decode_step.py", "--contexts", "400,1200", "--batches", "1,2", "--iters", "1", timeout=300)
    assert set(result) == {"device", "step_ratio", "selection_overhead", "batch"}
    assert result["device"] == "cpu" and result["batch"] == 2
    assert set(result["step_ratio"]) == {"400", "1200"}
    assert all(ratio > 0 for ratio in result["step_ratio"].values())
    assert -1.0 < result["selection_overhead"] < 1.0


def test_decode_step_refuses_bad_sizes():
    import subprocess
    import sys

    from bench_scripts import REPO

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_step.py"), "--contexts", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--contexts='100'" in proc.stderr and ">= 272" in proc.stderr
