"""Outputs no reasoning model should write, forced through the engine (``testbed.forcing``): zoomr
serves them, keeps its bound, and every count comes back."""

from __future__ import annotations

import random

import pytest

from engine_utils import GREEDY, assert_idle_counts, engine, prompts, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

BUDGET = dict(sink=4, window=32, max_thought_tokens=48, vote="count")
N = 400
POOL = 3000  # KV pool tokens: smaller than the model's context (8192)


def _specials(model_path):
    from transformers import AutoTokenizer

    from testbed.tiny_model import SUMMARY_BEGIN_TOKEN, SUMMARY_END_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    begin, end = tokenizer.convert_tokens_to_ids([SUMMARY_BEGIN_TOKEN, SUMMARY_END_TOKEN])
    [blank] = tokenizer.encode("\n\n", add_special_tokens=False)
    words = [t for t in range(3, 500) if t not in (begin, end, blank) and "\n" not in tokenizer.decode([t])]
    return begin, end, blank, words


def _outputs(model_path):
    """Forced outputs, by name: what each adversarial writer emits."""
    begin, end, blank, words = _specials(model_path)
    rng = random.Random(3)

    def text(n):
        return [rng.choice(words) for _ in range(n)]

    unbalanced = []
    while len(unbalanced) < N:
        unbalanced += rng.choice([[begin], [end], [blank], [begin, begin], [end, blank]]) + text(rng.randint(1, 30))
    return {
        "never_a_boundary": text(N),
        "boundary_every_token": [blank] * N,
        "unbalanced_markers": unbalanced[:N],
        "summary_never_closed": text(60) + [blank, begin] + text(N - 62),
        "marker_per_token": [rng.choice([begin, end]) for _ in range(N)],
    }


def test_adversarial_outputs_are_served_within_bounds_and_leave_nothing(model_path):
    from testbed.forcing import ForceTokens

    forced = _outputs(model_path)
    begin, end, blank, words = _specials(model_path)
    pasted_prompt = [0] + words[:20] + [blank] + words[20:40] + [begin] + words[40:45] + [end, blank] + words[45:80]
    with zoomr_env(**BUDGET), engine(model_path, "zoomr", radix_cache_backend="zoomr", max_total_tokens=POOL,
                                     enable_custom_logit_processor=True) as eng:
        start = zoomr_state(eng)
        names = list(forced)
        batch = [prompts()[i % 4] for i in range(len(names))]
        results = eng.generate(
            input_ids=batch, custom_logit_processor=[ForceTokens.to_str()] * len(names),
            sampling_params=[{**GREEDY, "max_new_tokens": N, "custom_params": {"force_ids": forced[n]}} for n in names])
        for name, out in zip(names, results):
            assert out["output_ids"] == forced[name], name
        # One batch mixing per-request overrides, a prompt that already holds markers, and a budget
        # larger than the whole sequence (that one attends everything: dense's answer).
        overrides = [{"zoomr_policy": "full"}, {"zoomr_policy": "sumr", "zoomr_budget": 128},
                     {"zoomr_policy": "streaming", "zoomr_budget": 64}, {"zoomr_vote": "mass"},
                     {"zoomr_policy": "zoomr", "zoomr_budget": 10_000}, {}]
        mixed_prompts = [prompts()[0]] * 5 + [pasted_prompt]
        mixed = eng.generate(input_ids=mixed_prompts,
                             sampling_params=[{**GREEDY, "max_new_tokens": 300, "custom_params": c} for c in overrides])
        assert all(len(out["output_ids"]) == 300 for out in mixed)
        assert mixed[4]["output_ids"] == mixed[0]["output_ids"]  # budget > sequence == full
        state = zoomr_state(eng)
        for name, out in zip(names, results):
            stats = state["finished"][out["meta_info"]["id"]]
            assert stats["steps"] == N - 1 and stats["over_bound_steps"] == 0, (name, stats)
        by_name = {n: state["finished"][o["meta_info"]["id"]] for n, o in zip(names, results)}
        assert by_name["never_a_boundary"]["thoughts_closed"] >= N // 48 - 1  # closed by the 48-token cap
        assert by_name["boundary_every_token"]["attended_max"] < 200
        pasted = state["finished"][mixed[5]["meta_info"]["id"]]
        assert pasted["prompt_len"] < len(pasted_prompt)  # the pasted reasoning became thoughts
        # Longer than the whole KV pool: SGLang caps a request at the pool's size (its max_req_len),
        # and zoomr, whose working set fits, serves it to that cap.
        longer = eng.generate(input_ids=prompts()[1], sampling_params={**GREEDY, "max_new_tokens": POOL + 1000})
        assert POOL - 16 <= len(longer["output_ids"]) < POOL
        assert longer["meta_info"]["finish_reason"]["type"] == "length"
        # Longer than the model's context: refused at once, with SGLang's message.
        with pytest.raises(ValueError, match="maximum context length"):
            eng.generate(input_ids=prompts()[1], sampling_params={**GREEDY, "max_new_tokens": 1_000_000})
        assert_idle_counts(eng, start=start)
