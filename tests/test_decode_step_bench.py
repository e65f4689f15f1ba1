"""``benchmarks/decode_step.py`` refuses sizes it cannot time, in process (its parser; the script
exits with this status and message before timing anything). Its run at small sizes on the CPU (the
real controller step, ending with its JSON contract, so the GPU run is not the first time it runs)
is the rehearsal of the GPU check's first call: ``tests/test_gpu_check.py`` runs it there with the
same sizes and checks the contract, once for both."""

from __future__ import annotations

import random
import sys
from dataclasses import replace

import pytest

from bench_scripts import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import decode_step  # noqa: E402


def test_decode_step_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit) as error:
        decode_step.parse_args(["--contexts", "100"])
    assert error.value.code == 2
    stderr = capsys.readouterr().err
    assert "--contexts='100'" in stderr and ">= 384" in stderr


def test_a_history_without_summaries_is_cut_into_thoughts_and_tiered(monkeypatch):
    """``--no-summaries`` under a share budget (``ZOOMR_BUDGET=0.2``): thoughts end at a blank line
    with no summary; the controller still closes them (each keeps its mean key), the host tier moves
    the cold ones out, and a step reads a fifth of the sequence and the 256-token prompt it keeps."""
    tokens = decode_step.reasoning_tokens(random.Random(0), 2000, summaries=False)
    assert decode_step.BEGIN not in tokens and tokens.count(decode_step.BLANK) >= 5
    monkeypatch.setattr(decode_step, "CONFIG", replace(decode_step.CONFIG, budget=0.2))
    shape = replace(decode_step.SHAPES["cpu"], layers=2, iters=1, warmup=0)
    times = decode_step.measure(shape, 1200, 1, "cpu", summaries=False)
    assert times["tiered"] and times["counters"]["evicted_tokens"] > 0
    assert times["kv_tokens_zoomr"] < decode_step.PROMPT + 0.2 * 1200
