"""The planner's quiet steps (a steady request planned from its ticket) plan exactly what a full step
plans: two backends with SGLang's real CPU pools and the host tier, one with quiet steps off, decode
the same requests (thoughts with and without summaries, a budgeted request, a summary-only policy,
ids past the tokenizer) and agree on every step's plan and output, every request's counters and the
host tier's; and the quiet path is taken for most request steps."""

from __future__ import annotations

import random

import torch

from backend_harness import VOCAB, Harness, scripted_tokens
from zoomr_sglang.config import ZoomRConfig

CONFIG = ZoomRConfig(sink=2, window=12, max_thought_tokens=40, refresh_interval=24, num_thoughts=1, zoom_cache=0)
STEPS = 140
REQUESTS = [(5, None), (9, None), (7, {"zoomr_budget": 48}), (6, {"zoomr_policy": "sumr"}), (8, None)]


def scripts():
    rng = random.Random(11)
    out = [scripted_tokens(random.Random(seed), STEPS, summaries=seed % 2 == 0) for seed in range(len(REQUESTS))]
    for script in out:  # a few ids past the tokenizer (models pad their embedding)
        for i in rng.sample(range(STEPS), 4):
            script[i] = len(VOCAB) + 3
    return out


def run(quiet: bool):
    harness = Harness(CONFIG, seed=5, host_tier_tokens=4096, pool_rows=8)
    planner = harness.controller.planner
    planner.quiet_steps = quiet
    taken = []
    full_quiet_step = planner._quiet_step

    def counted(*args):
        tail_from = full_quiet_step(*args)
        taken.append(tail_from >= 0)
        return tail_from

    planner._quiet_step = counted
    start = (harness.allocator.available_size(), harness.controller.index_keys.num_live)
    for prompt_len, params in REQUESTS:
        harness.add_request(prompt_len, params)
    plans, outputs = [], []
    for step, tokens in enumerate(zip(*scripts())):
        _, layers = harness.decode_step(list(tokens))
        plan = harness.plan
        plans.append((plan.kv_indptr.tolist(), [w.tolist() for w in plan.working_sets],
                       sorted(map(tuple, plan.commits.tolist())), plan.votes.tolist(), plan.new_candidates.tolist()))
        outputs.append(torch.stack([out for *_, out in layers]))
    stats = {row: state.stats.as_dict() for row, state in harness.states.items()}
    tier = harness.controller.tiering
    counters = tier.counters.as_dict()
    harness.release_all()
    assert planner.records.by_row == {} and planner.records.rows_by_rid == {} and tier.rows == {}  # one pop each
    end = (harness.allocator.available_size(), harness.controller.index_keys.num_live, tier.host.num_used)
    return plans, torch.stack(outputs), stats, counters, start, end, taken


def test_quiet_steps_plan_what_full_steps_plan():
    full = run(quiet=False)
    quiet = run(quiet=True)
    assert full[5] == (*full[4], 0) and quiet[5] == (*quiet[4], 0)  # counts back where they started
    for step, (a, b) in enumerate(zip(full[0], quiet[0])):
        assert a == b, f"step {step}"
    torch.testing.assert_close(quiet[1], full[1], rtol=0, atol=0)
    assert quiet[2] == full[2] and quiet[3] == full[3]
    assert full[3]["evicted_tokens"] > 0  # the host tier moved thoughts in both
    assert full[6] == [] and sum(quiet[6]) > STEPS * len(REQUESTS) // 3  # most steps were quiet
