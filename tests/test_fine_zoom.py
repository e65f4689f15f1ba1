"""ZoomR's page and token levels for thoughts without summaries (algo/fine_zoom.py), alone, in the
zoomr policy, and through the CPU backend."""

import random

import numpy as np
import pytest
import torch

from backend_harness import TOKEN, Harness, scripted_tokens
from dataclasses import replace

from zoomr_sglang.algo.fine_zoom import pages_wanted
from zoomr_sglang.algo.page_bounds import PAGE_TOKENS
from zoomr_sglang.algo.page_scores import PageScorer
from zoomr_sglang.algo.policies import StepView, ZoomRPolicy
from zoomr_sglang.algo.policy_base import range_positions
from zoomr_sglang.algo.segmentation import Thought
from zoomr_sglang.algo.token_weights import accumulate_token_weights, lane_entries, token_layer_weight
from zoomr_sglang.algo.torch_attention import dense_attention_weights, gather_decode_attention
from zoomr_sglang.algo.working_set import ranges_size
from zoomr_sglang.config import ZoomRConfig

SEQ, BUDGET = 128, 64


def covers(ranges, start, end):
    return any(a <= start and end <= b for a, b in ranges.tolist())


def reference_observation(attended, seq_len, keys, queries, wanted, scaling=1.0):
    """What the device hands back for one request at an observed step, by the per-request
    references: every layer's query heads vote with ``PageScorer`` for ``wanted`` of the pages (the
    prompt's too) that ``attended`` leaves out, and the float64 softmax over the working set,
    summed over heads and over layers by :func:`token_layer_weight`. ``queries``: per layer
    ``[num_heads, head_dim]``; ``keys``: per layer ``[>= seq_len, num_kv_heads, head_dim]`` by
    position. Returns (weights, pages)."""
    complete = seq_len // PAGE_TOKENS
    covered = np.zeros(complete * PAGE_TOKENS, dtype=bool)
    positions = range_positions(attended)
    covered[positions[positions < len(covered)]] = True
    outside = ~covered.reshape(complete, PAGE_TOKENS).all(axis=1)
    scorer = PageScorer()
    scorer.ask(torch.from_numpy(np.flatnonzero(outside)), wanted)
    weights = torch.zeros(len(positions), dtype=torch.float64)
    for layer, (layer_keys, query) in enumerate(zip(keys, queries)):
        scorer.observe(layer, query, layer_keys[: complete * PAGE_TOKENS])
        weights += (dense_attention_weights(query, layer_keys[torch.from_numpy(positions)], scaling).sum(dim=0)
                    * token_layer_weight(layer, len(keys)))
    return weights.float().numpy(), np.array(scorer.ranking(), dtype=np.int64)


def test_the_next_step_keeps_the_most_attended_token_and_the_page_the_bounds_vote_for():
    generator = torch.Generator().manual_seed(0)
    keys = 0.1 * torch.randn(SEQ + 1, 1, 8, generator=generator)
    query = torch.zeros(2, 8)
    query[:, 0] = 1.0
    keys[68, 0, 0] = 6.0  # attended at the first step (the far end of its grown window), drew the most attention
    keys[32:48, 0, 0] = 8.0  # page 2: never attended, its bounds match the query best
    # Sinks [0, 4) and a window of 10 are kept; the thought [4, 60) closed without a summary.
    implicit = dict(prompt_len=4, thoughts=[Thought(index=0, start=4, body_end=60, final=True)], zoomed=[0])
    policy = ZoomRPolicy(num_thoughts=1)
    first_view = _view(**implicit)
    first = policy.working_set(first_view)
    assert ranges_size(first) == BUDGET and covers(first, 68, 128) and not covers(first, 32, 48)
    assert policy.observes_on_device(first_view) and pages_wanted(BUDGET) == 1
    weights, pages = reference_observation(first, SEQ, [keys] * 2, [query] * 2, pages_wanted(BUDGET))
    assert pages.tolist() == [2]
    policy.take_observation(first, weights, pages)
    second_view = _view(seq_len=SEQ + 1, **implicit)
    second = policy.working_set(second_view)
    assert ranges_size(second) == BUDGET and covers(second, 68, 69) and covers(second, 32, 48)
    # Without what the first step observed, the window alone reaches neither.
    plain = ZoomRPolicy(num_thoughts=1).working_set(second_view)
    assert not covers(plain, 68, 69) and not covers(plain, 32, 48)
    # With the host tier, the next step wants the chosen page, the most attended tokens and the
    # complete pages without bounds yet (from bounds_end on) on the device.
    bounded, unbounded = (set(policy.wanted_positions(replace(second_view, bounds_end=end)).tolist()) for end in (8, 1))
    assert {32, 47, 68, 127} <= bounded and 20 not in bounded and bounded | set(range(16, 128)) == unbounded


