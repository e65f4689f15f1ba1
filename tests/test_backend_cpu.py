"""The CPU backend against SGLang's real pools: sparse decode equals the reference over the planned
set, a full budget equals ``torch_native``, the working set stays bounded, selections move, and
index entries come back when requests leave."""

from __future__ import annotations

import random

import pytest
import torch

from backend_harness import TOKEN, Harness, scripted_tokens
from zoomr_sglang.algo.torch_attention import masked_decode_reference
from zoomr_sglang.algo.segmentation import TokenRole
from zoomr_sglang.config import ZoomRConfig

# Thought votes, with or without summaries (implicit_budget 0: thoughts that close without one are
# voted by their mean keys, not handed to the fine levels, which tests/test_fine_zoom.py checks).
SMALL = ZoomRConfig(topk=2, num_thoughts=2, sink=4, window=8, max_thought_tokens=32, refresh_interval=16,
                    implicit_budget=0)


def _keep_mask(ranges, seq_len):
    keep = torch.zeros(seq_len, dtype=torch.bool)
    for start, end in ranges:
        keep[start:end] = True
    return keep


@pytest.mark.parametrize("summaries", [False, True])
def test_sparse_decode_matches_reference_over_planned_set(summaries):
    harness = Harness(SMALL)
    prompt_lens = [5, 17, 40]
    for n in prompt_lens:
        harness.add_request(n)
    rng = random.Random(1)
    scripts = [scripted_tokens(rng, 400, summaries=summaries) for _ in prompt_lens]
    rids = {f"req-{row}" for row in harness.rows}
    selections, sparse_steps = set(), 0
    for step in range(400):
        batch, layers = harness.decode_step([s[step] for s in scripts])
        plan = harness.plan
        checked_layers = layers if step % 4 == 0 else []  # the reference is slow; every 4th step
        for (q, _, _, out), layer in zip(checked_layers, harness.layers):
            for i, row in enumerate(harness.rows):
                seq_len = harness.seq_lens[i]
                slots = harness.req_to_token_pool.req_to_token[row, :seq_len].long()
                keep = _keep_mask(plan.working_sets[i].tolist(), seq_len)
                expected = masked_decode_reference(
                    q[i].view(harness.num_heads, harness.head_dim),
                    harness.kv_pool.get_key_buffer(layer.layer_id)[slots],
                    harness.kv_pool.get_value_buffer(layer.layer_id)[slots],
                    keep, layer.scaling,
                )
                got = out[i].view(harness.num_heads, harness.head_dim).double()
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                sparse_steps += int(keep.sum()) < seq_len
        for state in harness.states.values():
            selections.add(tuple(sorted(state.zoomed)))
    stats = [s.stats for s in harness.states.values()]
    assert all(s.over_bound_steps == 0 for s in stats)
    assert all(s.attended_max <= s.bound_last for s in stats)
    assert sparse_steps > 0, "the budget never bit: nothing was dropped"
    assert len(selections) > 3, f"the zoomed-in selection never moved: {selections}"
    assert all(s.selection_changes > 2 and s.votes_held > 0 for s in stats)
    if summaries:
        assert all(s.summaries > 3 for s in stats)
    harness.release_all()
    assert harness.controller.index_keys.num_live == 0
    assert set(harness.controller.finished) == rids


def test_full_budget_is_bit_identical_to_torch_native():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    whole = ZoomRConfig(sink=0, window=4096, max_thought_tokens=16)
    harness = Harness(whole, seed=3)
    for n in (3, 11):
        harness.add_request(n)
    native = TorchNativeAttnBackend(harness.backend_runner())
    rng = random.Random(2)
    scripts = [scripted_tokens(rng, 120, summaries=True) for _ in range(2)]
    for step in range(120):
        _, layers = harness.decode_step([s[step] for s in scripts])
        batch = harness.last_batch
        for (q, k, v, out), layer in zip(layers, harness.layers):
            expected = native.forward_decode(q, k, v, layer, batch, save_kv_cache=False)
            assert torch.equal(out, expected)


