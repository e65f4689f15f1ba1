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


@pytest.mark.cuda
@pytest.mark.skipif(not decode_step.ON_CUDA, reason="needs an NVIDIA GPU")
def test_fine_levels_replayed_in_a_cuda_graph_choose_as_eager_steps(monkeypatch):
    """A model without summaries under a share budget on CUDA: zoomr's per-layer work (index keys,
    thought votes, page-bound commits, the fine levels' kept queries) captured once in a CUDA graph
    and replayed step after step, with the fine levels' passes after each replay, chooses the same
    pages and ranks the same tokens as the same steps run eagerly. CPU twin (the fixed-size
    buffers under Triton's interpreter against the torch path):
    test_selection.py::test_fixed_size_graph_buffers_decide_what_the_sliced_torch_path_decides."""
    import math

    import torch

    monkeypatch.setattr(decode_step, "CONFIG", replace(decode_step.CONFIG, budget=0.2))
    shape = decode_step.Shape(2, 4, 2, 16, torch.float32, (640,), (4,), 80, 0, 1.0, 1.0)  # iters: history room
    context, batch = 640, 4
    cells = []
    for _ in range(2):  # the same history twice (a cell draws its query from torch's global generator)
        torch.manual_seed(0)
        cells.append(decode_step.Cell(shape, context, batch, "cuda", summaries=False))
    eager, graphed = cells
    lse = torch.full((batch, shape.heads), math.log(context), device="cuda")

    def plan(cell, seq_len):
        cell.give_slots(seq_len)
        cell.controller.begin_decode([r.rid for r in cell.reqs], [seq_len] * batch)
        cell.controller.load(batch, cell.decoded(seq_len), padded_bs=batch)

    def layers(cell):
        for layer in range(shape.layers):
            cell.controller.after_attention(layer, cell.query, lse, cell.scaling)

    def chosen(cell):
        states = cell.controller.planner.states.values()
        return [(s.policy.fine._pages.tolist(), s.policy.fine._ranked.tolist()) for s in states]

    seq_len = context + 1
    # The benchmark's capture: its warm-up run is this step's (Triton compiles there); the capture records only.
    graph = decode_step.capture(lambda: plan(graphed, seq_len), lambda _: layers(graphed))
    plan(eager, seq_len)
    layers(eager)
    observed = 0
    for seq_len in range(context + 2, context + 80):
        plan(eager, seq_len)
        layers(eager)
        plan(graphed, seq_len)
        graph.replay()
        torch.cuda.synchronize()
        assert chosen(graphed) == chosen(eager), seq_len
        observed += bool(eager.controller.step.fine_lanes)
        assert not graphed.controller.step.needs_eager
    pages = sum(len(pages) for pages, _ in chosen(eager))
    assert observed > 3 and pages > 0, (observed, pages)