def test_the_batched_token_weights_equal_a_softmax_per_request():
    """One pass over every observing lane of a step (GQA, lanes of different lengths, a lane that
    does not observe, an empty last lane) gives each lane's float64 softmax over its working set,
    summed over heads."""
    generator = torch.Generator().manual_seed(1)
    num_heads, num_kv_heads, head_dim, scaling = 8, 2, 16, 0.25
    key_buffer = torch.randn(200, num_kv_heads, head_dim, generator=generator)
    lengths = [37, 5, 60, 1]
    kv_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    kv_indices = torch.randperm(200, generator=generator)[: kv_indptr[-1]].to(torch.int32)
    query = torch.randn(len(lengths), num_heads, head_dim, generator=generator)
    _, lse = gather_decode_attention(query, key_buffer, key_buffer, torch.from_numpy(kv_indptr), kv_indices, scaling)
    lanes = np.array([2, 0, 3], dtype=np.int64)  # lane 1 does not observe
    entries, sizes = lane_entries(kv_indptr, lanes)
    assert entries.shape == (3, 60) and sizes.tolist() == [60, 37, 1]
    padded, no_size = lane_entries(np.append(kv_indptr, kv_indptr[-1]), np.array([4, 3]))  # lane 4 is empty
    assert no_size.tolist() == [0, 1] and padded.max() < kv_indptr[-1]
    valid = torch.arange(60)[None, :] < torch.from_numpy(sizes)[:, None]
    weights = torch.zeros(entries.shape)
    # two layers with the same query (one layer's weights times 1 + 1/2), gathering into fresh memory and into a buffer
    for key_rows, layer_weight in ((None, 1.0), (torch.empty(entries.size, num_kv_heads, head_dim), 0.5)):
        accumulate_token_weights(query, lse, key_buffer, kv_indices, torch.from_numpy(lanes),
                                 torch.from_numpy(entries), valid, weights, scaling, key_rows=key_rows,
                                 layer_weight=layer_weight)
    for lane, (batch_index, size) in enumerate(zip(lanes, sizes)):
        slots = kv_indices[kv_indptr[batch_index]:kv_indptr[batch_index + 1]].long()
        reference = 1.5 * dense_attention_weights(query[batch_index], key_buffer[slots], scaling).sum(dim=0)
        torch.testing.assert_close(weights[lane, :size].double(), reference, rtol=1e-5, atol=1e-6)
        assert bool((weights[lane, size:] == 0).all())


