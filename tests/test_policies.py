"""Each working-set policy on hand-built cases, then every policy through the CPU backend."""

import random

import numpy as np
import pytest
import torch

from backend_harness import Harness, scripted_tokens
from testbed.attention_baselines import H2OPolicy, QuestPolicy
from testbed.baselines import OraclePolicy, RandomPolicy, StreamingPolicy, SummaryOnlyPolicy, ZoomRPagesPolicy
from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, quest_upper_bound
from zoomr_sglang.algo.policies import FullPolicy, StepView, ZoomRPolicy
from zoomr_sglang.algo.policy_base import Policy, Ranking, Stage, current_thought, mask_to_ranges, range_positions, token_units
from zoomr_sglang.algo.policy_registry import POLICY_NAMES
from zoomr_sglang.algo.segmentation import Thought
from zoomr_sglang.algo.working_set import as_range_array, ranges_size, with_tail
from zoomr_sglang.config import ZoomRConfig, least_budget, load_config, request_settings


def pairs(ranges):
    """A working set (``[n, 2]`` array) as a list of ``(start, end)`` tuples."""
    return [tuple(r) for r in ranges.tolist()]


def thoughts_fixture():
    """Prompt [0, 10); thought 0 body [10, 26) summary [26, 30); thought 1 body [30, 46) summary
    [46, 50); thought 2 open from 50."""
    return [
        Thought(index=0, start=10, body_end=26, summary_start=26, summary_end=30, content_start=27, content_end=29,
                final=True),
        Thought(index=1, start=30, body_end=46, summary_start=46, summary_end=50, content_start=47, content_end=49,
                final=True),
        Thought(index=2, start=50, body_end=70),
    ]


def view(**overrides):
    base = dict(seq_len=70, prompt_len=10, sink=4, window=10, budget=0, thoughts=thoughts_fixture(),
                candidates=[0, 1], zoomed=[], open_from=50)
    base.update(overrides)
    return StepView(**base)


def fill(ranking, **overrides):
    """``Policy.fill`` of ``ranking`` on a bare view (``seq_len`` 30, sinks 4 unless overridden)."""
    filled = Policy(num_thoughts=1).fill(view(**{"seq_len": 30, "thoughts": [], **overrides}), ranking)
    return pairs(filled.ranges), filled.reached


def test_the_window_walks_back_over_kept_positions_for_free_within_its_cap_and_never_under_three():
    assert fill(Ranking(keep=[(10, 20)], window=100), budget=20)[0] == [(0, 4), (10, 20), (24, 30)]
    assert fill(Ranking(keep=[(10, 20)], window=100), budget=25)[0] == [(0, 4), (9, 30)]
    assert fill(Ranking(window=8), budget=100)[0] == [(0, 4), (22, 30)]  # the window's length caps it
    assert fill(Ranking(window=100), budget=5)[0] == [(0, 4), (27, 30)]  # never under 3 recent tokens
    # It grows last, into what the units leave, at most window_cap back; no budget: all it may.
    assert fill(Ranking(window=3, stages=(Stage(as_range_array([(8, 12)])),), window_cap=6), budget=20)[0] == [
        (0, 4), (8, 12), (24, 30)]
    assert fill(Ranking(window=3, window_cap=6), budget=0)[0] == [(0, 4), (24, 30)]


def test_units_are_taken_in_rank_order_whole_or_for_tokens_as_many_as_fit():
    # Kept 10 + the last 3 = 13 of 20: the first thought (10 new) does not fit, the next two do.
    thoughts = Stage(as_range_array([(20, 30), (40, 45), (50, 52)]))
    ranges, reached = fill(Ranking(keep=[(0, 10)], stages=(thoughts,)), seq_len=60, budget=20)
    assert ranges == [(0, 10), (40, 45), (50, 52), (57, 60)]
    assert [int(mask.sum()) for mask in reached] == [13, 20]
    # Tokens up to a stage's own limit (57 is kept already: free), then a token-level range gives what fits.
    tokens = Stage(token_units(np.array([57, 12, 30, 31, 40])), whole=False, limit=16)
    rest = Stage(as_range_array([(40, 50)]), whole=False)
    ranges, reached = fill(Ranking(keep=[(0, 10)], stages=(tokens, rest), window_cap=10), seq_len=60, budget=20)
    assert ranges == [(0, 10), (12, 13), (30, 32), (40, 44), (57, 60)]
    assert [int(mask.sum()) for mask in reached] == [13, 16, 20]
    assert mask_to_ranges(torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)) == [(0, 2), (3, 4), (6, 7)]