@pytest.mark.parametrize("vote", ["mass", "count"])
def test_a_vote_takes_effect_two_steps_later_and_picks_the_aligned_thought(vote):
    """Make one closed thought's keys equal to the query direction. The step that decodes a
    sentence end votes on the device with its own queries (the host learns of the token one step
    later), and the choice reaches the host and the working set two steps after the vote, not
    before (both vote modes)."""
    config = ZoomRConfig(topk=1, num_thoughts=1, sink=0, window=4, max_thought_tokens=64, refresh_interval=1000,
                         vote=vote, implicit_budget=0)  # the thoughts have no summaries: voted by mean keys
    harness = Harness(config, num_layers=1, seed=5)
    harness.add_request(2)
    words = [TOKEN["a"]] * 5 + [TOKEN["."], TOKEN["\n\n"]]
    script = words * 4 + [TOKEN["b"]] * 3
    for token in script:
        harness.decode_step([token])
    state = next(iter(harness.states.values()))
    assert state.candidates == [0, 1, 2, 3]  # the word after the last blank line closed thought 3
    target_index = next(i for i in state.candidates if i not in state.zoomed)
    target = state.segmenter.thoughts[target_index]
    row = harness.rows[0]
    direction = torch.zeros(harness.num_kv_heads, harness.head_dim)
    direction[:, 0] = 1.0
    slots = harness.req_to_token_pool.req_to_token[row, target.start:target.span_end()].long()
    # Rewrite the target's keys and its index entry so that it is the best match for every head.
    key_buffer = harness.kv_pool.get_key_buffer(0)
    key_buffer[slots] = direction * 10
    store = harness.controller.index_keys
    entry = next(e for (t, _), e in state.entries.items() if t == target_index)
    store.sums[0, entry] = direction * 10 * store.counts[0, entry]
    harness.query_override = torch.zeros(harness.num_heads, harness.head_dim)
    harness.query_override[:, 0] = 1.0
    harness.decode_step([TOKEN["."]])  # decoding a sentence end: this step's queries vote
    assert harness.controller.selection.active_voters == 1
    harness.query_override = None
    harness.decode_step([TOKEN["b"]])
    assert state.zoomed != [target_index]
    harness.decode_step([TOKEN["b"]])
    assert state.zoomed == [target_index] and state.stats.votes_held >= 1
    attended = harness.plan.working_sets[0].tolist()
    assert all(any(a <= p < b for a, b in attended) for p in range(target.start, target.span_end()))


def _four_summarized_thoughts(config: ZoomRConfig, num_layers: int) -> Harness:
    """A request with four closed thoughts, each under a 3-token summary, still decoding."""
    harness = Harness(config, num_layers=num_layers, seed=5)
    harness.add_request(2)
    summary = [TOKEN["<|begin_of_summary|>"]] + [TOKEN["b"]] * 3 + [TOKEN["<|end_of_summary|>"], TOKEN["\n\n"]]
    for token in ([TOKEN["a"]] * 5 + [TOKEN["."], TOKEN["\n\n"]] + summary) * 4 + [TOKEN["a"]] * 3:
        harness.decode_step([token])
    assert next(iter(harness.states.values())).candidates == [0, 1, 2, 3]
    return harness


def _rig_summaries(harness: Harness, layer: int, peaks) -> None:
    """Set each thought's summary keys in ``layer`` to ``peaks[thought]`` (3 values) times one
    direction, and its index entry to the mean of 10 * that direction."""
    state = next(iter(harness.states.values()))
    direction = torch.zeros(harness.num_kv_heads, harness.head_dim)
    direction[:, 0] = 1.0
    store = harness.controller.index_keys
    for index in state.candidates:
        thought = state.segmenter.thoughts[index]
        assert thought.content_end - thought.content_start == 3
        slots = harness.req_to_token_pool.req_to_token[harness.rows[0], thought.content_start:thought.content_end]
        harness.kv_pool.get_key_buffer(layer)[slots.long()] = torch.stack([direction * p for p in peaks[index]])
        entry = state.entries[(index, TokenRole.SUMMARY)]
        store.sums[layer, entry] = direction * 10 * store.counts[layer, entry]


def _vote_once(harness: Harness) -> list:
    """Decode a sentence end with queries along the rigged direction; returns the selection the
    vote put in place two steps later."""
    harness.query_override = torch.zeros(harness.num_heads, harness.head_dim)
    harness.query_override[:, 0] = 1.0
    harness.decode_step([TOKEN["."]])
    harness.query_override = None
    harness.decode_step([TOKEN["a"]])
    harness.decode_step([TOKEN["a"]])
    state = next(iter(harness.states.values()))
    assert state.stats.votes_held >= 1
    return state.zoomed


EVEN, PEAK_AT_2 = [10.0, 10.0, 10.0], {2: [20.0, 0.0, 0.0]}


@pytest.mark.parametrize("vote", ["mass", "mean_mass"])
def test_a_mass_vote_scores_each_summary_token(vote):
    """Four thoughts whose 3-token summaries share one mean key; in one of them a single token
    matches the query and the other two do not. The mass vote reads the summaries' keys from the
    KV pool and picks that thought; the mean-key estimate sees four equal keys (a tie goes to the
    oldest thought)."""
    config = ZoomRConfig(topk=1, num_thoughts=1, sink=0, window=4, max_thought_tokens=64, refresh_interval=1000,
                         vote=vote)
    harness = _four_summarized_thoughts(config, num_layers=1)
    _rig_summaries(harness, 0, [PEAK_AT_2.get(i, EVEN) for i in range(4)])
    assert _vote_once(harness) == ([2] if vote == "mass" else [0])