def test_through_the_backend_the_device_observations_equal_the_per_request_references():
    """At every observed step the backend keeps the observing requests' queries in the forward and,
    after it, sums their token weights and casts their page votes in one pass a layer, from bounds
    kept in KV slots; two steps later each
    request's policy ranks its tokens as the per-request float64 softmax over the same queries and
    keys would (two weights within float32 rounding of each other may come in either order), and
    holds the pages ``PageScorer`` would choose. Every bound slot goes back to the pool."""
    config = ZoomRConfig(sink=4, window=12, max_thought_tokens=16)
    harness = Harness(config, seed=11)
    free_at_start = harness.allocator.available_size()
    for prompt_len in (6, 10, 40):
        harness.add_request(prompt_len, {"zoomr_policy": "zoomr", "zoomr_budget": 48})
    scripts = [scripted_tokens(random.Random(30 + i), 200, summaries=False) for i in range(3)]
    expected = {}  # step -> [(state, reference token weights by position, reference pages)]
    compared = pages_compared = 0
    for step in range(200):
        _, layers = harness.decode_step([script[step] for script in scripts])
        plan = harness.plan
        for state, weight_at, pages in expected.pop(step - 2, []):  # taken by this step's plan
            if harness.states.get(state.row) is state:
                ranked = state.policy.fine._ranked
                assert sorted(ranked.tolist()) == sorted(weight_at), (step, state.row)
                in_order = np.array([weight_at[p] for p in ranked.tolist()])
                assert (in_order[1:] <= in_order[:-1] * (1 + 1e-5)).all(), (step, state.row)
                assert np.array_equal(state.policy.fine._pages, pages), (step, state.row)
                compared += 1
                pages_compared += len(pages) > 0
        references = []
        assert not plan.needs_eager  # observed or not, a step may replay a decode graph
        for lane in plan.fine_lanes:
            seq_len = plan.seq_lens[lane.batch_index]
            assert lane.num_pages == seq_len // 16
            slots = harness.req_to_token_pool.req_to_token[lane.state.row, :seq_len].long()
            keys = [harness.kv_pool.get_key_buffer(layer)[slots] for layer in range(len(layers))]
            queries = [q[lane.batch_index].reshape(harness.num_heads, harness.head_dim) for q, _, _, _ in layers]
            weights, pages = reference_observation(lane.ranges, seq_len, keys, queries, lane.pages_wanted,
                                                   harness.head_dim ** -0.5)
            references.append((lane.state, dict(zip(range_positions(lane.ranges).tolist(), weights.tolist())), pages))
        expected[step] = references
    assert compared > 20 and pages_compared > 20, (compared, pages_compared)
    assert harness.controller.page_slots.alloc_failures == 0
    harness.release_all()
    assert harness.allocator.available_size() == free_at_start and harness.controller.page_slots.rows == {}


def _view(thoughts, **overrides):
    base = dict(seq_len=SEQ, prompt_len=10, sink=4, window=10, budget=BUDGET, thoughts=thoughts,
                candidates=[t.index for t in thoughts if t.final], zoomed=[], open_from=60, zoom_pages=True)
    return StepView(**{**base, **overrides})


def test_zoomr_zooms_into_pages_only_under_a_budget_and_without_summaries():
    implicit = [Thought(index=0, start=10, body_end=60, final=True)]
    summarized = [Thought(index=0, start=10, body_end=56, summary_start=56, summary_end=60, content_start=57,
                          content_end=59, final=True)]
    observing = ZoomRPolicy(num_thoughts=2)
    ranges = observing.working_set(_view(implicit))
    assert observing.observes_on_device(_view(implicit)) and ranges_size(ranges) == BUDGET
    assert not observing.observes_on_device(_view(implicit, observe=False))  # between refresh points
    for thoughts, overrides in ((summarized, {}), (implicit, {"zoom_pages": False}),
                                (implicit, {"budget": 0}), ([], {"candidates": []})):
        policy = ZoomRPolicy(num_thoughts=2)
        view = _view(thoughts, **overrides)
        policy.working_set(view)
        assert not policy.observes_on_device(view) and policy.wanted_positions(view) is None, overrides


