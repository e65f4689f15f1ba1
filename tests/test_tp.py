"""Tensor parallelism: every rank selects what one rank holding every head selects, and every rank's
host tier moves the same thoughts at the same step.

CPU units: votes summed over head shards rank thoughts as all heads do; the sum reaches the top-c
once per step; copies that finish at different times on two ranks complete at the same step.
End to end (SGLang's CPU engine at ``--tp 2``, two scheduler processes over gloo; see
``testbed/process_env.py``): zoomr under a small budget gives TP=1's tokens with the host tier off
and on and with the zoomr radix cache over two turns, a short soak with aborts and mixed budgets
fails nothing, and every rank's pool, host tier, index and tree counts come back and agree.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from backend_harness import Harness, scripted_tokens
from engine_utils import GREEDY, engine, generate, prompts, zoomr_env, zoomr_state
from test_host_tier import _run, _SlowEvent
from zoomr_sglang.algo.batched_votes import COUNT, MASS, MEAN_MASS, SummaryKeys, accumulate_votes, select_top
from zoomr_sglang.attention_backend.host_tier import HostKVTier, Transfer
from zoomr_sglang.config import ZoomRConfig

BUDGET = dict(sink=4, window=64, max_thought_tokens=48, vote="count")
ENGINE = dict(radix_cache_backend="zoomr")
TURN1, TURN2 = 300, 120
MESSAGE = [5, 6, 7, 8, 9, 10]  # turn 2's new message
VOTES = [{}, {"zoomr_vote": "mass"}, {"zoomr_vote": "mean_mass"}]  # per prompt of the first turn


# -- CPU units ---------------------------------------------------------------------------------------
def _shard_votes(kind: int, heads: slice, kv_heads: slice, inputs: dict) -> tuple:
    """One rank's votes and weights over two layers, reading only its query and KV heads."""
    votes, weights = torch.zeros(3, 12), torch.zeros(3, 12)
    summary = SummaryKeys(inputs["spans"], inputs["req_to_token"], inputs["keys"][:, kv_heads], 6)
    for query, sums in zip(inputs["queries"], inputs["sums"]):
        accumulate_votes(query[:, heads], inputs["lse"][:, heads], sums[:, kv_heads], inputs["counts"],
                         inputs["candidates"], torch.arange(3), torch.arange(3), torch.tensor([12, 9, 5]),
                         torch.full((3,), kind), votes, weights, scaling=0.25, topk=2, summary=summary)
    return votes, weights


@pytest.mark.parametrize("kind", [COUNT, MASS, MEAN_MASS], ids=["count", "mass", "mean_mass"])
def test_votes_summed_over_head_shards_rank_thoughts_as_all_heads_do(kind):
    """8 query heads over 4 KV heads (GQA) split over two ranks as SGLang shards them: the sum of
    the ranks' votes and weights is all heads' vote, and one rank alone would choose otherwise."""
    gen = torch.Generator().manual_seed(7)
    inputs = dict(queries=[torch.randn(3, 8, 16, generator=gen) for _ in range(2)],
                  sums=[torch.randn(40, 4, 16, generator=gen) for _ in range(2)],
                  counts=torch.randint(1, 4, (40,), generator=gen).float(), lse=torch.randn(3, 8, generator=gen),
                  candidates=torch.randperm(40, generator=gen)[:36].view(3, 12),
                  spans=torch.stack([torch.randint(0, 50, (3, 12), generator=gen),
                                     torch.randint(0, 8, (3, 12), generator=gen)], dim=2),
                  req_to_token=torch.randperm(200, generator=gen)[:180].view(3, 60),
                  keys=torch.randn(200, 4, 16, generator=gen))
    whole = _shard_votes(kind, slice(None), slice(None), inputs)
    ranks = [_shard_votes(kind, slice(4 * r, 4 * r + 4), slice(2 * r, 2 * r + 2), inputs) for r in range(2)]
    summed = [a + b for a, b in zip(*ranks)]
    torch.testing.assert_close(summed[0], whole[0])
    torch.testing.assert_close(summed[1], whole[1], rtol=1e-5, atol=1e-5)
    num_candidates = torch.tensor([12, 9, 5])
    chosen = select_top(*whole, num_candidates, 3)[0]
    assert torch.equal(select_top(*summed, num_candidates, 3)[0], chosen)
    assert any(not torch.equal(select_top(*rank, num_candidates, 3)[0], chosen) for rank in ranks)


