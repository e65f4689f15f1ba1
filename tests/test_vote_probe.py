"""``benchmarks/vote_probe.py``: its JSON contract, and that scoring a summary by its tokens or by
its mean key is the same thing when a summary has one content token (the short task)."""

from __future__ import annotations

from bench_scripts import run_benchmark


def test_one_token_summaries_score_the_same_either_way():
    result = run_benchmark("vote_probe.py", "--task", "short", "--n-problems", "2", timeout=300)
    assert set(result) == {"task", "detail_reads", "mean_key", "summary_tokens", "summary_tokens_per_layer"}
    assert result["task"] == "short" and result["detail_reads"] > 0
    assert result["mean_key"] == result["summary_tokens"]
    per_layer = result["summary_tokens_per_layer"]
    assert len(per_layer) == 4 and all(0 <= hits <= result["detail_reads"] for hits in per_layer)