def test_zoomr_without_summaries_through_the_backend_observes_matches_the_reference_and_returns_every_slot():
    budget = 48
    for implicit_zoom in ("pages", "thoughts"):
        config = ZoomRConfig(sink=4, window=12, max_thought_tokens=16, self_check_interval=1,
                             implicit_zoom=implicit_zoom)
        harness = Harness(config, seed=3)
        free_at_start = harness.allocator.available_size()
        for prompt_len in (6, 10):
            harness.add_request(prompt_len, {"zoomr_policy": "zoomr", "zoomr_budget": budget})
        scripts = [scripted_tokens(random.Random(seed), 160, summaries=False) for seed in range(2)]
        observed_steps = 0
        for step in range(160):
            harness.decode_step([script[step] for script in scripts])
            observed_steps += bool(harness.plan.fine_lanes)
            for state, ranges in zip(harness.plan.states, harness.plan.working_sets):
                assert ranges_size(ranges) <= max(budget, state.prompt_len + config.thought_sink + 3)
        assert (observed_steps > 30) == (implicit_zoom == "pages"), (implicit_zoom, observed_steps)  # at refresh points
        for state in harness.states.values():
            assert state.stats.self_check_max_error < 1e-5 and state.stats.attended_total < state.stats.dense_total
        assert (harness.controller.page_slots.rows != {}) == (implicit_zoom == "pages")
        harness.release_all()
        assert harness.allocator.available_size() == free_at_start
        assert harness.controller.index_keys.num_live == 0 and harness.controller.page_slots.rows == {}


def _fine_run(host_tier_tokens: int, fine_observe: str, steps: int = 240):
    """Two requests without summaries under a 48-token budget, zoomr's fine levels; returns each
    step's outputs, the harness, the pool's free slots at the start and at the end and the number
    of steps that observed."""
    config = ZoomRConfig(sink=4, window=12, max_thought_tokens=64, fine_observe=fine_observe)
    harness = Harness(config, seed=5, host_tier_tokens=host_tier_tokens)
    free_at_start = harness.allocator.available_size()
    for prompt_len in (6, 10):
        harness.add_request(prompt_len, {"zoomr_policy": "zoomr", "zoomr_budget": 48})
    # A first thought of 60 tokens: until it closes, whole thoughts fill the budget, and the window
    # grows as far as it does without the tier (nothing has left the device yet).
    scripts = [[TOKEN["a"]] * 60 + scripted_tokens(random.Random(seed), steps - 60, summaries=False)
               for seed in (7, 8)]
    outputs, observed = [], 0
    for step in range(steps):
        _, layers = harness.decode_step([script[step] for script in scripts])
        outputs.append(torch.stack([out for (_, _, _, out) in layers]))
        observed += bool(harness.plan.fine_lanes)
        assert not bool((harness.backend.kv_indices == 0).any()), f"step {step} attends a hole"
    return outputs, harness, free_at_start, harness.allocator.available_size(), observed