def test_full_and_streaming():
    assert pairs(FullPolicy(num_thoughts=2).working_set(view())) == [(0, 70)]
    streaming = StreamingPolicy(num_thoughts=2)
    assert pairs(streaming.working_set(view())) == [(0, 4), (60, 70)]
    assert pairs(streaming.working_set(view(budget=20))) == [(0, 4), (54, 70)]


def test_thought_policies_keep_prompt_and_summaries_and_fill_the_budget_in_order():
    # Unbounded zoomr: the paper's layout, the open thought attended whole.
    assert pairs(ZoomRPolicy(num_thoughts=2).working_set(view(zoomed=[0]))) == [(0, 30), (46, 70)]
    assert pairs(SummaryOnlyPolicy(num_thoughts=2).working_set(view())) == [(0, 10), (26, 30), (46, 70)]
    # Budget 40: skeleton (prompt + 2 summaries) 18, window 10 -> 28; thought 0 (20 tokens, 16 new)
    # does not fit; the window grows over summary 1 for free and fills the remaining 12.
    ws = pairs(ZoomRPolicy(num_thoughts=2).working_set(view(zoomed=[0], budget=40)))
    assert ws == [(0, 10), (26, 30), (44, 70)] and ranges_size(ws) == 40
    # Budget 50: thought 0 fits (28 + 16 = 44), then the window grows by 6.
    ws = pairs(ZoomRPolicy(num_thoughts=2).working_set(view(zoomed=[0], budget=50)))
    assert ws == [(0, 30), (46, 50), (54, 70)] and ranges_size(ws) == 50
    # Summary-only at the same budget spends it on the window instead.
    ws = pairs(SummaryOnlyPolicy(num_thoughts=2).working_set(view(budget=50)))
    assert ws == [(0, 10), (26, 30), (34, 70)] and ranges_size(ws) == 50
    # With the host tier's window cap the window never reaches further back than 10 tokens.
    ws = pairs(SummaryOnlyPolicy(num_thoughts=2).working_set(view(budget=50, window_cap=10)))
    assert ws == [(0, 10), (26, 30), (46, 50), (60, 70)]


def test_oracle_zooms_into_the_current_thoughts_dependencies_that_are_closed():
    oracle = OraclePolicy(num_thoughts=2, oracle=[[], [0], [1, 0, 5], [2]])
    assert current_thought(thoughts_fixture()) == 2
    assert oracle.choose_thoughts(view()) == [1, 0]
    assert OraclePolicy(num_thoughts=1, oracle=[[], [0], [1, 0]]).choose_thoughts(view()) == [1]
    closed = thoughts_fixture()[:2]
    assert current_thought(closed) == 2
    with pytest.raises(ValueError, match="zoomr_oracle"):
        OraclePolicy(num_thoughts=2)


def test_random_draws_closed_thoughts_reproducibly():
    draws = [RandomPolicy(num_thoughts=1, seed=5).choose_thoughts(view(candidates=list(range(2)))) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2] and draws[0][0] in (0, 1)
    many = {tuple(RandomPolicy(num_thoughts=1, seed=s).choose_thoughts(view())) for s in range(20)}
    assert many == {(0,), (1,)}


def test_h2o_keeps_heavy_hitters_and_never_brings_an_evicted_token_back():
    h2o = H2OPolicy(num_thoughts=2)
    v = view(seq_len=20, budget=10, sink=2, window=4, thoughts=[], candidates=[])
    assert pairs(h2o.working_set(v)) == [(0, 2), (12, 20)]  # nothing observed yet: the oldest go first
    # A query that attends only position 12 makes it a heavy hitter.
    keys = torch.zeros(20, 1, 4)
    keys[12, 0, 0] = 50.0
    query = torch.zeros(2, 4)
    query[:, 0] = 1.0
    h2o.observe(0, query, keys, torch.arange(20), 1.0)
    v = view(seq_len=22, budget=10, sink=2, window=4, thoughts=[], candidates=[])
    ws = pairs(h2o.working_set(v))
    assert ws == [(0, 2), (12, 13), (15, 22)]  # the two lowest-scored non-recent tokens went
    # Position 2 was evicted at the first step; a later high score cannot bring it back.
    keys2 = torch.zeros(22, 1, 4)
    keys2[2, 0, 0] = 50.0
    h2o.observe(0, query, keys2, torch.arange(22), 1.0)
    ws = pairs(h2o.working_set(view(seq_len=23, budget=10, sink=2, window=4, thoughts=[], candidates=[])))
    assert not any(a <= 2 < b for a, b in ws) and any(a <= 12 < b for a, b in ws)


