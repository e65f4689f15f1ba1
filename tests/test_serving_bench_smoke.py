"""``benchmarks/serving.py`` at tiny sizes on the CPU: a dense and a zoomr server, SGLang's
``bench_serving`` against each (one concurrency: every level costs a bench_serving start, about
15 s here), and the last stdout line's JSON contract."""

from __future__ import annotations

import json

import pytest

from bench_scripts import run_benchmark

pytestmark = pytest.mark.engine


def test_serving_benchmark_prints_throughput_per_backend_and_concurrency(tmp_path):
    results = tmp_path / "serving.json"
    summary = run_benchmark("serving.py", "--concurrency", "2", "--output-len", "64", "--rounds", "1",
                            "--results", str(results), timeout=300)
    assert set(summary) == {"device", "output_throughput", "throughput_ratio"}
    assert summary["device"] in ("cpu", "cuda")
    throughput = summary["output_throughput"]
    assert set(throughput) == {"dense", "zoomr"}
    assert set(throughput["dense"]) == set(throughput["zoomr"]) == set(summary["throughput_ratio"]) == {"2"}
    assert throughput["dense"]["2"] > 0 and throughput["zoomr"]["2"] > 0
    assert summary["throughput_ratio"]["2"] == pytest.approx(throughput["zoomr"]["2"] / throughput["dense"]["2"], rel=1e-2)

    full = json.loads(results.read_text())
    assert full["summary"] == summary
    for name in ("dense", "zoomr"):
        level = full[name]["levels"]["2"]
        assert level["completed"] == 2 and level["total_output_tokens"] == 2 * 64  # every output whole
    assert full["zoomr"]["levels"]["2"]["host_tier_after"]["zoom_in_failures"] == 0
    # zoomr serving every position (its full policy) gives dense's greedy tokens.
    assert len(full["probe_identical"]) == 4 and all(full["probe_identical"])
