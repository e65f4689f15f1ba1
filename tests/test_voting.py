"""Voting: hand-computed GQA scores, per-row top-k votes, ranked selection, agreement."""

import pytest
import torch

from zoomr_sglang.algo.voting import attention_mass, agreement, head_votes, score_thoughts, select_thoughts

# 4 query heads over 2 KV heads: heads 0, 1 read KV head 0; heads 2, 3 read KV head 1.
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
INDEX_KEYS = torch.tensor([  # [n_thoughts=3, num_kv_heads=2, head_dim=2]
    [[1.0, 2.0], [0.0, 1.0]],
    [[3.0, 0.0], [2.0, 2.0]],
    [[0.0, -1.0], [-1.0, 1.0]],
])
EXPECTED_SCORES = torch.tensor([
    [1.0, 3.0, 0.0],  # [1, 0] . kv0 keys
    [2.0, 0.0, -1.0],  # [0, 1] . kv0 keys
    [1.0, 4.0, 0.0],  # [1, 1] . kv1 keys
    [-1.0, 2.0, -3.0],  # [2, -1] . kv1 keys
])


def test_score_thoughts_uses_gqa_mapping():
    scores = score_thoughts(QUERY.to(torch.bfloat16), INDEX_KEYS)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, EXPECTED_SCORES)


def test_score_thoughts_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        score_thoughts(QUERY[:, :1], INDEX_KEYS)
    with pytest.raises(ValueError, match="num_kv_heads"):
        score_thoughts(QUERY[:3], INDEX_KEYS)


def test_votes_selection_and_agreement_from_scores():
    votes, sums = head_votes(EXPECTED_SCORES, k=2)
    # Top-2 per head: {1, 0}, {0, 1}, {1, 0}, {1, 0}.
    assert votes.dtype == torch.int64 and votes.tolist() == [4, 4, 0]
    assert sums.dtype == torch.float32 and sums.tolist() == [3.0, 9.0, -4.0]
    assert select_thoughts(votes, sums, c=2) == [1, 0]  # 4-4 vote tie: larger score sum first
    assert select_thoughts(votes, sums, c=1) == [1]
    assert agreement(votes, [1]) == 0.5
    assert agreement(votes, [1, 0]) == 1.0
    votes, _ = head_votes(EXPECTED_SCORES, k=1)
    assert votes.tolist() == [1, 3, 0]
    assert agreement(votes, [1]) == 0.75


def test_ties_inside_a_row_go_to_the_lower_index():
    scores = torch.tensor([
        [1.0, 1.0, 1.0, 0.0],
        [0.0, 5.0, 5.0, 5.0],
        [2.0, 2.0, 2.0, 2.0],
    ])
    votes, _ = head_votes(scores, k=2)
    assert votes.tolist() == [2, 3, 1, 0]


def test_vote_ties_break_by_score_sum_then_index():
    votes = torch.tensor([2, 3, 3, 1, 3])
    sums = torch.tensor([0.0, 1.0, 2.0, 5.0, 1.0])
    assert select_thoughts(votes, sums, c=3) == [2, 1, 4]
    assert select_thoughts(votes, sums, c=10) == [2, 1, 4, 0, 3]  # c > n: all, in rank order
    assert select_thoughts(votes, sums, c=0) == []


def test_k_larger_than_n_thoughts_and_no_thoughts():
    votes, sums = head_votes(torch.tensor([[1.0, -2.0], [0.5, 0.5]]), k=5)
    assert votes.tolist() == [2, 2] and sums.tolist() == [1.5, -1.5]
    votes, sums = head_votes(torch.zeros(3, 0), k=2)
    assert votes.shape == (0,) and sums.shape == (0,)
    assert select_thoughts(votes, sums, c=2) == []
    assert agreement(votes, []) == 1.0


def test_agreement_values_and_bad_arguments():
    votes = torch.tensor([0, 5, 3, 2])
    assert agreement(votes, [2, 3]) == 0.5
    assert agreement(votes, [1, 1]) == 0.5  # a repeated index counts once
    assert agreement(torch.zeros(3, dtype=torch.int64), [0]) == 1.0
    with pytest.raises(ValueError, match="chosen"):
        agreement(votes, [4])
    with pytest.raises(ValueError, match="k"):
        head_votes(torch.zeros(2, 2), k=0)
    with pytest.raises(ValueError, match="c"):
        select_thoughts(votes, votes.float(), c=-1)


def test_attention_mass_is_the_softmax_share_a_thought_would_get():
    """One-token index keys: the estimate equals the exact softmax probability of that key within
    the attended keys; a head that attends elsewhere gives every thought almost nothing."""
    torch.manual_seed(0)
    keys = torch.randn(12, 1, 8)  # attended keys, one KV head
    query = torch.randn(2, 8)
    scaling = 0.5
    attended = score_thoughts(query, keys) * scaling  # [2, 12]
    index_keys = keys[[3, 7]]  # thoughts whose summaries are keys 3 and 7
    mass = attention_mass(score_thoughts(query, index_keys), torch.ones(2), torch.logsumexp(attended, dim=1), scaling)
    exact = torch.softmax(attended, dim=1)[:, [3, 7]]
    assert torch.allclose(mass, exact, atol=1e-6)
    # A head focused on a recent key (not a summary) casts almost no mass, whatever its ranking.
    focused = torch.zeros(1, 8)
    focused[0, 0] = 1.0
    recent = torch.zeros(5, 1, 8)
    recent[4, 0, 0] = 20.0
    summaries = torch.zeros(2, 1, 8)
    summaries[0, 0, 0] = 1.0
    lse = torch.logsumexp(score_thoughts(focused, torch.cat([recent, summaries])), dim=1)
    assert attention_mass(score_thoughts(focused, summaries), torch.ones(2), lse, 1.0).sum() < 1e-6