def test_quest_upper_bound_bounds_every_key_in_the_page():
    torch.manual_seed(0)
    keys = torch.randn(3, QUEST_PAGE_SIZE, 2, 8)
    query = torch.randn(4, 8)
    bound = quest_upper_bound(query, keys.amin(dim=1), keys.amax(dim=1))  # [4, 3]
    group = query.reshape(2, 2, 8)
    actual = torch.einsum("kgd,pskd->kgps", group, keys).amax(dim=-1).reshape(4, 3)
    assert torch.all(bound >= actual - 1e-5)


def test_quest_attends_the_page_whose_keys_match_the_query_at_the_next_step():
    quest = QuestPolicy(num_thoughts=2)
    v = view(seq_len=96, budget=48, sink=4, window=8, thoughts=[], candidates=[])
    pairs(quest.working_set(v))
    keys = torch.zeros(96, 1, 4)
    keys[40:48, 0, 0] = 9.0  # page 2 holds the matching keys
    query = torch.zeros(2, 4)
    query[:, 0] = 1.0
    positions = [(a, b) for a, b in quest.observe_positions(v, [])]
    assert positions == [(0, 96)]
    quest.observe(0, query, keys[0:96], torch.arange(96), 1.0)
    ws = pairs(quest.working_set(view(seq_len=97, budget=48, sink=4, window=8, thoughts=[], candidates=[])))
    assert any(a <= 32 and 48 <= b for a, b in ws) and ranges_size(ws) <= 48


def _long_thought_view(seq_len, **overrides):
    """Prompt [0, 16); thought 0 body [16, 80) (pages 1-4) summary [80, 84), voted; open from 84."""
    thoughts = [Thought(index=0, start=16, body_end=80, summary_start=80, summary_end=84, content_start=81,
                        content_end=83, final=True), Thought(index=1, start=84, body_end=seq_len)]
    base = dict(seq_len=seq_len, prompt_len=16, sink=4, window=8, budget=60, thoughts=thoughts, candidates=[0],
                zoomed=[0], open_from=84)
    return view(**{**base, **overrides})


def test_zoomr_pages_attends_the_best_pages_of_a_voted_thought_too_long_for_the_budget():
    policy = ZoomRPagesPolicy(num_thoughts=1)
    first = _long_thought_view(96)
    # The 64-token thought does not fit whole (prompt + summary + window = 28 of 60): none of it yet.
    assert pairs(policy.working_set(first)) == pairs(ZoomRPolicy(num_thoughts=1).working_set(first))
    assert policy.scorer.candidate_pages.tolist() == [1, 2, 3, 4] and policy.scorer.pages_wanted == 2
    assert policy.observe_positions(first, first) == [(0, 96)]
    keys = torch.zeros(96, 1, 4)
    keys[32:48, 0, 0] = 9.0  # page 2 matches the query
    keys[0:16, 0, 0] = 20.0  # the prompt matches more, but is not a candidate
    query = torch.zeros(2, 4)
    query[:, 0] = 1.0
    policy.observe(0, query, keys, torch.arange(96), 1.0)
    ws = pairs(policy.working_set(_long_thought_view(97)))
    assert any(a <= 32 and 48 <= b for a, b in ws) and ranges_size(ws) <= 60
    assert not any(a <= 32 and 48 <= b for a, b in pairs(ZoomRPolicy(num_thoughts=1).working_set(_long_thought_view(97))))


def test_zoomr_pages_is_zoomr_without_a_budget_and_everything_with_a_budget_covering_it():
    for budget, expected in ((0, pairs(ZoomRPolicy(num_thoughts=1).working_set(_long_thought_view(96, budget=0)))),
                             (96, [(0, 96)])):
        policy = ZoomRPagesPolicy(num_thoughts=1)
        assert pairs(policy.working_set(_long_thought_view(96, budget=budget))) == expected


