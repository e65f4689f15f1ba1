"""A request SGLang retracts keeps its saving (``sglang.Engine``, CPU, retraction forced with
SGLang's own ``SGLANG_TEST_RETRACT``): through the zoomr radix cache it is kept whole and its
re-prefill inherits its thoughts and cold KV; through the stock tree its earlier output is prefilled
again and segmented as it first was, so the host tier moves it out again. Every count comes back.
(That a retracted request's tokens equal dense attention's at a budget covering everything is
checked by the soak, ``test_soak.py``.)"""

from __future__ import annotations

import pytest

from engine_utils import assert_idle_counts, engine, generate, prompts, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

SMALL = dict(sink=4, window=32, max_thought_tokens=32, zoom_cache=0)
RETRACT = dict(SGLANG_TEST_RETRACT=1, SGLANG_TEST_RETRACT_INTERVAL=300)
OUTPUT = 700


@pytest.mark.parametrize("tree", ["zoomr", "stock"])
def test_a_retracted_request_keeps_its_thoughts_and_its_saving(model_path, tree):
    tree_args = {"radix_cache_backend": "zoomr"} if tree == "zoomr" else {}
    first = prompts()[:3]
    with zoomr_env(RETRACT, **SMALL), engine(model_path, "zoomr", **tree_args) as eng:
        outputs = generate(eng, first, OUTPUT)
        state = zoomr_state(eng)
        assert all(len(o["output_ids"]) == OUTPUT for o in outputs)
        # A retracted request's counters restart with its re-prefill: fewer steps than its output.
        retracted = [(p, state["finished"][o["meta_info"]["id"]]) for p, o in zip(first, outputs)]
        retracted = [(p, s) for p, s in retracted if s["steps"] < OUTPUT - 1]
        assert retracted, "SGLANG_TEST_RETRACT retracted nothing"
        for prompt, stats in retracted:
            sequence = len(prompt) + OUTPUT - 1
            assert stats["prompt_len"] == len(prompt)  # its reasoning still starts after its prompt
            if tree == "zoomr":  # inherited whole: its cold thoughts are never prefilled again
                assert stats["inherited_thoughts"] > 0 and stats["resident_max"] < 0.5 * sequence
            else:  # prefilled whole, segmented again, moved out again
                assert stats["thoughts_closed"] > 0 and stats["resident_last"] < 0.5 * sequence
        assert state["host_tier"]["zoom_in_failures"] == 0
        if tree == "zoomr":
            assert state["radix"]["retracted_kept"] >= len(retracted)
            assert_idle_counts(eng, state)
        else:
            pools = state["pools"]
            assert state["running"] == {} and state["index_entries_live"] == 0
            assert state["host_tier"]["used_tokens"] == 0
            assert pools["kv_protected"] == 0 and pools["kv_available"] + pools["kv_evictable"] == pools["kv_capacity"]
