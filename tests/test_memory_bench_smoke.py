"""``benchmarks/memory.py`` and ``benchmarks/concurrency.py`` at tiny sizes on the CPU: each runs end
to end and its last stdout line is the JSON contract other tools read."""

from __future__ import annotations

import json

import pytest

from bench_scripts import run_benchmark

pytestmark = pytest.mark.engine

# Small thoughts and no zoom cache so the host tier works at these sizes: 116 device tokens per
# zoomr request for admission, against 300-token outputs.
SMALL_ZOOMR = ("--zoomr-env", "ZOOMR_WINDOW=16", "ZOOMR_MAX_THOUGHT_TOKENS=16", 'ZOOMR_CONFIG={"zoom_cache": 0}')


def test_memory_benchmark_prints_resident_ratios(tmp_path):
    plot = tmp_path / "memory.png"
    summary = run_benchmark("memory.py", "--lengths", "256,512", "--plot", str(plot), *SMALL_ZOOMR, timeout=180)
    assert set(summary) == {"resident_ratio"}
    assert set(summary["resident_ratio"]) == {"256", "512"}
    assert all(ratio > 1 for ratio in summary["resident_ratio"].values()), summary

    assert plot.stat().st_size > 0
    full = json.loads(plot.with_suffix(".json").read_text())
    assert full["summary"] == summary
    assert all(row["dense_check"] and row["over_bound_steps"] == 0 for row in full["resident"])
    assert full["resident_host_tier"]["zoom_in_failures"] == 0


def test_concurrency_benchmark_prints_peak_running_requests(tmp_path):
    plot = tmp_path / "concurrency.png"
    # The pool fits two whole dense requests. One admission rule (the default): what each rule charges
    # is checked against SGLang's own PrefillAdder in test_admission.py.
    summary = run_benchmark("concurrency.py", "--requests", "4", "--max-new-tokens", "300",
                               "--max-total-tokens", "700", "--poll", "0.1", "--rules", "observed",
                               "--plot", str(plot), *SMALL_ZOOMR,
                               timeout=240)
    assert set(summary) == {"concurrent_dense", "concurrent_zoomr"}
    assert isinstance(summary["concurrent_dense"], int) and isinstance(summary["concurrent_zoomr"], int)
    assert summary["concurrent_dense"] >= 1
    assert summary["concurrent_zoomr"] / summary["concurrent_dense"] > 1, summary

    assert plot.stat().st_size > 0
    full = json.loads(plot.with_suffix(".json").read_text())
    assert full["summary"] == summary
    assert summary["concurrent_zoomr"] == full["zoomr observed"]["peak_running"]
    for run in (full["dense"], full["zoomr observed"]):
        assert run["finished"] == 4 and not run["errors"]
    assert full["zoomr observed"]["host_tier"]["zoom_in_failures"] == 0