class _OtherRank:
    """A stand-in attention TP group of two ranks: the other rank's part favours candidate 0."""

    def __init__(self) -> None:
        self.calls = 0

    def all_reduce(self, parts: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        other = torch.zeros_like(parts)
        other[:, :, 0] = 1000.0  # votes and weights of every voter's oldest candidate
        return parts + other


def test_the_reduced_vote_reaches_the_top_c_once_per_voting_step():
    config = ZoomRConfig(topk=2, num_thoughts=2, sink=4, window=8, max_thought_tokens=24, refresh_interval=8,
                         max_candidates=24)
    harness = Harness(config, seed=1)
    harness.add_request(5)
    harness.add_request(17, {"zoomr_vote": "mass"})
    selection = harness.controller.selection
    selection.vote_group = group = _OtherRank()
    scripts = [scripted_tokens(random.Random(seed), 60, summaries=True) for seed in range(2)]
    voting_steps = 0
    for step in range(60):
        harness.decode_step([script[step] for script in scripts])
        if selection.active_voters:
            voting_steps += 1
            assert (selection.chosen[: selection.active_voters, 0] == 0).all()
    assert voting_steps >= 4 and group.calls == voting_steps


class _TwoRanks:
    """A stand-in attention TP group whose other rank's signals are known: all_reduce adds them."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_reduce(self, parts: torch.Tensor) -> torch.Tensor:
        return parts + self.other


def test_fine_levels_summed_over_head_shards_rank_as_all_heads_do():
    """A model without summaries under a budget: zoomr's fine levels observe a step on the device,
    the token weights and the page votes (from page bounds in KV slots) in one pass a layer. Each
    rank observes its own query and KV heads; after the one all-reduce of weights and votes after
    the last layer (``FineObservers``), each rank ranks tokens and chooses pages exactly as one rank
    holding every head does, and one rank alone would not."""
    from types import SimpleNamespace

    import numpy as np

    from zoomr_sglang.algo.fine_zoom import pages_wanted
    from zoomr_sglang.algo.policies import StepView, ZoomRPolicy
    from zoomr_sglang.algo.policy_base import range_positions
    from zoomr_sglang.algo.segmentation import Thought
    from zoomr_sglang.algo.torch_attention import gather_decode_attention
    from zoomr_sglang.attention_backend.fine_observers import FineObservers
    from zoomr_sglang.attention_backend.host_plan import FineLane

    gen = torch.Generator().manual_seed(3)
    seq_len, layers, pages = 160, 2, 10
    queries = [torch.randn(8, 16, generator=gen) * 3 for _ in range(layers)]
    keys = [torch.randn(seq_len, 4, 16, generator=gen) for _ in range(layers)]
    # Each page's min and max keys in slots past the positions' (min in K, max in V): slot seq_len + p.
    paged = [k.view(pages, 16, 4, 16) for k in keys]
    k_buffers = [torch.cat([k, p.amin(dim=1)]) for k, p in zip(keys, paged)]
    v_buffers = [torch.cat([k, p.amax(dim=1)]) for k, p in zip(keys, paged)]
    row_pages = (seq_len + torch.arange(pages, dtype=torch.int32))[None]

    def view(n: int) -> StepView:  # a thought closed without a summary: zoomr fills the budget with the fine levels
        return StepView(seq_len=n, prompt_len=4, sink=4, window=11, budget=64, candidates=[0], zoomed=[0],
                        thoughts=[Thought(index=0, start=4, body_end=100, final=True)], open_from=100, zoom_pages=True)

    def observe(ranges, heads: slice, kv_heads: slice, group):
        """What the device hands back for one lane attending ``ranges`` (its slots: its positions)."""
        kv_indices = torch.from_numpy(range_positions(ranges)).to(torch.int32)
        kv_indptr = torch.tensor([0, len(kv_indices)], dtype=torch.int32)
        kv_pool = SimpleNamespace(get_key_buffer=lambda layer: k_buffers[layer][:, kv_heads].contiguous(),
                                  get_value_buffer=lambda layer: v_buffers[layer][:, kv_heads].contiguous())
        observers = FineObservers(num_layers=layers, num_heads=len(range(8)[heads]), head_dim=16, max_lanes=1,
                                  kv_pool=kv_pool, page_slots=SimpleNamespace(row_pages=row_pages), device="cpu",
                                  vote_group=group)
        lane = FineLane(0, SimpleNamespace(row=0), ranges, pages, pages_wanted(64))
        observers.load(SimpleNamespace(fine_lanes=[lane], kv_indptr=kv_indptr))
        for layer in range(layers):
            query, key_buffer = queries[layer][heads][None], keys[layer][:, kv_heads]
            _, lse = gather_decode_attention(query, key_buffer, key_buffer, kv_indptr, kv_indices, 0.25)
            observers.after_attention(layer, query, lse, 0.25)
        observers.finish(kv_indices)
        observers.load(SimpleNamespace(fine_lanes=[]))  # the next step's load queues the copy
        ((_, _, weights, chosen),) = observers.take()
        return weights, chosen

    class Recorder:  # a group of one rank that keeps what it was asked to add up
        def all_reduce(self, parts):
            self.parts = parts.clone()
            return parts

    attended = ZoomRPolicy(num_thoughts=1).working_set(view(seq_len))  # every rank's policy attends it
    shards = [(slice(4 * r, 4 * r + 4), slice(2 * r, 2 * r + 2)) for r in range(2)]
    own = []
    for shard in shards:
        recorder = Recorder()
        observe(attended, *shard, recorder)
        own.append(recorder.parts)
    policies = {}
    for name, observation in (("whole", observe(attended, slice(0, 8), slice(0, 4), None)),
                              ("alone", observe(attended, *shards[0], None)),
                              ("rank0", observe(attended, *shards[0], _TwoRanks(own[1]))),
                              ("rank1", observe(attended, *shards[1], _TwoRanks(own[0])))):
        policy = policies[name] = ZoomRPolicy(num_thoughts=1)
        policy.working_set(view(seq_len))
        policy.take_observation(attended, *observation)
    expected = policies["whole"].working_set(view(seq_len + 1))
    for name in ("rank0", "rank1"):
        assert np.array_equal(policies[name].working_set(view(seq_len + 1)), expected)
        assert np.array_equal(policies[name].fine._pages, policies["whole"].fine._pages)
    assert len(policies["whole"].fine._pages) == 1
    top = lambda policy: policy.fine._ranked[:20].tolist()  # noqa: E731
    assert top(policies["rank0"]) == top(policies["whole"]) != top(policies["alone"])  # one rank's heads alone


@pytest.mark.parametrize("agreed_polls", [2, 0], ids=["agreed", "each-rank-alone"])
def test_copies_finishing_at_different_times_complete_at_the_same_step(monkeypatch, agreed_polls):
    """Two ranks whose copies finish at once and after 5 polls: with agreed polls their allocators
    free and take the same slots at every step (what SGLang's replicated schedulers decide from)."""
    real = {name: getattr(HostKVTier, name) for name in ("store", "load")}

    def run(polls: int):
        for name, copy in real.items():
            def started(self, *args, copy=copy):
                copy(self, *args)
                return Transfer(_SlowEvent(polls), agreed_polls=agreed_polls)
            monkeypatch.setattr(HostKVTier, name, started)
        _, harness, free_slots = _run(4096, summaries=True)
        return free_slots, harness.controller.tiering.counters.as_dict()

    (fast, fast_counters), (slow, slow_counters) = run(0), run(5)
    assert fast_counters["evicted_tokens"] > 300 and fast_counters["zoomed_in_tokens"] > 0
    if agreed_polls:
        assert fast == slow and fast_counters == slow_counters
    else:
        assert fast != slow


def test_pd_disaggregation_and_dp_attention_are_refused_at_start(model_path):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()  # as launch_server does: zoomr's resolution hook checks the arguments
    for mode in ("prefill", "decode"):
        args = ServerArgs(model_path=model_path, attention_backend="zoomr", device="cpu", disaggregation_mode=mode)
        with pytest.raises(ValueError, match=f"zoomr does not support PD disaggregation .*{mode}"):
            args.resolve_once()
    args = ServerArgs(model_path=model_path, attention_backend="zoomr", device="cpu", tp_size=2, dp_size=2,
                      enable_dp_attention=True)
    with pytest.raises(ValueError, match="zoomr does not support --enable-dp-attention"):
        args.resolve_once()


# -- end to end at TP=2 ------------------------------------------------------------------------------
def _params(n: int, custom: dict) -> dict:
    return {**GREEDY, "max_new_tokens": n, "custom_params": custom}


def _first_turn(eng) -> list:
    out = eng.generate(input_ids=prompts()[:3], sampling_params=[_params(TURN1, c) for c in VOTES])
    return [o["output_ids"] for o in out]


def _second_turn(eng, first: list) -> list:
    second = [p + o + MESSAGE for p, o in zip(prompts()[:2], first)]
    return [o["output_ids"] for o in generate(eng, second, TURN2)]


def _every_rank_idle(eng, start=None) -> list:
    """Each rank's counts (rank 0's server info carries them): nothing running, the pool holds only
    the unlocked tree, the host tier only the tree's pieces; the ranks agree on every count."""
    ranks = zoomr_state(eng)["ranks"]
    assert len(ranks) == 2
    for rank in ranks:
        pools, radix = rank["pools"], rank["radix"]
        assert rank["running"] == {} and rank["index_entries_live"] == 0
        assert pools["kv_protected"] == 0 and pools["kv_available"] + pools["kv_evictable"] == pools["kv_capacity"]
        assert start is None or pools["req_rows_available"] == start[0]["pools"]["req_rows_available"]
        host_used = 0 if rank["host_tier"] is None else rank["host_tier"]["used_tokens"]
        assert radix["device_tokens"] == pools["kv_evictable"] and host_used == radix["host_tokens"]
    assert ranks[1] == ranks[0]
    return ranks


@pytest.fixture(scope="module")
def tp1_tokens(model_path):
    """TP=1's tokens: the first turn, then the second over the zoomr radix cache."""
    with zoomr_env(**BUDGET), engine(model_path, "zoomr", **ENGINE) as eng:
        first = _first_turn(eng)
        return first, _second_turn(eng, first)


@pytest.mark.engine
def test_tp2_with_the_host_tier_off_gives_tp1_tokens(model_path, tp1_tokens):
    with zoomr_env(**BUDGET, host_pool_gb=0), engine(model_path, "zoomr", tp_size=2, **ENGINE) as eng:
        assert _first_turn(eng) == tp1_tokens[0]
        assert all(rank["host_tier"] is None for rank in _every_rank_idle(eng))


@pytest.fixture(scope="module")
def tp2(model_path):
    """One TP=2 engine with the host tier and the zoomr radix cache for the tests below."""
    with zoomr_env(**BUDGET), engine(model_path, "zoomr", tp_size=2, **ENGINE) as eng:
        yield eng, zoomr_state(eng)["ranks"]


@pytest.mark.engine
def test_tp2_with_the_host_tier_gives_tp1_tokens_over_two_turns(tp2, tp1_tokens):
    eng, start = tp2
    first = _first_turn(eng)
    assert first == tp1_tokens[0]
    ranks = _every_rank_idle(eng, start)
    assert ranks[0]["host_tier"]["evicted_tokens"] > 0 and ranks[0]["radix"]["host_tokens"] > 0
    assert _second_turn(eng, first) == tp1_tokens[1]  # turn 2 inherits turn 1's thoughts from the tree
    ranks = _every_rank_idle(eng, start)
    assert ranks[0]["host_tier"]["zoomed_in_tokens"] > 0 and ranks[0]["host_tier"]["zoom_in_failures"] == 0


@pytest.mark.engine
def test_tp2_soak_with_aborts_and_mixed_budgets_restores_every_count(tp2):
    eng, start = tp2
    evicted_before = zoomr_state(eng)["ranks"][0]["host_tier"]["evicted_tokens"]
    budgets = [0, 96, 160, 0, 120, 200]
    rng = random.Random(3)
    sampled = [rng.randrange(2, 400) for _ in range(30)]

    async def load():
        tasks = [asyncio.ensure_future(eng.async_generate(
            input_ids=[0] + sampled[i:i + 12 + 3 * i], rid=f"soak-{i}",
            sampling_params=_params(150 + 30 * i, {"zoomr_budget": b})))
            for i, b in enumerate(budgets)]
        for rid, delay in (("soak-1", 1.0), ("soak-4", 2.0)):
            await asyncio.sleep(delay)
            eng.tokenizer_manager.abort_request(rid=rid)
        return await asyncio.gather(*tasks)

    outputs = eng.loop.run_until_complete(load())
    finish = [o["meta_info"]["finish_reason"]["type"] for o in outputs]
    assert finish.count("abort") == 2 and finish.count("length") == 4, finish
    assert _every_rank_idle(eng, start)[0]["host_tier"]["evicted_tokens"] > evicted_before
    eng.flush_cache()
    for rank in zoomr_state(eng)["ranks"]:
        assert rank["pools"]["kv_available"] == rank["pools"]["kv_capacity"]
        assert rank["host_tier"]["used_tokens"] == 0 and rank["radix"]["thought_records"] == 0


@pytest.mark.engine
def test_tp2_retraction_through_the_zoomr_tree_keeps_the_ranks_in_step(model_path):
    """SGLang retracts running requests (forced by its own ``SGLANG_TEST_RETRACT``) on every rank at
    once: each retracted request re-prefills from the zoomr radix cache, inheriting its thoughts and
    cold KV, and every rank ends with the same counts, back where they started."""
    retract = dict(SGLANG_TEST_RETRACT=1, SGLANG_TEST_RETRACT_INTERVAL=150)
    output = 400
    with zoomr_env(retract, **BUDGET), engine(model_path, "zoomr", tp_size=2, **ENGINE) as eng:
        start = zoomr_state(eng)["ranks"]
        outputs = generate(eng, prompts()[:2], output)
        assert all(len(o["output_ids"]) == output for o in outputs)
        finished = zoomr_state(eng)["finished"]
        retracted = [finished[o["meta_info"]["id"]] for o in outputs if finished[o["meta_info"]["id"]]["steps"] < output - 1]
        assert retracted, "SGLANG_TEST_RETRACT retracted nothing"
        assert all(stats["inherited_thoughts"] > 0 for stats in retracted)
        ranks = _every_rank_idle(eng, start)
        assert ranks[0]["radix"]["retracted_kept"] >= len(retracted)
