"""End to end through ``sglang.Engine`` on the tiny local model (CPU): the backend the entry point
registers serves requests, equals ``torch_native`` with a whole-sequence budget, and keeps its
working set bounded with a small one, with the host tier off and on.

An engine start costs tens of seconds here and a round of requests a few, so three engines serve
every check: each answers the whole-budget requests, then (after a flush) the small-budget ones.
Between them: pages of 1 and 16, chunked prefill, SGLang's radix cache off and on, the host tier
off and on (where it is off, the working set and so the tokens do not depend on the page size).
"""

from __future__ import annotations

import pytest

from engine_utils import IDENTITY_TOKENS, engine, generate, generate_whole_budget, prompts, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

# ZoomR's own working set (whole thoughts): the random model's first thoughts often close without a
# summary, which would give them the implicit budget's fine levels, whose page level a paged pool
# lacks (so the tokens would depend on the page size); tests/test_fine_zoom.py serves those.
SMALL_BUDGET = dict(sink=4, window=64, max_thought_tokens=48, self_check_interval=97, implicit_budget=0)
# Holes are whole pages: with 16-token pages, the tiny model's ~30-token thoughts free about half.
# What stays besides: sinks, prompt, window, the zoomed thoughts, the zoom cache and the summaries,
# which this random model often leaves open until the 48-token cap (5 of them are 26% of one request).
TIERED = {  # engine arguments, vote, most of a request's KV left on the device
    "page1-count": (dict(page_size=1, chunked_prefill_size=32), "count", 0.3),
    "page16-mass": (dict(page_size=16, chunked_prefill_size=32), "mass", 0.7),
}
REFERENCE = "page16-noradix-host-off"  # the small-budget tokens of every vote, all KV on the device
REFERENCE_ARGS = dict(page_size=16, chunked_prefill_size=32, disable_radix_cache=True)


def _serve(model_path: str, name: str) -> dict:
    """One engine's rounds: whole-budget twice where the radix cache is on (the second hits the tree;
    the reference, without one, answers once), then small-budget: on the reference every vote once;
    tiered, its vote twice, with the counts."""
    tiered = name != REFERENCE
    kwargs, vote, _ = TIERED[name] if tiered else (REFERENCE_ARGS, None, None)
    env = dict(vote=vote) if tiered else dict(host_pool_gb=0)
    with zoomr_env(**SMALL_BUDGET, **env), engine(model_path, "zoomr", **kwargs) as eng:
        run = dict(whole=[generate_whole_budget(eng, prompts(), IDENTITY_TOKENS) for _ in range(2 if tiered else 1)])
        run["whole_state"] = zoomr_state(eng)
        eng.flush_cache()  # the small-budget round computes its prefill as the reference does
        if not tiered:
            return {**run, **{v: generate(eng, prompts()[:3], 1600, {"zoomr_vote": v}) for _, v, _ in TIERED.values()}}
        run["start"] = zoomr_state(eng)["pools"]
        run["small"] = generate(eng, prompts()[:3], 1600)
        run["again"] = generate(eng, prompts()[:3], 400)
        run["state"] = zoomr_state(eng)
        return run


@pytest.fixture(scope="module")
def served(model_path):
    """``served(name)``: that engine's rounds, the engine started once, on first use."""
    runs = {}

    def get(name: str) -> dict:
        if name not in runs:
            runs[name] = _serve(model_path, name)
        return runs[name]

    return get


@pytest.mark.parametrize("name", [REFERENCE, *TIERED])
def test_whole_budget_is_token_identical_to_torch_native(served, dense_outputs, name):
    run = served(name)
    for outputs in run["whole"]:
        assert [out["output_ids"] for out in outputs] == dense_outputs
        for out in outputs:
            stats = run["whole_state"]["finished"][out["meta_info"]["id"]]
            assert stats["steps"] == IDENTITY_TOKENS - 1  # the zoomr decode path really ran, every step
            assert stats["attended_total"] == stats["dense_total"]


@pytest.mark.parametrize("name", list(TIERED))
def test_small_budget_long_generation_stays_bounded_and_exact(served, name):
    """Host tier off and on (the default): the same tokens; on, most KV leaves SGLang's pool.
    The radix cache is on: the second round of the same prompts hits the tree that the first
    round's finished requests (with holes) were inserted into."""
    _, vote, resident_share = TIERED[name]
    all_on_device = [out["output_ids"] for out in served(REFERENCE)[vote]]
    run = served(name)
    outputs, state, start = run["small"], run["state"], run["start"]
    assert [out["output_ids"] for out in outputs] == all_on_device
    assert [out["output_ids"] for out in run["again"]] == [ids[:400] for ids in all_on_device]
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
