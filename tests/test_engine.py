"""End to end through ``sglang.Engine`` on the tiny local model (CPU): the backend the entry point
registers serves requests, equals ``torch_native`` with a whole-sequence budget, and keeps its
working set bounded with a small one."""

from __future__ import annotations

import pytest

from engine_utils import engine, generate, prompts, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

FULL_BUDGET = dict(ZOOMR_SINK=0, ZOOMR_WINDOW=100_000)


@pytest.fixture(scope="module")
def dense_outputs(model_path):
    with engine(model_path, "torch_native") as eng:
        return [out["output_ids"] for out in generate(eng, prompts(), 300)]


@pytest.mark.parametrize("engine_kwargs", [
    dict(page_size=1, chunked_prefill_size=32),
    dict(page_size=16, disable_radix_cache=True),
    dict(page_size=16, chunked_prefill_size=64),
], ids=["page1-chunk32-radix", "page16-noradix", "page16-chunk64-radix"])
def test_full_budget_is_token_identical_to_torch_native(model_path, dense_outputs, engine_kwargs):
    with zoomr_env(**FULL_BUDGET), engine(model_path, "zoomr", **engine_kwargs) as eng:
        first = generate(eng, prompts(), 300)
        again = generate(eng, prompts(), 300)  # with the radix cache on, prompts now hit the tree
        state = zoomr_state(eng)
    for outputs in (first, again):
        assert [out["output_ids"] for out in outputs] == dense_outputs
    for out in first + again:
        stats = state["finished"][out["meta_info"]["id"]]
        assert stats["steps"] == 299  # the zoomr decode path really ran, every step
        assert stats["attended_total"] == stats["dense_total"]


# Holes are whole pages: with 16-token pages, the tiny model's ~30-token thoughts free about half.
# What stays besides: sinks, prompt, window, the zoomed thoughts, the zoom cache and the summaries,
# which this random model often leaves open until the 48-token cap (5 of them are 26% of one request).
@pytest.mark.parametrize("engine_kwargs, resident_share, vote", [
    ({}, 0.3, "count"), (dict(page_size=16, chunked_prefill_size=64), 0.7, "mass"),
], ids=["page1-count", "page16-chunk64-mass"])
def test_small_budget_long_generation_stays_bounded_and_exact(model_path, engine_kwargs, resident_share, vote):
    """Host tier off and on (the default): the same tokens; on, most KV leaves SGLang's pool.
    The radix cache is on: the second round of the same prompts hits the tree that the first
    round's finished requests (with holes) were inserted into."""
    budget = dict(ZOOMR_SINK=4, ZOOMR_WINDOW=64, ZOOMR_MAX_THOUGHT_TOKENS=48, ZOOMR_SELF_CHECK_INTERVAL=97,
                  ZOOMR_VOTE=vote)
    with zoomr_env(**budget, ZOOMR_HOST_POOL_GB=0), engine(model_path, "zoomr", **engine_kwargs) as eng:
        all_on_device = [out["output_ids"] for out in generate(eng, prompts()[:3], 1600)]
    with zoomr_env(**budget), engine(model_path, "zoomr", **engine_kwargs) as eng:
        start = zoomr_state(eng)["pools"]
        outputs = generate(eng, prompts()[:3], 1600)
        again = generate(eng, prompts()[:3], 400)
        state = zoomr_state(eng)
    assert [out["output_ids"] for out in outputs] == all_on_device
    assert [out["output_ids"] for out in again] == [ids[:400] for ids in all_on_device]
    for out in outputs:
        assert len(out["output_ids"]) == 1600
        stats = state["finished"][out["meta_info"]["id"]]
        assert stats["steps"] == 1599
        assert stats["over_bound_steps"] == 0
        assert stats["attended_max"] <= stats["bound_last"]
        # The budget bites: late in the output a step attends a small part of the sequence (mass
        # votes weigh a thought by its length, so they pick longer thoughts of the random model).
        assert stats["attended_last"] < stats["dense_last"] / (4 if vote == "count" else 3)
        # ... and most of the request's KV is off the device.
        assert stats["resident_last"] < stats["dense_last"] * resident_share and stats["offloaded_last"] > 0
        assert stats["thoughts_closed"] >= 20
        assert stats["selection_changes"] >= 10 and len(stats["zoom_history"]) == stats["selection_changes"]
        assert len({tuple(s) for s in stats["zoom_history"]}) >= 5
        # The paper's agreement is a share of top-k votes: defined for count votes only.
        assert (0.0 < stats["agreement_mean"] <= 1.0) if vote == "count" else stats["agreement_mean"] is None
        # Sparse decode equals the dense masked reference over exactly the planned set.
        assert stats["self_checks"] >= 2 * 16
        assert stats["self_check_max_error"] < 1e-4
    tier = state["host_tier"]
    offloaded_at_end = sum(state["finished"][out["meta_info"]["id"]]["offloaded_last"] for out in outputs)
    assert tier["evicted_tokens"] >= offloaded_at_end > 1000 and tier["zoomed_in_tokens"] > 0
    assert tier["zoom_in_failures"] == 0 and tier["host_full"] == 0
    assert tier["used_tokens"] == 0  # every host slot came back
    assert state["running"] == {} and state["index_entries_live"] == 0
    end = state["pools"]
    assert end["req_rows_available"] == start["req_rows_available"]
    # Every KV slot is free again or held by the radix tree, unlocked (evictable).
    assert end["kv_protected"] == 0
    assert end["kv_available"] + end["kv_evictable"] == start["kv_available"] + start["kv_evictable"]