@pytest.mark.parametrize("fine_observe", ["step", "refresh"])
def test_fine_levels_with_the_host_tier_are_lossless_keep_little_resident_and_return_every_count(fine_observe):
    """The host tier moves closed thoughts off whole and brings back only the positions the page
    and token levels want: every step's outputs equal the run without the tier, whether the levels
    observe every step or only at refresh points (then far fewer steps observe)."""
    dense_outputs, dense, dense_start, dense_end, dense_observed = _fine_run(0, fine_observe)
    tiered_outputs, tiered, tiered_start, tiered_end, observed = _fine_run(4096, fine_observe)
    for step, (a, b) in enumerate(zip(dense_outputs, tiered_outputs)):
        assert torch.equal(a, b), f"step {step} differs with the host tier on"
    assert observed == dense_observed and (observed > 150) == (fine_observe == "step"), observed
    tiering = tiered.controller.tiering
    counters = tiering.counters
    assert counters.evicted_tokens > 300 and counters.zoomed_in_tokens > 0 and counters.dropped_tokens > 0
    assert counters.zoom_in_failures == 0 and counters.copy_failures == 0
    for state in tiered.states.values():
        assert state.zooms_fine() and state.votable == 0 and state.zoomed == []
        tier = state.tier
        assert len(tier.zoomed_positions) > 0
        # what the device holds of the request: its sequence less what only the host tier has, and
        # its pages' bounds (one slot each, the prompt's pages too)
        bounds = state.stats.dense_last // 16
        assert state.bound_slots in (bounds - 1, bounds) and state.bound_slots > 0
        assert state.stats.resident_last == state.stats.dense_last - tier.offloaded + state.bound_slots
        assert state.stats.resident_last < 0.5 * state.stats.dense_last
        assert tiering.uncounted_device_tokens(state.row, 0) == len(tier.zoomed_positions) - sum(
            end - start for start, end in tiering.holes(state.row))
    assert (tiered_start - tiered_end) < 0.6 * (dense_start - dense_end)
    for harness, free_at_start in ((dense, dense_start), (tiered, tiered_start)):
        harness.release_all()
        assert harness.allocator.available_size() == free_at_start
        assert harness.controller.index_keys.num_live == 0
    assert tiering.host.num_used == 0 and tiering.rows == {}


def test_without_a_budget_a_model_that_writes_no_summaries_gets_the_implicit_share():
    """No budget set: a request whose thoughts close without summaries attends ``implicit_budget``
    of its sequence through the fine levels, at least its skeleton and the configured window, at
    most ZoomR's own bound; one with summaries keeps ZoomR's working set; an ``implicit_budget`` of
    0 leaves both unbounded."""
    # The share binds (window 64), ZoomR's bound (12), the skeleton and window (100); then no share.
    for implicit_budget, window in ((0.35, 64), (0.35, 12), (0.35, 100), (0, 12)):
        config = ZoomRConfig(sink=4, window=window, max_thought_tokens=16, implicit_budget=implicit_budget)
        harness = Harness(config, seed=9, host_tier_tokens=4096)
        free_at_start = harness.allocator.available_size()
        for prompt_len in (6, 10):
            harness.add_request(prompt_len)
        scripts = [scripted_tokens(random.Random(20 + i), 300, summaries=summaries)
                   for i, summaries in enumerate((False, True))]
        for step in range(300):
            harness.decode_step([script[step] for script in scripts])
        plain, summarized = harness.plan.states
        assert summarized.budget == 0 and not summarized.zooms_fine()
        assert summarized.stats.over_bound_steps == 0  # within ZoomR's bound
        if implicit_budget:
            assert plain.budget == implicit_budget and plain.zooms_fine() and plain.tier.zoomed_positions.size
            share = -(-plain.stats.dense_last * 35 // 100)
            floor = max(config.sink, plain.prompt_len) + config.thought_sink + window
            binding = min(max(share, floor), plain.zoomr_bound)
            assert plain.stats.attended_last == plain.stats.bound_last == binding
            assert binding == {64: share, 12: plain.zoomr_bound, 100: floor}[window]
        else:
            assert plain.budget == 0 and not plain.zooms_fine() and plain.votable > 0
            assert plain.stats.bound_last == plain.zoomr_bound and plain.stats.over_bound_steps == 0
        harness.release_all()
        assert harness.allocator.available_size() == free_at_start
        assert harness.controller.tiering.host.num_used == 0


def test_the_token_weights_benchmark_prints_its_ratios():
    """benchmarks/token_weights.py at toy sizes: its last line names every working set's ratios."""
    from bench_scripts import run_benchmark

    result = run_benchmark("token_weights.py", "--working-sets", "16,40", "--batch", "2", "--repeats", "1",
                           timeout=300)
    assert set(result) == {"device", "batch", "pass_over_attention", "per_request_over_attention"}
    assert result["batch"] == 2 and set(result["pass_over_attention"]) == {"16", "40"}
    assert all(ratio > 0 for ratio in result["per_request_over_attention"].values())


def _observed(device: str, lanes, kv_indptr, kv_indices, query, lse, keys, values, row_pages, layers: int = 2,
              max_lanes: int = 4, left_out: int = 0):
    """Per lane the token weights and chosen pages FineObservers reads back after ``layers`` layers
    on ``device`` (lane ``b`` in pool row ``b``, its first page attended, its pages 1-5 voted on),
    with ``left_out`` of the lanes past ``max_lanes``."""
    from types import SimpleNamespace

    from zoomr_sglang.attention_backend.fine_observers import FineObservers
    from zoomr_sglang.attention_backend.host_plan import FineLane

    buffers = keys.to(device), values.to(device)
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer: buffers[0], get_value_buffer=lambda layer: buffers[1])
    observers = FineObservers(num_layers=layers, num_heads=query.shape[1], head_dim=query.shape[2], max_lanes=max_lanes,
                              kv_pool=kv_pool, page_slots=SimpleNamespace(row_pages=row_pages.to(device)),
                              device=device, vote_group=None)
    fine_lanes = [FineLane(b, SimpleNamespace(row=b), np.array([[0, 16]]), 6, 2) for b in lanes]
    observers.load(SimpleNamespace(fine_lanes=fine_lanes, kv_indptr=torch.from_numpy(kv_indptr)))
    for layer in range(layers):
        observers.after_attention(layer, query.to(device), lse.to(device), 0.25)
    observers.finish(kv_indices.to(device))  # after the forward
    observers.load(SimpleNamespace(fine_lanes=[]))  # queues the copy behind the passes
    assert observers.lanes_left_out == left_out
    return [(weights, pages) for _, _, weights, pages in observers.take()]


