"""Thought selection: every (layer, head) votes for its top-k thoughts, the c most-voted win."""

from typing import Sequence

import torch


def score_thoughts(query: torch.Tensor, index_keys: torch.Tensor) -> torch.Tensor:
    """Scores [num_heads, n_thoughts] float32 of query [num_heads, head_dim] against
    index_keys [n_thoughts, num_kv_heads, head_dim]: q[h] . K[g(h)] with
    g(h) = h // (num_heads // num_kv_heads) (GQA)."""
    if query.dim() != 2 or index_keys.dim() != 3:
        raise ValueError(
            "query must be [num_heads, head_dim] and index_keys [n_thoughts, num_kv_heads, head_dim],"
            f" got {tuple(query.shape)} and {tuple(index_keys.shape)}"
        )
    num_heads, head_dim = query.shape
    n_thoughts, num_kv_heads, key_dim = index_keys.shape
    if key_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query shape {tuple(query.shape)} does not fit index_keys shape {tuple(index_keys.shape)}:"
            " head_dim must match and num_heads must be a multiple of num_kv_heads"
        )
    group = num_heads // num_kv_heads
    # Consecutive query heads share a KV head, so grouping the query avoids copying the keys.
    grouped_query = query.to(torch.float32).reshape(num_kv_heads, group, head_dim)
    scores = torch.einsum("kgd,nkd->kgn", grouped_query, index_keys.to(torch.float32))
    return scores.reshape(num_heads, n_thoughts)


def head_votes(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes of scores [num_voters, n_thoughts].

    Returns (votes [n_thoughts] int64: how many rows put the thought in their top-min(k, n_thoughts);
    score_sums [n_thoughts] float32: sum of scores over rows). Ties inside a row's top-k go to the
    lower thought index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_voters, n_thoughts], got shape {tuple(scores.shape)}")
    scores = scores.to(torch.float32)
    n_thoughts = scores.shape[1]
    # A stable sort keeps equal scores in index order; torch.topk gives no such guarantee.
    order = torch.sort(-scores, dim=1, stable=True).indices
    top = order[:, : min(k, n_thoughts)]
    votes = torch.bincount(top.reshape(-1), minlength=n_thoughts)
    return votes, scores.sum(dim=0)


def attention_mass(scores: torch.Tensor, counts: torch.Tensor, log_normalizer: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Estimated attention probability mass [num_heads, n_thoughts] each head would give each thought.

    scores: ``q . index_key`` [num_heads, n_thoughts] (:func:`score_thoughts`); counts: tokens behind
    each index key [n_thoughts]; log_normalizer: per head, the log of the softmax denominator over
    the keys this step attends [num_heads]. A thought of n tokens whose keys average the index key
    gets about ``n * exp(scaling * score) / denominator``. Unlike a top-k vote, a head that looks at
    its recent window rather than at any summary contributes almost nothing.
    """
    logits = scores.to(torch.float32) * scaling + torch.log(counts.to(torch.float32).clamp(min=1.0))[None, :]
    return torch.exp(logits - log_normalizer.to(torch.float32)[:, None])


def select_thoughts(votes: torch.Tensor, score_sums: torch.Tensor, c: int) -> list[int]:
    """The min(c, n_thoughts) most-voted thought indices in rank order; vote ties go to the larger
    score sum, then to the lower index."""
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if votes.shape != score_sums.shape or votes.dim() != 1:
        raise ValueError(
            f"votes and score_sums must both be [n_thoughts], got {tuple(votes.shape)} and {tuple(score_sums.shape)}"
        )
    vote_list = votes.tolist()
    sum_list = score_sums.tolist()
    ranked = sorted(range(len(vote_list)), key=lambda j: (-vote_list[j], -sum_list[j], j))
    return ranked[:c]


def agreement(votes: torch.Tensor, chosen: Sequence[int]) -> float:
    """Share of all votes that landed in `chosen` (the paper's agreeability); 1.0 with no votes."""
    n_thoughts = votes.shape[0]
    chosen_set = set(chosen)
    for j in chosen_set:
        if not 0 <= j < n_thoughts:
            raise ValueError(f"chosen contains {j}, outside [0, {n_thoughts})")
    total = int(votes.sum())
    if total == 0:
        return 1.0
    return sum(int(votes[j]) for j in chosen_set) / total
