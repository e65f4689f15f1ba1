"""ZoomR's vote for every voting request of a decode step at once: the torch reference.

One decode step may have many requests at a refresh point. Each of them scores its closed thoughts'
index keys with this layer's query and votes; the votes add up over layers, and after the last
layer each voter's c best thoughts are its new selection. Everything here works on padded batched
tensors (no Python loop over requests, no host sync), so the same calls serve the CPU path and
the CUDA-graph path; ``kernels/thought_index.py`` is the Triton version of :func:`accumulate_votes`.

Shapes: ``bs`` requests in the step, ``n_voters`` voter slots (a slot with 0 candidates is unused),
``max_candidates`` candidate slots per pool row, ``n_entries`` index-key entries.

Two vote kinds, chosen per voter (``count_vote``):

* count (the paper): each (layer, query head) gives one vote to each of its top-``topk`` thoughts
  by ``q . index_key``; ties between thoughts go to the larger summed score, then to the older
  thought. ``votes`` counts the votes, ``weights`` sums the scores.
* mass: each (layer, query head) adds the attention mass it would give each thought,
  ``n * exp(scaling * q . index_key - lse)`` (n: tokens behind the key; lse: the log of the softmax
  denominator over this step's working set, which the attention kernel returns). ``votes`` stays 0,
  ``weights`` sums the mass.
"""

from __future__ import annotations

from typing import Tuple

import torch


def grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores [n, num_heads, m] float32 of query [n, num_heads, head_dim] against keys
    [n, m, num_kv_heads, head_dim]: head h reads KV head h // (num_heads // num_kv_heads) (GQA)."""
    n, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    grouped = query.float().reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # A batched matmul: about twice as fast as the equivalent einsum on a CPU at these sizes.
    return torch.matmul(grouped, keys.float().permute(0, 2, 3, 1)).reshape(n, num_heads, keys.shape[1])


def accumulate_votes(
    query: torch.Tensor,
    log_normalizer: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    candidates: torch.Tensor,
    voter_rows: torch.Tensor,
    voter_batch: torch.Tensor,
    num_candidates: torch.Tensor,
    count_vote: torch.Tensor,
    votes: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    topk: int,
    kinds: Tuple[bool, bool] = (True, True),
) -> None:
    """Add one layer's votes of every voter slot to ``votes`` and ``weights`` in place.

    Args:
        query: ``[bs, num_heads, head_dim]``, post-RoPE like the cached keys.
        log_normalizer: ``[bs, num_heads]`` float32, natural log of each head's softmax denominator
            (mass votes; any finite value for count votes).
        sums: ``[n_entries, num_kv_heads, head_dim]`` float32 key sums of this layer; counts
            ``[n_entries]`` float32 keys behind each sum.
        candidates: ``[n_rows, >= max_candidates]`` int, per pool row the entry ids of its closed
            thoughts in closing order.
        voter_rows, voter_batch, num_candidates, count_vote: ``[n_voters]`` int64: each slot's pool
            row, batch index, number of candidates (its first ``num_candidates`` columns), and
            1 for count votes, 0 for mass.
        votes, weights: ``[n_voters, max_candidates]`` float32 accumulators.
        kinds: whether any slot casts count votes, and whether any casts mass votes (a caller that
            knows on the host skips the other kind's work).
    """
    n_voters, max_candidates = votes.shape
    entries = candidates[:, :max_candidates].index_select(0, voter_rows).long()  # [n_voters, max_candidates]
    valid = torch.arange(max_candidates, device=votes.device)[None, :] < num_candidates[:, None]
    entries = torch.where(valid, entries, torch.zeros_like(entries))
    flat = entries.reshape(-1)
    means = sums.index_select(0, flat) / counts.index_select(0, flat).clamp(min=1.0)[:, None, None]
    means = means.reshape(n_voters, max_candidates, *sums.shape[1:])
    scores = grouped_scores(query.index_select(0, voter_batch), means)  # [n_voters, num_heads, max_candidates]
    is_count = count_vote.bool()[:, None]
    any_count, any_mass = kinds
    if any_count:
        # A stable sort keeps equal scores in candidate order, so ties go to the older thought.
        ranked = torch.sort(torch.where(valid[:, None, :], -scores, torch.inf), dim=2, stable=True).indices
        top = ranked[:, :, : min(topk, max_candidates)]
        top_valid = (top < num_candidates[:, None, None]).float()
        counted = torch.zeros_like(votes).scatter_add_(1, top.reshape(n_voters, -1), top_valid.reshape(n_voters, -1))
        votes += torch.where(is_count, counted, 0.0)
        weights += torch.where(is_count & valid, scores.sum(dim=1), 0.0)
    if any_mass:
        # exp(scaling * score + log n - lse), summed over heads.
        log_counts = torch.log(counts.index_select(0, flat).clamp(min=1.0)).reshape(n_voters, 1, max_candidates)
        lse = log_normalizer.index_select(0, voter_batch).float()[:, :, None]
        mass = torch.exp(scores * scaling + log_counts - lse).sum(dim=1)
        weights += torch.where(~is_count & valid, mass, 0.0)


def select_top(votes: torch.Tensor, weights: torch.Tensor, num_candidates: torch.Tensor,
               c: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each voter's c best candidates after the last layer.

    Args:
        votes, weights: ``[n_voters, max_candidates]`` float32 (:func:`accumulate_votes`).
        num_candidates: ``[n_voters]`` int64.
        c: thoughts to zoom into.

    Returns:
        ``chosen [n_voters, c]`` int64 candidate positions best first, -1 past a voter's candidates;
        ``agreement [n_voters]`` float32: the share of votes that landed in the chosen ones
        (1.0 with no votes, as for mass votes).
    """
    n_voters, max_candidates = votes.shape
    position = torch.arange(max_candidates, device=votes.device)[None, :].expand(n_voters, -1)
    valid = position < num_candidates[:, None]
    # Lexicographic (votes desc, weights desc, position asc) by two stable sorts, least significant first.
    order = torch.sort(torch.where(valid, -weights, torch.inf), dim=1, stable=True).indices
    by_votes = torch.sort(torch.where(valid, -votes, torch.inf).gather(1, order), dim=1, stable=True).indices
    order = order.gather(1, by_votes)
    width = min(c, max_candidates)
    chosen = order[:, :width]
    chosen = torch.where(chosen < num_candidates[:, None], chosen, -1)
    if width < c:
        chosen = torch.cat([chosen, chosen.new_full((n_voters, c - width), -1)], dim=1)
    landed = votes.gather(1, chosen[:, :width].clamp(min=0)) * (chosen[:, :width] >= 0)
    total = torch.where(valid, votes, 0.0).sum(dim=1)
    agreement = torch.where(total > 0, landed.sum(dim=1) / total.clamp(min=1e-30), 1.0)
    return chosen, agreement
