"""The fine levels' page votes for every request of a decode step at once: the torch reference.

:class:`~zoomr_sglang.algo.page_scores.PageScorer` keeps one request's Quest bounds (per layer and
KV head, the element-wise min and max key of each complete :data:`PAGE_TOKENS`-token page) on the
host and lets each (layer, query head) vote for its top pages. Here the same bounds and the same
vote live on the device for a whole batch, with no Python loop over requests and no host read, so
the calls serve the CPU path and the CUDA-graph path alike; ``kernels/page_votes.py`` is the Triton
version of :func:`accumulate_page_votes`. docs/fine-levels.md has the design.

Shapes: ``bs`` voting lanes (a lane with no candidate casts nothing), ``max_pages`` page columns per
lane (column = page number in the request), ``n_commits`` page commits, ``n_slots`` KV slots.

Where the bounds live: one KV slot of the cache per page, the min key in the layer's K buffer and
the max key in its V buffer (a slot holds ``num_kv_heads x head_dim`` of each: one page's bounds,
in the cache's dtype, which holds a min or max exactly, being one of the keys). ``row_pages[row,
page]`` names the slot. The engine takes the slots from the pool's allocator (docs/fine-levels.md,
"Sizing"), so a page whose KV moves to the host keeps its bounds on the device.
"""

from __future__ import annotations

import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE

PAGE_TOKENS = QUEST_PAGE_SIZE  # positions per page (SGLang's pool on this path has page_size 1)


def commit_page_bounds(lows: torch.Tensor, highs: torch.Tensor, key_buffer: torch.Tensor,
                       req_to_token: torch.Tensor, commits: torch.Tensor) -> None:
    """Write the bounds of the pages in ``commits`` from one layer's cached keys.

    Args:
        lows, highs: ``[n_slots, num_kv_heads, head_dim]``, the layer's K and V buffers (a page's
            min key goes to ``lows[slot]``, its max key to ``highs[slot]``).
        key_buffer: ``[n_slots, num_kv_heads, head_dim]``, the layer's cached keys (this step's
            already written: call after the layer's KV write); ``lows`` itself on the engine.
        req_to_token: ``[n_rows, max_len]`` int, the KV slot of each position.
        commits: ``[n_commits, 3]`` int64 (row, page, slot), fixed size; a padding commit is
            ``(0, 0, 0)``: it reads row 0's first page and writes only slot 0, SGLang's padding slot.
    """
    positions = commits[:, 1:2] * PAGE_TOKENS + torch.arange(PAGE_TOKENS, device=commits.device)
    keys = key_buffer.index_select(0, req_to_token[commits[:, :1], positions].reshape(-1).long())
    keys = keys.reshape(len(commits), PAGE_TOKENS, *key_buffer.shape[1:])
    low, high = keys.amin(dim=1).to(lows.dtype), keys.amax(dim=1).to(highs.dtype)  # read before either write
    lows.index_copy_(0, commits[:, 2], low)
    highs.index_copy_(0, commits[:, 2], high)


def candidate_pages(range_batch: torch.Tensor, range_start: torch.Tensor, range_length: torch.Tensor,
                    num_pages: torch.Tensor, max_pages: int) -> torch.Tensor:
    """``[bs, max_pages]`` bool: each lane's pages below ``num_pages`` (those with bounds) that the
    step's working set does not cover whole (the pages a vote ranks); once per step, on the device,
    fixed shapes.

    range_batch, range_start, range_length: ``[n_ranges]`` int64, each attended range's lane,
    first position and length (a range of lane ``bs`` or more is padding); num_pages: ``[bs]``
    int64 (0: the lane does not vote).
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
    page = torch.arange(max_pages, device=num_pages.device)[None, :]
    return (page < num_pages[:, None]) & ~covered


def page_upper_bounds(query: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor, row_pages: torch.Tensor,
                      rows: torch.Tensor, max_pages: int) -> torch.Tensor:
    """Quest's bound ``sum_d max(q_d * min_d, q_d * max_d)`` ``[bs, num_heads, max_pages]`` float32
    of each lane's query ``[bs, num_heads, head_dim]`` over the keys of its pages 0..max_pages-1
    (lows, highs: one layer's bound buffers; rows ``[bs]`` int64: each lane's pool row). Query head
    h reads KV head h // (num_heads // num_kv_heads) (GQA). As ``lows <= highs``, each term is
    ``q_d * max_d`` where ``q_d >= 0`` and ``q_d * min_d`` where not: two matrix products, the same
    float32 terms as ``page_scores.quest_upper_bound`` summed in another order, without its
    ``[bs, heads, pages, head_dim]`` product (most of the CPU page vote's time)."""
    bs, num_heads, head_dim = query.shape
    num_kv_heads = lows.shape[1]
    slots = row_pages[:, :max_pages].index_select(0, rows).long().reshape(-1)
    q = query.float().reshape(bs, num_kv_heads, num_heads // num_kv_heads, head_dim)

    def per_head(buffer):  # [bs, kv, d, pages], each head's [pages, d] contiguous: one batched product
        gathered = buffer.index_select(0, slots).float().reshape(bs, max_pages, num_kv_heads, head_dim)
        return gathered.transpose(1, 2).contiguous().transpose(2, 3)

    bound = q.clamp(min=0) @ per_head(highs) + q.clamp(max=0) @ per_head(lows)
    return bound.reshape(bs, num_heads, max_pages)


def accumulate_page_votes(query: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor, row_pages: torch.Tensor,
                          rows: torch.Tensor, candidate: torch.Tensor, wanted: torch.Tensor, votes: torch.Tensor,
                          weights: torch.Tensor, *, max_wanted: int) -> None:
    """Add one layer's page votes of every lane to ``votes`` and ``weights`` in place.

    Each query head gives one vote to each of its ``min(wanted, candidates)`` best candidate pages
    by the bound (ties to the lower page); ``weights`` sums every head's bound of every candidate.
    These are ``voting.head_votes``' votes and score sums, as ``PageScorer`` adds them per layer.

    Args:
        query: ``[bs, num_heads, head_dim]``, post-RoPE like the cached keys.
        lows, highs, row_pages, rows: as for :func:`page_upper_bounds`.
        candidate: ``[bs, max_pages]`` bool (:func:`candidate_pages`).
        wanted: ``[bs]`` int64, pages each lane zooms into (its heads' top-k); at most ``max_wanted``.
        votes, weights: ``[bs, max_pages]`` float32 accumulators.
        max_wanted: a host int, the largest ``wanted`` (the sort is cut there).
    """
    bs, max_pages = votes.shape
    scores = page_upper_bounds(query, lows, highs, row_pages, rows, max_pages)
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
