"""``benchmarks/decode_step.py`` refuses sizes it cannot time, in process (its parser; the script
exits with this status and message before timing anything). Its run at small sizes on the CPU (the
real controller step, ending with its JSON contract, so the GPU run is not the first time it runs)
is the rehearsal of the GPU check's first call: ``tests/test_gpu_check.py`` runs it there with the
same sizes and checks the contract, once for both."""

from __future__ import annotations

import sys

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