def test_request_settings_validate_and_name_the_bad_value():
    config = ZoomRConfig()
    assert request_settings(config, None).policy == "zoomr"
    s = request_settings(config, {"zoomr_policy": "h2o", "zoomr_budget": 64, "zoomr_fidelity": True, "other": 1})
    assert (s.policy, s.budget, s.fidelity) == ("h2o", 64, True)
    for params, message in [
        ({"zoomr_policy": "lru"}, "zoomr_policy='lru'"),
        ({"zoomr_budget": -1}, "zoomr_budget=-1"),
        ({"zoomr_budget": 10}, "zoomr_budget=10 is too small"),
        ({"zoomr_budgte": 10}, "unknown custom_params key 'zoomr_budgte'"),
        ({"zoomr_policy": "oracle"}, "zoomr_oracle is missing"),
        ({"zoomr_policy": "zoomr", "zoomr_oracle": [[0]]}, "zoomr_oracle is given"),
        ({"zoomr_policy": "oracle", "zoomr_oracle": [[-1]]}, "zoomr_oracle is not allowed"),
        ({"zoomr_fidelity": "yes"}, "zoomr_fidelity='yes'"),
        ({"zoomr_vote": "max"}, "zoomr_vote='max'"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            request_settings(config, params)
    with pytest.raises(ValueError, match="ZOOMR_CONFIG key 'policy' = 'sparse'"):
        load_config({"ZOOMR_CONFIG": '{"policy": "sparse"}'})
    with pytest.raises(ValueError, match="ZOOMR_CONFIG key 'policy' = 'oracle'"):
        load_config({"ZOOMR_CONFIG": '{"policy": "oracle"}'})
    assert load_config({"ZOOMR_CONFIG": '{"policy": "quest"}', "ZOOMR_BUDGET": "256"}).budget == 256
    assert request_settings(load_config({"ZOOMR_CONFIG": '{"vote": "count"}'}), None).vote == "count"
    assert request_settings(config, {"zoomr_vote": "count"}).vote == "count" and config.vote == "mass"
    with pytest.raises(ValueError, match="ZOOMR_CONFIG key 'vote' = 'top'"):
        load_config({"ZOOMR_CONFIG": '{"vote": "top"}'})


def _params(policy, budget, fidelity=False):
    params = {"zoomr_policy": policy, "zoomr_budget": budget, "zoomr_fidelity": fidelity}
    if policy == "oracle":
        params["zoomr_oracle"] = [[i - 1, i - 3] if i >= 3 else [] for i in range(200)]
    return params


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_through_the_backend_stays_within_budget_and_matches_the_reference(policy):
    """Four requests of one policy, 160 steps: each step's output equals the masked dense reference
    over the policy's working set, the working set holds the budget once the prompt and summaries
    fit, fidelity counters are sane, and every KV slot comes back."""
    budget = 48
    config = ZoomRConfig(sink=4, window=12, max_thought_tokens=16, self_check_interval=1)
    harness = Harness(config, seed=3)
    free_at_start = harness.allocator.available_size()
    for prompt_len in (6, 8, 10, 12):
        harness.add_request(prompt_len, _params(policy, budget if policy != "full" else 0, fidelity=True))
    scripts = [scripted_tokens(random.Random(seed), 160, summaries=True) for seed in range(4)]
    for step in range(160):
        harness.decode_step([script[step] for script in scripts])
        plan = harness.plan
        for state, ranges in zip(plan.states, plan.working_sets):
            # Thought policies keep the prompt, every summary and the open thought's head even past the budget.
            skeleton = state.prompt_len + state.summary_tokens + config.thought_sink + 3 if state.policy.thought_level else 0
            assert policy == "full" or ranges_size(ranges) <= max(budget, skeleton)
    for state in harness.states.values():
        stats = state.stats
        assert stats.policy == policy and stats.self_check_max_error < 1e-5
        fidelity = stats.as_dict()["fidelity"]
        assert fidelity["steps"] == 160 and len(fidelity["mass"]) == harness.num_layers
        if policy == "full":
            assert all(abs(m - 1) < 1e-9 for m in fidelity["mass"]) and max(fidelity["rel_error"]) < 1e-5
        else:
            assert all(0 < m < 1 for m in fidelity["mass"]) and min(fidelity["rel_error"]) > 0
            assert stats.attended_total < stats.dense_total
        if policy in ("sumr", "zoomr", "oracle", "random"):
            assert stats.over_bound_steps < stats.steps  # only while summaries outgrow the budget
        if policy in ("oracle", "random", "zoomr"):
            assert stats.selection_changes > 0
    harness.release_all()
    assert harness.allocator.available_size() == free_at_start
    assert harness.controller.index_keys.num_live == 0


@pytest.mark.parametrize("policy", ["streaming", "h2o", "quest", "sumr", "zoomr"])
def test_host_tier_moves_only_whole_thoughts_the_policy_will_not_attend(policy):
    """With the host tier on, token-level policies keep all KV on the device, and thought policies
    never attend a hole even when the budget grows their window."""
    config = ZoomRConfig(sink=4, window=12, max_thought_tokens=16, self_check_interval=0)
    harness = Harness(config, seed=5, host_tier_tokens=4096)
    free_at_start = harness.allocator.available_size()
    harness.add_request(8, _params(policy, 96))
    script = scripted_tokens(random.Random(11), 300, summaries=True)
    tiering = harness.controller.tiering
    for token in script:
        harness.decode_step([token])
        holes = tiering.holes(harness.rows[0])
        for start, end in harness.plan.working_sets[0].tolist():
            assert all(e <= start or s >= end for s, e in holes)
    evicted = tiering.counters.evicted_tokens
    assert (evicted > 0) == (policy in ("sumr", "zoomr"))
    harness.release_all()
    assert harness.allocator.available_size() == free_at_start


def test_a_share_budget_bounds_every_step_by_the_sequence_with_the_host_tier_on():
    """``zoomr_budget=0.25`` without summaries: each step attends at most a quarter of the sequence
    (or the skeleton: sinks, prompt, the open thought's head, the shortest window), never a hole,
    the tier moves cold thoughts, every step is self-checked against dense, and every slot returns."""
    config = ZoomRConfig(sink=4, window=12, max_thought_tokens=16, self_check_interval=1)
    harness = Harness(config, seed=7, host_tier_tokens=4096)
    free_at_start = harness.allocator.available_size()
    harness.add_request(8, {"zoomr_policy": "zoomr", "zoomr_budget": 0.25})
    tiering, over_quarter = harness.controller.tiering, 0
    for step, token in enumerate(scripted_tokens(random.Random(4), 400, summaries=False)):
        harness.decode_step([token])
        seq_len = 8 + step + 1
        state, ranges = harness.plan.states[0], harness.plan.working_sets[0]
        skeleton = config.sink + state.prompt_len + config.thought_sink + 3
        bound = max(-(-seq_len // 4), least_budget(config))  # a share, never under sinks + shortest window
        assert ranges_size(ranges) <= max(bound, skeleton), step
        over_quarter += ranges_size(ranges) > bound
        # never a hole: every attended position has device KV (positions brought back for the fine
        # levels included)
        slots = harness.req_to_token_pool.req_to_token[harness.rows[0]]
        assert bool((slots[torch.from_numpy(range_positions(ranges))] != 0).all()), step
    stats = state.stats  # steps over the budget: the early ones, where the skeleton is more than a quarter
    assert 0 < stats.over_bound_steps == over_quarter < 100 and stats.bound_last == -(-seq_len // 4)
    assert stats.self_check_max_error < 1e-5
    assert tiering.counters.evicted_tokens > 0 and tiering.counters.zoomed_in_tokens > 0
    assert stats.attended_total < stats.dense_total / 3
    harness.release_all()
    assert harness.allocator.available_size() == free_at_start
    assert harness.controller.index_keys.num_live == 0


def test_cached_unbounded_working_set_equals_the_from_scratch_union():
    """Thought policies cache their skeleton and selection; step after step, as thoughts close
    (with and without summaries) and selections change, the result equals the union computed from
    scratch (sinks, prompt, summaries, zoomed thoughts, open region, window)."""
    from paper_working_set import working_set_ranges

    rng = random.Random(0)
    for trial in range(20):
        prompt_len, sink, window = rng.randint(0, 12), rng.choice([0, 4, 20]), rng.choice([3, 8, 40])
        policy = ZoomRPolicy(num_thoughts=2)
        thoughts, position, last_zoomed = [], prompt_len, None
        for step in range(60):
            closes = rng.random() < 0.3
            if closes:  # a thought closes, maybe with a summary
                body = rng.randint(1, 9)
                summary = rng.choice([0, 0, 2, 3])
                thoughts.append(Thought(index=len(thoughts), start=position, body_end=position + body,
                                        summary_start=position + body if summary else None,
                                        summary_end=position + body + summary if summary else None,
                                        content_start=position + body if summary else None,
                                        content_end=position + body + summary if summary else None, final=True))
                position += body + summary
            position += 1
            closed = [t.index for t in thoughts]
            zoomed = rng.sample(closed, min(2, len(closed))) if closed and rng.random() < 0.4 else closed[:1]
            v = view(seq_len=position, prompt_len=prompt_len, sink=sink, window=window, thoughts=thoughts,
                     candidates=closed, zoomed=zoomed, open_from=thoughts[-1].span_end() if thoughts else prompt_len)
            expected = working_set_ranges(
                seq_len=position, prompt_len=prompt_len, n_sink=sink, n_window=window, open_from=v.open_from,
                summary_spans=[(t.summary_start, t.summary_end) for t in thoughts if t.summary_start is not None],
                zoomed_spans=[(thoughts[i].start, thoughts[i].span_end()) for i in zoomed])
            if not closes and zoomed == last_zoomed:  # only the sequence grew: no view needed
                assert pairs(with_tail(*policy.working_set_next(position), position)) == expected, (trial, step)
            assert pairs(policy.working_set(v)) == expected, (trial, step)
            last_zoomed = zoomed
        assert policy.working_set_next(position + 1) is not None
        policy.working_set(view(budget=40))
        assert policy.working_set_next(71) is None  # a bounded step needs its view


def test_fidelity_is_measured_at_every_step_without_self_checks():
    """``zoomr_fidelity`` alone (self-checks off) makes the step eager and records fidelity at every
    step and layer, for that request only."""
    harness = Harness(ZoomRConfig(sink=4, window=12, max_thought_tokens=16), seed=5)
    harness.add_request(8, _params("zoomr", 48, fidelity=True))
    harness.add_request(10, _params("zoomr", 48))
    scripts = [scripted_tokens(random.Random(seed), 60, summaries=True) for seed in range(2)]
    for step in range(60):
        harness.decode_step([script[step] for script in scripts])
        assert harness.plan.needs_eager and harness.plan.fidelity_rows == [0]
    measured, plain = (harness.states[row].stats.as_dict() for row in harness.rows)
    assert measured["fidelity"]["steps"] == 60 and len(measured["fidelity"]["mass"]) == harness.num_layers
    assert "fidelity" not in plain and measured["self_checks"] == 0
    # Per step (mean over layers): one value per step, averaging to the per-layer means' mean.
    step_mass = measured["fidelity"]["step_mass"]
    assert len(step_mass) == 60 and all(0 < m <= 1 for m in step_mass) and len(set(step_mass)) > 1
    overall = sum(measured["fidelity"]["mass"]) / harness.num_layers
    assert abs(sum(step_mass) / 60 - overall) < 1e-9
    # The least any (layer, head) kept is at most the mean, and lower at some step.
    least = measured["fidelity"]["step_min_head_mass"]
    assert len(least) == 60 and all(0 <= low <= m + 1e-12 for low, m in zip(least, step_mass))
    assert any(low < m - 1e-6 for low, m in zip(least, step_mass))


@pytest.mark.parametrize("policy_class", [ZoomRPolicy, SummaryOnlyPolicy])
def test_under_a_budget_the_open_thought_keeps_its_first_tokens(policy_class):
    """Thought 2 is open from 50 and 70 tokens long; prompt, summaries and a 10-token window leave
    no room for its start, which thought_sink keeps (and nothing without a budget changes)."""
    thoughts = thoughts_fixture()
    thoughts[2].body_end = 120
    policy = policy_class(num_thoughts=2)
    bounded = dict(seq_len=120, budget=40, thoughts=thoughts, zoomed=[])
    with_head = pairs(policy.working_set(view(**bounded, thought_sink=6)))
    assert with_head[:3] == [(0, 10), (26, 30), (46, 56)] and sum(b - a for a, b in with_head) <= 40
    without = pairs(policy_class(num_thoughts=2).working_set(view(**bounded)))
    assert not any(a <= 50 < b for a, b in without)
    unbounded = dict(seq_len=120, thoughts=thoughts, zoomed=[])
    assert pairs(policy_class(num_thoughts=2).working_set(view(**unbounded, thought_sink=6))) == pairs(
        policy_class(num_thoughts=2).working_set(view(**unbounded)))
