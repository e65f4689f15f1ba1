"""zoomr named for one phase only (SGLang's hybrid routing, ``sglang.Engine`` on the CPU).

Decode zoomr with another prefill backend works: zoomr's decode reads what the other prefill
wrote, and the zoomr radix cache hands such a server no prefix with cold thoughts (the other
backend's prefill cannot attend around them). Prefill zoomr with another decode backend is refused at start, naming the combination."""

from __future__ import annotations

import pytest

from engine_utils import (IDENTITY_TOKENS, assert_idle_counts, engine, generate, generate_whole_budget, prompts,
                          zoomr_env, zoomr_state)

pytestmark = pytest.mark.engine

SMALL_BUDGET = dict(sink=4, window=64, max_thought_tokens=48)
MESSAGE = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def decode_only(model_path):
    """One engine with zoomr for decode only (``torch_native`` prefill, the zoomr radix cache) for
    every test here; each test flushes the tree first, so none sees another's requests."""
    with zoomr_env(**SMALL_BUDGET), engine(model_path, "zoomr", prefill_attention_backend="torch_native",
                                           decode_attention_backend="zoomr", radix_cache_backend="zoomr") as eng:
        yield eng


def test_prefill_only_zoomr_is_refused_at_start(model_path):
    with pytest.raises(ValueError, match="--prefill-attention-backend zoomr with --decode-attention-backend "
                                         "torch_native: .* must be the decode backend"):
        with engine(model_path, "torch_native", prefill_attention_backend="zoomr",
                    decode_attention_backend="torch_native"):
            pass


def test_decode_only_zoomr_equals_dense_at_full_budget(decode_only, dense_outputs):
    decode_only.flush_cache()
    outputs = generate_whole_budget(decode_only, prompts(), IDENTITY_TOKENS)
    state = zoomr_state(decode_only)
    assert [out["output_ids"] for out in outputs] == dense_outputs
    assert all(state["finished"][out["meta_info"]["id"]]["steps"] == IDENTITY_TOKENS - 1 for out in outputs)


def test_decode_only_zoomr_second_turn_never_prefills_over_cold_thoughts(decode_only):
    """The first turn's cold thoughts went to the tree as host pieces; the second turn's match stops
    at the first of them (the other backend's prefill computes the rest), where a zoomr prefill
    would take the whole first turn from the tree."""
    eng = decode_only
    eng.flush_cache()
    first = prompts()[:2]
    start = zoomr_state(eng)
    turn1 = generate(eng, first, 500)
    second = [p + out["output_ids"] + MESSAGE for p, out in zip(first, turn1)]
    turn2 = generate(eng, second, 150)
    state = zoomr_state(eng)
    assert state["radix"]["host_tokens"] > 0  # cold thoughts are in the tree
    for prompt, out in zip(second, turn2):
        assert len(out["output_ids"]) == 150
        assert 0 < out["meta_info"]["cached_tokens"] < len(prompt) - len(MESSAGE) - 100
    assert_idle_counts(eng, state, start)