def _observer_case():
    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 500, 2, 64, generator=generator)
    lengths = [120, 7, 260]  # 387 token slots out of 400 (slots 400-423 hold the page bounds)
    kv_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    kv_indices = torch.randperm(400, generator=generator)[: kv_indptr[-1]].to(torch.int32)
    query = torch.randn(3, 8, 64, generator=generator)
    _, lse = gather_decode_attention(query, keys, values, torch.from_numpy(kv_indptr), kv_indices, 0.25)
    row_pages = (400 + torch.arange(3 * 8)).view(3, 8).to(torch.int32)  # bounds: random rows past the tokens'
    return kv_indptr, kv_indices, query, lse, keys, values, row_pages


def test_observers_past_the_lane_limit_are_left_out_counted_and_the_others_unchanged():
    """Past ``max_lanes`` a step's later observers get no observation (they keep their last choice),
    the count says how many, and the first lanes' observations are the ones an unlimited step gives."""
    kv_indptr, kv_indices, query, lse, keys, values, row_pages = _observer_case()
    whole = _observed("cpu", [0, 2], kv_indptr, kv_indices, query, lse, keys, values, row_pages)
    limited = _observed("cpu", [0, 2], kv_indptr, kv_indices, query, lse, keys, values, row_pages, max_lanes=1,
                        left_out=1)
    assert len(whole) == 2 and len(limited) == 1
    np.testing.assert_allclose(limited[0][0], whole[0][0], rtol=1e-5, atol=1e-7)  # other shapes, other rounding
    assert np.array_equal(limited[0][1], whole[0][1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fine_observers_on_cuda_equal_the_cpu_path():
    """The device path of the fine levels (pinned upload, candidates, the token pass and the page
    vote kernels, the choice, the pinned readback behind an event) gives the CPU path's weights
    (each lane's 2 layers x 8 heads of softmax) and pages; its CPU twins are
    test_the_batched_token_weights_equal_a_softmax_per_request and tests/test_page_bounds.py."""
    kv_indptr, kv_indices, query, lse, keys, values, row_pages = _observer_case()
    on_cpu = _observed("cpu", [0, 2], kv_indptr, kv_indices, query, lse, keys, values, row_pages)
    on_cuda = _observed("cuda", [0, 2], kv_indptr, kv_indices, query, lse, keys, values, row_pages)
    for (cpu_weights, cpu_pages), (cuda_weights, cuda_pages), size in zip(on_cpu, on_cuda, (120, 260)):
        assert len(cuda_weights) == size and abs(float(cpu_weights.sum()) - 16.0) < 1e-3
        np.testing.assert_allclose(cuda_weights, cpu_weights, rtol=1e-4, atol=1e-6)
        assert len(cpu_pages) == 2 and set(cpu_pages.tolist()) <= {1, 2, 3, 4, 5}
        assert np.array_equal(cuda_pages, cpu_pages)


TOKEN_KERNEL_SCRIPT = r"""
import json
import numpy as np, torch
from zoomr_sglang.algo.token_weights import accumulate_token_weights as reference, lane_entries
from zoomr_sglang.algo.torch_attention import gather_decode_attention
from zoomr_sglang.kernels import token_weights as tw
assert tw.triton_interpreted(), "TRITON_INTERPRET=1 did not reach the kernel"
out = []
# GQA groups of 4 and 3 (not a power of two), head_dim 16 and 24; default blocks, then blocks of 4
for (num_heads, num_kv_heads, head_dim), max_block in (((8, 2, 16), 64), ((6, 2, 24), 4)):
    tw.MAX_BLOCK = max_block
    gen = torch.Generator().manual_seed(num_heads)
    keys = torch.randn(300, num_kv_heads, head_dim, generator=gen)
    kv_indptr = np.array([0, 37, 42, 102, 103], dtype=np.int32)
    kv_indices = torch.randperm(300, generator=gen)[:103].to(torch.int32)
    query = torch.randn(4, num_heads, head_dim, generator=gen)
    _, lse = gather_decode_attention(query, keys, keys, torch.from_numpy(kv_indptr), kv_indices, 0.3)
    lanes = np.array([2, 0, 3], dtype=np.int64)
    entries, sizes = lane_entries(kv_indptr, lanes)
    args = (torch.from_numpy(lanes), torch.from_numpy(entries),
            torch.arange(entries.shape[1])[None, :] < torch.from_numpy(sizes)[:, None])
    expected, got = torch.zeros(entries.shape), torch.zeros(entries.shape)
    for layer_weight in (1.0, 0.25):  # two layers add up, each weighed
        reference(query, lse, keys, kv_indices, *args, expected, 0.3, layer_weight=layer_weight)
        tw.accumulate_token_weights(query, lse, keys, kv_indices, *args, got, 0.3, layer_weight=layer_weight)
    out.append({"close": bool(torch.allclose(got, expected, rtol=1e-5, atol=1e-6)),
                "padding_zero": bool((got[~args[2]] == 0).all()), "nonzero": bool(expected.sum() > 0)})
print(json.dumps(out))
"""


def test_token_weight_kernel_in_interpreter_matches_torch():
    from triton_checks import run_script

    out = run_script(TOKEN_KERNEL_SCRIPT, interpret=True, timeout=600)
    assert out == [{"close": True, "padding_zero": True, "nonzero": True}] * 2


def test_token_weight_kernel_compiles_for_sm90_without_a_gpu():
    from triton_checks import assert_compiles_for_sm90
    from zoomr_sglang.kernels import token_weights as tw

    types = {"query": "*bf16", "log_normalizer": "*fp32", "keys": "*bf16", "kv_indices": "*i32", "lanes": "*i64",
             "entries": "*i64", "valid": "*u8", "weights": "*fp32", "scaling": "fp32"}
    constants = {"NUM_KV_HEADS": 8, "GROUP": 4, "GROUP_P2": 4, "HEAD_DIM": 128, "DIM_P2": 128, "BLOCK": 16}
    assert_compiles_for_sm90(tw, "_token_weight_kernel", types, constants)
