"""``--radix-cache-backend zoomr`` end to end (``sglang.Engine``, CPU): a second turn whose prompt
holds the first turn's reasoning hits the tree, inherits its thoughts, index keys and cold
thoughts, stays small on the device, and every count comes back, also when it is aborted.

The tests that only need the zoomr tree under the small budget share one engine (``tree_engine``);
each flushes the tree first and reads the engine's running totals as differences from its start.
(``launch_server`` with the zoomr tree, aborts over HTTP included: ``tests/test_soak.py``.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from engine_utils import GREEDY, assert_idle_counts, engine, generate, generate_whole_budget, prompts, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

# Whole thoughts, as the tree inherits them (no implicit budget: the random model's first thoughts
# often close without a summary, and the fine levels are tests/test_fine_zoom.py's).
SMALL_BUDGET = dict(sink=4, window=64, max_thought_tokens=48, vote="count", implicit_budget=0)
MESSAGE = [5, 6, 7, 8, 9, 10]  # the short new message of turn 2 (a tool result, say)


def _two_turns(eng, first_prompts, turn1_tokens=600, turn2_tokens=200, run=generate):
    turn1 = run(eng, first_prompts, turn1_tokens)
    second_prompts = [p + out["output_ids"] + MESSAGE for p, out in zip(first_prompts, turn1)]
    return turn1, second_prompts, run(eng, second_prompts, turn2_tokens)


def test_concurrent_sessions_sharing_a_prefix_under_eviction_keep_every_count(model_path):
    """Four sessions (two share a 40-token prefix) of two turns in a pool too small for the tree
    to keep everything: it evicts device and host pieces, and every count still comes back."""
    first = prompts()
    with zoomr_env(**SMALL_BUDGET), engine(model_path, "zoomr", radix_cache_backend="zoomr",
                                           max_total_tokens=1200) as eng:
        _, second, turn2 = _two_turns(eng, first, turn1_tokens=500, turn2_tokens=150)
        _, _, turn3 = _two_turns(eng, [p + o["output_ids"] for p, o in zip(second, turn2)][:2], 150, 100)
        state = zoomr_state(eng)
        assert state["radix"]["evicted_device_tokens"] > 0
        assert all(len(o["output_ids"]) == 150 for o in turn2) and all(len(o["output_ids"]) == 100 for o in turn3)
        assert state["host_tier"]["zoom_in_failures"] == 0
        assert_idle_counts(eng, state)


@pytest.fixture(scope="module")
def tree_engine(model_path):
    with zoomr_env(**SMALL_BUDGET), engine(model_path, "zoomr", radix_cache_backend="zoomr") as eng:
        yield eng


def test_turn_two_hits_the_tree_inherits_the_index_and_stays_small(tree_engine):
    eng = tree_engine
    eng.flush_cache()
    reused_before = zoomr_state(eng)["index_entries_reused"]
    turn1, second, turn2 = _two_turns(eng, prompts()[:2])
    state = zoomr_state(eng)
    assert state["radix"]["host_tokens"] > 0  # cold thoughts went into the tree as host pieces
    reused = 0
    for one, prompt, two in zip(turn1, second, turn2):
        before = state["finished"][one["meta_info"]["id"]]
        after = state["finished"][two["meta_info"]["id"]]
        turn1_len = len(prompt) - len(MESSAGE)
        assert two["meta_info"]["cached_tokens"] >= 0.9 * turn1_len
        assert after["inherited_keys"] > 0 and after["inherited_thoughts"] >= after["inherited_keys"]
        # Device-resident KV stays near turn 1's (plus the new message and turn 2's own
        # output), far below the whole sequence.
        assert after["resident_max"] <= before["resident_max"] + len(MESSAGE) + 200
        assert after["resident_max"] < 0.6 * (len(prompt) + 200)
        assert after["prompt_len"] == before["prompt_len"]  # the reasoning still starts after turn 1's prompt
        reused += after["inherited_keys"]
    assert state["index_entries_reused"] - reused_before == reused
    assert state["host_tier"]["zoom_in_failures"] == 0
    assert_idle_counts(eng, state)


def test_full_budget_turn_two_equals_its_prefill_without_the_tree(tree_engine):
    """Each request's budget covers its sequence: turn 2 through the tree (inherited KV, thoughts
    and index keys) gives the tokens of the same prompts prefilled whole once the tree is flushed."""
    eng = tree_engine
    eng.flush_cache()
    reused_before = zoomr_state(eng)["index_entries_reused"]
    _, second, turn2 = _two_turns(eng, prompts()[:2], run=generate_whole_budget)
    state = zoomr_state(eng)
    assert all(o["meta_info"]["cached_tokens"] >= len(p) - len(MESSAGE) - 1 for o, p in zip(turn2, second))
    assert state["index_entries_reused"] > reused_before
    assert_idle_counts(eng, state)  # ends with the tree flushed: nothing of turn 1 left to match
    reference = generate_whole_budget(eng, second, 200)
    assert [o["output_ids"] for o in turn2] == [o["output_ids"] for o in reference]


def test_reasoning_pasted_into_a_prompt_is_segmented_tiered_and_inherited(model_path, tree_engine):
    """A prompt holding another run's reasoning (with summary markers) is cut into thoughts from
    where that reasoning starts: they leave the device like generated ones, and with the zoomr tree
    the next turn inherits them."""
    from transformers import AutoTokenizer

    from testbed.tiny_model import SUMMARY_BEGIN_TOKEN

    marker = AutoTokenizer.from_pretrained(model_path).convert_tokens_to_ids(SUMMARY_BEGIN_TOKEN)
    eng = tree_engine
    eng.flush_cache()
    runs = generate(eng, prompts()[:2], 600)
    eng.flush_cache()  # the pasted prompts match nothing: their reasoning is segmented, not inherited
    pasted = [p + out["output_ids"] for p, out in zip(prompts()[:2], runs) if marker in out["output_ids"]]
    assert pasted, "the tiny model wrote no summary marker in 600 tokens"
    [first] = generate(eng, pasted[:1], 200)
    assert first["meta_info"]["cached_tokens"] == 0
    followup = pasted[0] + first["output_ids"] + MESSAGE
    [second] = generate(eng, [followup], 100)
    state = zoomr_state(eng)
    stats = state["finished"][first["meta_info"]["id"]]
    assert stats["prompt_len"] < len(pasted[0]) - 100  # the reasoning part is not prompt
    assert stats["offloaded_last"] > 0 and stats["resident_max"] < 0.8 * (len(pasted[0]) + 200)
    after = state["finished"][second["meta_info"]["id"]]
    assert second["meta_info"]["cached_tokens"] >= 0.9 * (len(followup) - len(MESSAGE))
    assert after["inherited_keys"] > 0 and after["prompt_len"] == stats["prompt_len"]
    assert_idle_counts(eng, state)


def test_abort_mid_turn_two_returns_every_count(tree_engine):
    """Turn 2 (inheriting cold thoughts) is aborted while it zooms; the pool, rows, host tier and
    index come back, and the tree keeps turn 1."""
    eng = tree_engine
    eng.flush_cache()
    prompt = [0, 5, 6, 7]
    turn1 = generate(eng, [prompt], 500)[0]
    start = zoomr_state(eng)
    second = prompt + turn1["output_ids"] + MESSAGE

    async def abort_while_zooming():
        turn2 = asyncio.ensure_future(eng.async_generate(
            input_ids=second, rid="turn-two", sampling_params={**GREEDY, "max_new_tokens": 2000}))
        deadline = time.time() + 60
        while time.time() < deadline:
            busy = (await eng.tokenizer_manager.get_internal_state())[0]["zoomr"]
            if "turn-two" in busy["running"] and busy["running"]["turn-two"]["steps"] > 50:
                break
            await asyncio.sleep(0.1)
        eng.tokenizer_manager.abort_request(rid="turn-two")
        return busy, await turn2

    busy, turn2 = eng.loop.run_until_complete(abort_while_zooming())
    assert busy["running"]["turn-two"]["inherited_keys"] > 0, busy
    assert turn2["meta_info"]["finish_reason"]["type"] == "abort" and len(turn2["output_ids"]) < 2000
    deadline = time.time() + 60
    while (end := zoomr_state(eng))["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert end["running"] == {} and end["index_entries_live"] == 0
    assert end["host_tier"]["used_tokens"] == end["radix"]["host_tokens"] >= start["radix"]["host_tokens"] > 0
    pools = end["pools"]
    assert pools["req_rows_available"] == start["pools"]["req_rows_available"] and pools["kv_protected"] == 0
    assert pools["kv_available"] + pools["kv_evictable"] == pools["kv_capacity"]
    eng.flush_cache()
    flushed = zoomr_state(eng)
    assert flushed["host_tier"]["used_tokens"] == 0 and flushed["pools"]["kv_available"] == pools["kv_capacity"]
