"""The device half of a step (``DeviceSelection``) through the CPU backend: the fixed-size buffers a
CUDA graph captures (exercised without capture, kernels in Triton's interpreter) decide exactly
what the sliced torch path decides, and the per-layer work never reads a device value on the host."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from backend_harness import Harness, scripted_tokens
from triton_checks import run_script
from zoomr_sglang.config import ZoomRConfig

STEPS = 60

SCENARIO = r"""
import json, random, sys, torch
from backend_harness import Harness, scripted_tokens
from zoomr_sglang.config import ZoomRConfig
config = ZoomRConfig(topk=2, num_thoughts=2, sink=4, window=8, max_thought_tokens=24, refresh_interval=8,
                     max_candidates=24)
harness = Harness(config, seed=1)
fine = sys.argv[1] == "fine"  # no summaries, a budget: the page and token levels
harness.add_request(5, {"zoomr_vote": "count", **({"zoomr_budget": 40} if fine else {})})
harness.add_request(17, {"zoomr_budget": 40} if fine else {})
scripts = [scripted_tokens(random.Random(seed), STEPS, summaries=not fine) for seed in range(2)]
outputs, pages = [], []
for step in range(STEPS):
    _, layers = harness.decode_step([script[step] for script in scripts])
    outputs.append(torch.stack([out for *_, out in layers]).double())
    pages.append([state.policy.fine._pages.tolist() for state in harness.plan.states])
print(json.dumps({
    "fixed_shapes": harness.controller.selection.fixed_shapes,
    "zoom_history": {state.stats.rid: state.stats.zoom_history for state in harness.states.values()},
    "votes_held": sum(state.stats.votes_held for state in harness.states.values()),
    "pages": pages,
    "outputs": torch.stack(outputs).flatten().tolist()[::97],
}))
""".replace("STEPS", str(STEPS))


@pytest.mark.parametrize("levels", ["thoughts", "fine"])
def test_fixed_size_graph_buffers_decide_what_the_sliced_torch_path_decides(levels):
    """The graph path (fixed-size buffers, Triton kernels, here in the interpreter) against the torch
    path: the same thought votes, or, for a model without summaries under a budget, the same pages
    (from bounds committed in padded per-layer calls, queries kept in padded lane slots), the same
    outputs."""
    sliced, fixed = (run_script(SCENARIO, interpret=mode, timeout=600, args=[levels]) for mode in (False, True))
    assert not sliced["fixed_shapes"] and fixed["fixed_shapes"]
    if levels == "fine":
        assert fixed["pages"] == sliced["pages"] and sum(len(p) for step in sliced["pages"] for p in step) > 20
    else:
        assert sliced["votes_held"] > 4
    assert fixed["zoom_history"] == sliced["zoom_history"] and len(sliced["zoom_history"]) == 2
    torch.testing.assert_close(torch.tensor(fixed["outputs"]), torch.tensor(sliced["outputs"]), rtol=1e-6, atol=1e-6)


@contextlib.contextmanager
def no_host_reads():
    """Any read of a tensor's value on the host (what a device-to-host sync would be on a GPU) raises."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called in the per-layer work")
        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("fine", [False, True], ids=["thoughts", "fine"])
def test_per_layer_work_reads_nothing_back_to_the_host(fine):
    """Commits, votes of both kinds and the top-c after the last layer, or (no summaries, a budget)
    page-bound commits and the fine levels' kept queries, with the host reads of a tensor's value
    made to fail."""
    config = ZoomRConfig(topk=2, num_thoughts=1, sink=2, window=6, max_thought_tokens=16, refresh_interval=4)
    harness = Harness(config, seed=2)
    budget = {"zoomr_budget": 32} if fine else {}
    harness.add_request(6, {"zoomr_vote": "count", **budget})
    harness.add_request(9, budget)
    controller = harness.controller
    real_after_attention = controller.after_attention
    checked = []

    def guarded(*args, **kwargs):
        with no_host_reads():
            real_after_attention(*args, **kwargs)
        checked.append((len(controller.step.commits), controller.selection.active_voters,
                        controller.page_slots.active_commits, controller.fine_observers.saving))

    controller.after_attention = guarded
    scripts = [scripted_tokens(random.Random(seed), 80, summaries=not fine) for seed in (4, 5)]
    for step in range(80):
        harness.decode_step([script[step] for script in scripts])
    assert any(commits for commits, *_ in checked)
    if fine:
        assert any(pages for *_, pages, _ in checked) and any(lanes for *_, lanes in checked)
    else:
        assert sum(voters for _, voters, *_ in checked) >= 2 * harness.num_layers
        assert sum(state.stats.votes_held for state in harness.states.values()) > 0


def test_commits_past_a_steps_slots_are_added_within_that_step():
    """A step that commits more keys than its slots (reasoning pasted into a prompt, a retracted
    request's output fed again) has every key in its index entries once its forward ran: nothing
    waits for later steps, so no commit outlives its request's row."""
    from types import SimpleNamespace

    from zoomr_sglang.attention_backend.controller import ZoomRController
    from zoomr_sglang.attention_backend.selection import COMMITS_PER_REQUEST

    layers, kv_heads, head_dim, prompt = 2, 2, 8, 8
    vocab = [" w", ".", "\n\n", "<|begin_of_summary|>", "<|end_of_summary|>"]
    output = ([0] * 9 + [1]) * 6 + [2, 3, 0, 0, 0, 4, 2] + [0] * 40  # a thought, its summary, a new thought
    kv = [torch.randn(256, kv_heads, head_dim) for _ in range(layers)]
    pools = SimpleNamespace(req_to_token=torch.randperm(255)[:200].add(1).int().view(2, 100),
                            req_generation=torch.zeros(2, dtype=torch.int64))
    controller = ZoomRController(
        config=ZoomRConfig(), token_texts=vocab, req_to_token_pool=pools,
        token_to_kv_pool=SimpleNamespace(get_key_buffer=lambda layer: kv[layer], get_value_buffer=lambda layer: kv[layer]),
        num_layers=layers, num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim, device="cpu", index_capacity=32,
        max_voters=1, allocator=None)
    req = SimpleNamespace(rid="r", origin_input_ids=[0] * prompt, output_ids=output, prefix_len=0,
                          sampling_params=SimpleNamespace(custom_params=None, max_new_tokens=len(output)))
    controller.note_request(1, req)
    expected = torch.zeros_like(controller.index_keys.sums)
    for seq_len in (prompt + 1, prompt + 90):  # the first step, then one that feeds 88 tokens at once
        controller.begin_decode(["r"], [seq_len])
        commits = controller.next_plan.commits
        controller.load(1, torch.tensor([output[seq_len - 1 - prompt]]))
        for layer in range(layers):
            controller.after_attention(layer, torch.randn(1, 4, head_dim), torch.zeros(1, 4), 1.0)
            slots = pools.req_to_token[commits[:, 0], commits[:, 1]].long()
            expected[layer].index_add_(0, torch.from_numpy(commits[:, 2]), kv[layer][slots])
    assert len(commits) > COMMITS_PER_REQUEST and controller.selection.commits_bulk == len(commits) - COMMITS_PER_REQUEST
    torch.testing.assert_close(controller.index_keys.sums, expected)