@pytest.mark.parametrize("vote_layers, expected", [((), [1]), ((0,), [2]), ((1,), [1])])
def test_only_the_configured_layers_vote(vote_layers, expected):
    """Layer 0's summaries point at thought 2, layer 1's more strongly at thought 1: every layer
    voting picks 1, ZOOMR_VOTE_LAYERS=[0] picks 2."""
    config = ZoomRConfig(topk=1, num_thoughts=1, sink=0, window=4, max_thought_tokens=64, refresh_interval=1000,
                         vote_layers=vote_layers)
    harness = _four_summarized_thoughts(config, num_layers=2)
    _rig_summaries(harness, 0, [PEAK_AT_2.get(i, EVEN) for i in range(4)])
    _rig_summaries(harness, 1, [[40.0, 0.0, 0.0] if i == 1 else EVEN for i in range(4)])
    assert _vote_once(harness) == expected


def test_a_vote_layer_the_model_lacks_stops_the_backend():
    with pytest.raises(ValueError, match=r"ZOOMR_VOTE_LAYERS=\[0, 2\] names layer 2; allowed: layers 0..1"):
        Harness(ZoomRConfig(vote_layers=(0, 2)), num_layers=2)


def test_self_check_records_the_error_against_the_dense_reference():
    """The self_check_interval setting is what the engine tests read: it must report ~0 for the real
    output and a large error for a wrong one."""
    config = ZoomRConfig(sink=2, window=6, max_thought_tokens=12, self_check_interval=3)
    harness = Harness(config, seed=7)
    harness.add_request(9)
    script = scripted_tokens(random.Random(3), 90, summaries=True)
    for token in script:
        harness.decode_step([token])
    stats = next(iter(harness.states.values())).stats
    assert stats.self_checks == (90 // 3) * harness.num_layers
    assert stats.self_check_max_error < 1e-5
    harness.plan.self_check = True
    query = torch.randn(1, harness.num_heads, harness.head_dim)
    harness.controller.check_outputs(0, query, torch.zeros(1, harness.num_heads, harness.head_dim), 0.25)
    assert stats.self_check_max_error > 1e-2


def test_gather_decode_attention_returns_the_softmax_denominators():
    """Mass votes read each head's log softmax denominator over the working set; the CPU path
    takes it from the same kernel call as the output (CUDA twin: test_kernels.py)."""
    from zoomr_sglang.algo.torch_attention import dense_attention_weights, gather_decode_attention

    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(64, 2, 8, generator=gen), torch.randn(64, 2, 8, generator=gen)
    query = torch.randn(3, 4, 8, generator=gen)
    kv_indptr = torch.tensor([0, 5, 5 + 17, 5 + 17 + 9], dtype=torch.int32)
    kv_indices = torch.randperm(64, generator=gen)[:31]
    out, lse = gather_decode_attention(query, keys, values, kv_indptr, kv_indices, 0.5)
    assert out.shape == (3, 4, 8) and lse.shape == (3, 4) and lse.dtype == torch.float32
    for i in range(3):
        slots = kv_indices[int(kv_indptr[i]): int(kv_indptr[i + 1])]
        logits = torch.log(dense_attention_weights(query[i], keys[slots], 0.5))  # log softmax
        raw = torch.einsum("hd,nhd->hn", query[i].double(), keys[slots].double().repeat_interleave(2, dim=1)) * 0.5
        torch.testing.assert_close(lse[i].double(), (raw - logits)[:, 0], rtol=1e-5, atol=1e-5)


def test_ids_past_the_tokenizer_are_text_without_markers():
    """issue 23: models pad their embedding beyond the tokenizer and sample those ids too. The host
    segments them as empty text and the device's refresh mask reads them as no refresh token."""
    harness = Harness(SMALL, host_tier_tokens=4096)
    harness.add_request(5)
    harness.add_request(9)
    unknown = len(harness.controller.planner.token_texts) + 40
    scripts = [scripted_tokens(random.Random(seed), 120, summaries=True) for seed in range(2)]
    for step in range(120):
        harness.decode_step([unknown if step % 7 == 3 else script[step] for script in scripts])
    states = list(harness.states.values())
    assert all(state.stats.thoughts_closed > 2 for state in states)
    assert sum(state.stats.votes_held for state in states) > 0
    selection = harness.controller.selection
    mask = selection.refresh_mask
    assert mask.shape == (len(harness.controller.planner.token_texts) + 1,) and not bool(mask[-1])
    # Two requests that may vote, neither asked by the host: only the one decoding "." votes.
    votes = torch.tensor([[1, 5, 0, 0], [2, 5, 0, 0]])
    voting = selection._choose_voters(votes, torch.tensor([unknown, TOKEN["."]]))
    assert voting.tolist() == [False, True]
