"""The fine levels' page votes for every request of a decode step at once: the torch reference.

:class:`~zoomr_sglang.algo.page_scores.PageScorer` keeps one request's Quest bounds (per layer and
KV head, the element-wise min and max key of each complete :data:`PAGE_TOKENS`-token page) on the
host and lets each (layer, query head) vote for its top pages. Here the same state and the same
vote live in fixed device tensors for a whole batch, with no Python loop over requests and no host
read, so the calls serve the CPU path and the CUDA-graph path alike; ``kernels/page_votes.py`` is
the Triton version of :func:`accumulate_page_votes`. docs/fine-levels.md has the design.

Shapes: ``bs`` requests in the step (lane ``b`` votes for request ``b``; a lane with no candidate
casts nothing), ``max_pages`` page columns per lane (column = page number in the request),
``n_commits`` page commits, ``capacity`` bound entries.

Addressing: the bounds of a page sit in a *bound entry* handed out by the host when the page
completes (:class:`PageBoundStore`), and ``row_pages[row, page]`` names the entry. Entries, not
(row, page) cells, because a table per (row, page) would be sized by rows x context, which is many
times the KV pool; entries are sized by the pages the pool (and the host tier) can hold, and they
are not KV slots, so a page whose KV moves to the host keeps its bounds on the device.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE

PAGE_TOKENS = QUEST_PAGE_SIZE  # positions per page (SGLang's pool on this path has page_size 1)


class PageBoundStore:
    """Page key bounds per bound entry and layer, and each pool row's page -> entry table.

    bounds: ``[num_layers, capacity + 1, 2, num_kv_heads, head_dim]`` in the KV cache's dtype
        (index 0 of dim 2: the min key, 1: the max key; a min or max is one of the keys, so the
        cache's dtype holds it exactly);
    row_pages: ``[n_rows, max_pages]`` int32, the entry of each complete page of each pool row.

    Entry ``capacity`` is a scratch entry that padded commits write and no page names. Handing out
    and taking back ids is host bookkeeping; a captured graph reads both tensors at fixed addresses.
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, n_rows: int,
                 max_pages: int, dtype: torch.dtype, device) -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("capacity", capacity), ("n_rows", n_rows), ("max_pages", max_pages)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.capacity = capacity
        self.scratch = capacity
        self.bounds = torch.zeros(num_layers, capacity + 1, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.row_pages = torch.full((n_rows, max_pages), capacity, dtype=torch.int32, device=device)
        # A stack of free ids, lowest on top: the live range stays compact.
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> np.ndarray:
        """``[n]`` int64 free entry ids (host); raises when fewer than ``n`` are free."""
        if n > len(self._free):
            raise ValueError(f"{n} page bound entries asked for, {len(self._free)} free of {self.capacity}")
        taken, self._free = self._free[len(self._free) - n:][::-1].copy(), self._free[: len(self._free) - n]
        return taken

    def free(self, entries: Iterable[int]) -> None:
        """Take entries back (host; e.g. the pages of a released row). Their bounds are rewritten
        by the commit of the page they go to next."""
        entries = np.asarray(list(entries), dtype=np.int64)
        if len(np.unique(entries)) != len(entries) or ((entries < 0) | (entries >= self.capacity)).any():
            raise ValueError(f"entries must be distinct ids in [0, {self.capacity}), got {entries.tolist()}")
        self._free = np.concatenate([self._free, np.sort(entries)[::-1]])

    def map_pages(self, commits: torch.Tensor) -> None:
        """Point ``row_pages`` at the entries of this step's real commits ``[n, 3]`` (row, page,
        entry; on the device). Once per step, outside any graph, before the layers commit them."""
        self.row_pages[commits[:, 0], commits[:, 1]] = commits[:, 2].to(torch.int32)


def commit_page_bounds(bounds: torch.Tensor, key_buffer: torch.Tensor, req_to_token: torch.Tensor,
                       commits: torch.Tensor) -> None:
    """Write the bounds of the pages in ``commits`` from one layer's cached keys.

    Args:
        bounds: ``[capacity + 1, 2, num_kv_heads, head_dim]``, one layer of :class:`PageBoundStore`.
        key_buffer: ``[n_slots, num_kv_heads, head_dim]``, the layer's cached keys (this step's
            already written: call after the layer's KV write).
        req_to_token: ``[n_rows, max_len]`` int, the KV slot of each position.
        commits: ``[n_commits, 3]`` int64 (row, page, entry), fixed size; a padding commit is
            ``(0, 0, scratch)``: it reads row 0's first page and writes only the scratch entry.
    """
    positions = commits[:, 1:2] * PAGE_TOKENS + torch.arange(PAGE_TOKENS, device=commits.device)
    keys = key_buffer.index_select(0, req_to_token[commits[:, :1], positions].reshape(-1).long())
    keys = keys.reshape(len(commits), PAGE_TOKENS, *key_buffer.shape[1:])
    bounds.index_copy_(0, commits[:, 2], torch.stack([keys.amin(dim=1), keys.amax(dim=1)], dim=1).to(bounds.dtype))


def candidate_pages(range_batch: torch.Tensor, range_start: torch.Tensor, range_length: torch.Tensor,
                    num_pages: torch.Tensor, max_pages: int) -> torch.Tensor:
    """``[bs, max_pages]`` bool: the complete pages of each lane that the step's working set does
    not cover whole (the pages a vote ranks); once per step, on the device, fixed shapes.

    range_batch, range_start, range_length: ``[n_ranges]`` int64, each attended range's lane,
    first position and length (a range of lane ``bs`` or more is padding); num_pages: ``[bs]``
    int64, complete pages per lane (0: the lane does not vote).
    """
    bs = num_pages.shape[0]
    width = max_pages * PAGE_TOKENS
    lane = torch.where((range_batch >= 0) & (range_batch < bs), range_batch, bs)
    start = range_start.clamp(0, width)
    end = (range_start + range_length).clamp(0, width)
    # A difference array over positions: +1 where a range starts, -1 where it ends.
    edges = torch.zeros(bs + 1, width + 1, dtype=torch.int32, device=num_pages.device)
    edges.index_put_((lane, start), torch.ones_like(start, dtype=torch.int32), accumulate=True)
    edges.index_put_((lane, end), torch.full_like(end, -1, dtype=torch.int32), accumulate=True)
    covered = (edges[:bs, :width].cumsum(dim=1) > 0).reshape(bs, max_pages, PAGE_TOKENS).all(dim=2)
    complete = torch.arange(max_pages, device=num_pages.device)[None, :] < num_pages[:, None]
    return complete & ~covered


def page_upper_bounds(query: torch.Tensor, bounds: torch.Tensor, row_pages: torch.Tensor,
                      rows: torch.Tensor, max_pages: int) -> torch.Tensor:
    """Quest's bound ``sum_d max(q_d * min_d, q_d * max_d)`` ``[bs, num_heads, max_pages]`` float32
    of each lane's query ``[bs, num_heads, head_dim]`` over the keys of its pages 0..max_pages-1
    (bounds: one layer of the store; rows ``[bs]`` int64: each lane's pool row). Query head h
    reads KV head h // (num_heads // num_kv_heads) (GQA); the same float32 operations as
    ``page_scores.quest_upper_bound``."""
    bs, num_heads, head_dim = query.shape
    num_kv_heads = bounds.shape[2]
    entries = row_pages[:, :max_pages].index_select(0, rows).long()
    paged = bounds.index_select(0, entries.reshape(-1)).float().reshape(bs, max_pages, 2, num_kv_heads, head_dim)
    lows, highs = (paged[:, :, i].permute(0, 2, 1, 3)[:, :, None] for i in (0, 1))  # [bs, kv, 1, pages, d]
    q = query.float().reshape(bs, num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    return torch.maximum(q * lows, q * highs).sum(dim=-1).reshape(bs, num_heads, max_pages)


def accumulate_page_votes(query: torch.Tensor, bounds: torch.Tensor, row_pages: torch.Tensor, rows: torch.Tensor,
                          candidate: torch.Tensor, wanted: torch.Tensor, votes: torch.Tensor,
                          weights: torch.Tensor, *, max_wanted: int) -> None:
    """Add one layer's page votes of every lane to ``votes`` and ``weights`` in place.

    Each query head gives one vote to each of its ``min(wanted, candidates)`` best candidate pages
    by the bound (ties to the lower page); ``weights`` sums every head's bound of every candidate.
    These are ``voting.head_votes``' votes and score sums, as ``PageScorer`` adds them per layer.

    Args:
        query: ``[bs, num_heads, head_dim]``, post-RoPE like the cached keys.
        bounds, row_pages, rows: as for :func:`page_upper_bounds`.
        candidate: ``[bs, max_pages]`` bool (:func:`candidate_pages`).
        wanted: ``[bs]`` int64, pages each lane zooms into (its heads' top-k); at most ``max_wanted``.
        votes, weights: ``[bs, max_pages]`` float32 accumulators.
        max_wanted: a host int, the largest ``wanted`` (the sort is cut there).
    """
    bs, max_pages = votes.shape
    scores = page_upper_bounds(query, bounds, row_pages, rows, max_pages)
    eligible = candidate[:, None, :]
    # A stable sort keeps equal bounds in page order, so ties go to the lower page.
    ranked = torch.sort(torch.where(eligible, -scores, torch.inf), dim=2, stable=True).indices
    top = ranked[:, :, : min(max_wanted, max_pages)]
    rank_ok = torch.arange(top.shape[2], device=votes.device) < wanted[:, None, None]
    voted = (rank_ok & candidate.gather(1, top.reshape(bs, -1)).reshape(top.shape)).float()
    votes.scatter_add_(1, top.reshape(bs, -1), voted.reshape(bs, -1))
    weights += torch.where(candidate, scores.sum(dim=1), 0.0)


def select_pages(votes: torch.Tensor, weights: torch.Tensor, candidate: torch.Tensor, wanted: torch.Tensor,
                 max_wanted: int) -> torch.Tensor:
    """``[bs, max_wanted]`` int64: each lane's ``wanted`` best candidate pages after the last layer,
    best first, -1 past them; ranked by votes, then the summed bound, then the lower page
    (``voting.select_thoughts``, as ``PageScorer.ranking``)."""
    # Lexicographic (votes desc, weights desc, page asc) by two stable sorts, least significant first.
    order = torch.sort(torch.where(candidate, -weights, torch.inf), dim=1, stable=True).indices
    by_votes = torch.sort(torch.where(candidate, -votes, torch.inf).gather(1, order), dim=1, stable=True).indices
    chosen = order.gather(1, by_votes)[:, :max_wanted]
    ok = (torch.arange(chosen.shape[1], device=votes.device) < wanted[:, None]) & candidate.gather(1, chosen)
    chosen = torch.where(ok, chosen, -1)
    return torch.nn.functional.pad(chosen, (0, max_wanted - chosen.shape[1]), value=-1)
