"""ZoomR's vote for every voting request of a decode step at once: the torch reference.

One decode step may have many requests at a refresh point. Each of them scores its closed thoughts'
index keys with this layer's query and votes; the votes add up over layers, and after the last
layer each voter's c best thoughts are its new selection. Everything here works on padded batched
tensors (no Python loop over requests, no host sync), so the same calls serve the CPU path and
the CUDA-graph path; ``kernels/thought_index.py`` is the Triton version of :func:`accumulate_votes`.

Shapes: ``bs`` requests in the step, ``n_voters`` voter slots (a slot with 0 candidates is unused),
``max_candidates`` candidate slots per pool row, ``n_entries`` index-key entries.

Three vote kinds, chosen per voter (``vote_kind``, an index into :data:`VOTE_KINDS`):

* count (the paper): each (layer, query head) gives one vote to each of its top-``topk`` thoughts
  by ``q . index_key``; ties between thoughts go to the larger summed score, then to the older
  thought. ``votes`` counts the votes, ``weights`` sums the scores.
* mass: each (layer, query head) adds the attention mass it gives each thought's summary,
  ``sum_t exp(scaling * q . k_t - lse)`` over the summary's content keys read from the KV pool
  (lse: the log of the softmax denominator over this step's working set, which the attention kernel
  returns). A thought with no summary is scored by its body's mean key as in mean_mass.
  ``votes`` stays 0, ``weights`` sums the mass.
* mean_mass: the same mass estimated from the index key alone, ``n * exp(scaling * q . mean_k -
  lse)`` (n: tokens behind the key). Exact for keys that are alike; blind to one token of a summary
  that a query matches while the others do not (docs/design.md, "Vote").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

VOTE_KINDS = ("mass", "count", "mean_mass")  # a voter's ``vote_kind`` is the index of its kind here
MASS, COUNT, MEAN_MASS = range(len(VOTE_KINDS))


@dataclass(frozen=True)
class SummaryKeys:
    """Where mass voters read each candidate's summary keys, one layer.

    spans: ``[n_rows, >= max_candidates, 2]`` int, per pool row and candidate column the first
        position of the summary's content and its length (0: the thought has no summary);
    req_to_token: ``[n_rows, max_len]`` int, the KV slot of each position (summaries never leave
        the device pool);
    key_buffer: ``[n_slots, num_kv_heads, head_dim]``, the layer's cached keys;
    width: tokens scored per summary (a host int); a longer summary's mass is that of its first
        ``width`` tokens times ``length / width``.
    """

    spans: torch.Tensor
    req_to_token: torch.Tensor
    key_buffer: torch.Tensor
    width: int


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
    vote_kind: torch.Tensor,
    votes: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    topk: int,
    summary: SummaryKeys,
    kinds: Tuple[bool, bool, bool] = (True, True, True),
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
        voter_rows, voter_batch, num_candidates, vote_kind: ``[n_voters]`` int64: each slot's pool
            row, batch index, number of candidates (its first ``num_candidates`` columns) and kind.
        votes, weights: ``[n_voters, max_candidates]`` float32 accumulators.
        summary: the candidates' summary keys (mass votes).
        kinds: per entry of :data:`VOTE_KINDS`, whether any slot casts that kind (a caller that
            knows on the host skips the other kinds' work).
    """
    n_voters, max_candidates = votes.shape
    entries = candidates[:, :max_candidates].index_select(0, voter_rows).long()  # [n_voters, max_candidates]
    valid = torch.arange(max_candidates, device=votes.device)[None, :] < num_candidates[:, None]
    entries = torch.where(valid, entries, torch.zeros_like(entries))
    flat = entries.reshape(-1)
    means = sums.index_select(0, flat) / counts.index_select(0, flat).clamp(min=1.0)[:, None, None]
    means = means.reshape(n_voters, max_candidates, *sums.shape[1:])
    scores = grouped_scores(query.index_select(0, voter_batch), means)  # [n_voters, num_heads, max_candidates]
    kind = vote_kind[:, None]
    any_mass, any_count, any_mean_mass = kinds
    if any_count:
        # A stable sort keeps equal scores in candidate order, so ties go to the older thought.
        ranked = torch.sort(torch.where(valid[:, None, :], -scores, torch.inf), dim=2, stable=True).indices
        top = ranked[:, :, : min(topk, max_candidates)]
        top_valid = (top < num_candidates[:, None, None]).float()
        counted = torch.zeros_like(votes).scatter_add_(1, top.reshape(n_voters, -1), top_valid.reshape(n_voters, -1))
        votes += torch.where(kind == COUNT, counted, 0.0)
        weights += torch.where((kind == COUNT) & valid, scores.sum(dim=1), 0.0)
    if any_mass or any_mean_mass:
        # exp(scaling * score + log n - lse), summed over heads.
        log_counts = torch.log(counts.index_select(0, flat).clamp(min=1.0)).reshape(n_voters, 1, max_candidates)
        lse = log_normalizer.index_select(0, voter_batch).float()[:, :, None]
        mass = torch.exp(scores * scaling + log_counts - lse)
        if any_mass:
            token_mass, has_summary = summary_mass(query.index_select(0, voter_batch), lse, summary, voter_rows,
                                                   valid, scaling)
            mass = torch.where(((kind == MASS) & has_summary)[:, None, :], token_mass, mass)
        weights += torch.where((kind != COUNT) & valid, mass.sum(dim=1), 0.0)


def summary_mass(query: torch.Tensor, lse: torch.Tensor, summary: SummaryKeys, voter_rows: torch.Tensor,
                 valid: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention mass ``[n_voters, num_heads, max_candidates]`` each head gives each candidate's
    summary content, key by key, and ``[n_voters, max_candidates]`` bool: the candidate has one.

    query ``[n_voters, num_heads, head_dim]``; lse ``[n_voters, num_heads, 1]`` float32; valid
    ``[n_voters, max_candidates]`` bool (the candidate columns in use).
    """
    n_voters, max_candidates = valid.shape
    spans = summary.spans[:, :max_candidates].index_select(0, voter_rows).long()  # [n_voters, max_candidates, 2]
    start, length = spans[..., 0], torch.where(valid, spans[..., 1], 0)
    scored = length.clamp(max=summary.width)
    offsets = torch.arange(summary.width, device=valid.device)
    present = offsets < scored[..., None]  # [n_voters, max_candidates, width]
    positions = torch.where(present, start[..., None] + offsets, 0)
    slots = summary.req_to_token[voter_rows[:, None, None], positions].long()
    keys = summary.key_buffer.index_select(0, slots.reshape(-1)).reshape(
        n_voters, max_candidates * summary.width, *summary.key_buffer.shape[1:])
    scores = grouped_scores(query, keys).reshape(n_voters, -1, max_candidates, summary.width)
    mass = torch.where(present[:, None], torch.exp(scores * scaling - lse[..., None]), 0.0).sum(dim=3)
    return mass * (length / scored.clamp(min=1))[:, None, :], length > 0


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
