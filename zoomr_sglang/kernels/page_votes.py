"""The fine levels' per-layer page vote in two launches (Triton), with a dispatcher to the torch reference.

:func:`accumulate_page_votes` adds one layer's Quest-bound votes of every lane of the step
(reference: :func:`zoomr_sglang.algo.page_bounds.accumulate_page_votes`, same arguments, same
votes; the summed bounds agree to float rounding). Both grids are fixed for a captured batch size;
a lane with no pages or nothing wanted returns at once.

1. ``_page_bound_kernel``, grid ``(bs, num_kv_heads, splits)``: a program holds the query rows of
   the GQA group that reads its KV head and walks its share of the lane's pages, ``BLOCK`` at a
   time (block i to split i mod splits): each page's slot (``row_pages``), its min and max keys,
   the group's bounds, summed into ``weights`` (atomics); each head's bounds go to ``scratch`` as
   order-preserving int32 keys (a page that is not a candidate as ``NOT_CANDIDATE``).
2. ``_page_select_kernel``, grid ``(bs, num_heads)``: each head's ``p``-th largest key (``p =
   min(wanted, candidates)``) by bisection over the int32 range, 32 counting passes whatever
   ``p`` is (a per-request budget needs no recompile); then one vote to each page above it and,
   of the pages equal to it, to the lowest until the head has ``p`` (a running count and a
   cumulative sum), as the reference's stable sort does. ``SELECT`` keys a step.

Estimated GPU cost (not measured; no GPU here), 16 requests of 32K tokens (2K pages), 32 query
heads over 8 KV heads of 128 (a Llama-3.1-8B layer): the bound kernel reads 128 MiB of bounds
(1/16 of the batch's KV, Quest's read), about 40 us at 3.35 TB/s in 1,024 programs; the select
kernel's 512 programs each make 35 passes of two 4 KiB steps over keys held in L2, about 70
dependent steps: 50-100 us. About 0.1 ms a layer, 3 ms a step of 32 layers: a radix select (8
passes of 4 bits) would cut the select about four times.
"""

from __future__ import annotations

import torch

from zoomr_sglang.algo.page_bounds import accumulate_page_votes as accumulate_page_votes_torch
from zoomr_sglang.kernels.kv_indices import tl, triton, triton_available, triton_interpreted

BLOCK_PAGES = 16  # pages per block of the bound kernel (fewer for large GQA groups, see TILE_ELEMENTS)
TILE_ELEMENTS = 8192  # products a bound program holds per step: GQA group x pages x head_dim
PAGE_SPLITS = 8  # bound programs sharing a lane's page blocks, per KV head (a guess, not tuned on a GPU)
SELECT_PAGES = 1024  # keys a select program reads per step (8 a thread at 4 warps)
NOT_CANDIDATE = -(2**31)  # below the key of every float, -inf included


if triton is not None:

    _NOT_CANDIDATE = tl.constexpr(NOT_CANDIDATE)

    @triton.jit
    def _page_bound_kernel(
        query, stride_qb, stride_qh,  # [bs, num_heads, head_dim]
        lows, highs, stride_bs, stride_bh,  # [n_slots, num_kv_heads, head_dim] each (min, max keys)
        row_pages, stride_rp,  # [n_rows, >= max_pages] int32
        rows, num_pages, wanted,  # [bs] int64
        candidate, stride_cb,  # [bs, max_pages] uint8
        weights, stride_w,  # [bs, max_pages] float32
        scratch, stride_sb, stride_sh,  # [bs, num_heads, max_pages] int32
        host_bound,  # max_pages, a host int (loop bound when BOUND_ON_HOST)
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
        BLOCK: tl.constexpr, BOUND_ON_HOST: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)  # this program's share of the page blocks: block i to split i mod splits
        splits = tl.num_programs(2)
        n = tl.load(num_pages + b)
        row = tl.load(rows + b)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        # Triton 3.6's interpreter cannot loop to a loaded bound; compiled kernels loop to n.
        if BOUND_ON_HOST:
            bound = host_bound
        else:
            bound = n
        if (n > 0) & (tl.load(wanted + b) > 0):
            heads = kv_head * GROUP + g
            q = tl.load(query + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            for start in range(0, bound, BLOCK):
                if (start // BLOCK) % splits == split:
                    c = start + tl.arange(0, BLOCK)
                    c_in = c < n
                    cand = c_in & (tl.load(candidate + b * stride_cb + c, mask=c_in, other=0) != 0)
                    slot = tl.load(row_pages + row * stride_rp + c, mask=cand, other=0).to(tl.int64)
                    page = slot[:, None] * stride_bs + kv_head * stride_bh + d[None, :]
                    ok = cand[:, None] & d_ok[None, :]
                    low = tl.load(lows + page, mask=ok, other=0.0).to(tl.float32)
                    high = tl.load(highs + page, mask=ok, other=0.0).to(tl.float32)
                    score = tl.sum(tl.maximum(q[:, None, :] * low[None, :, :], q[:, None, :] * high[None, :, :]),
                                   axis=2)  # [GROUP_P2, BLOCK]
                    use = g_ok[:, None] & cand[None, :]
                    tl.atomic_add(weights + b * stride_w + c, tl.sum(tl.where(use, score, 0.0), axis=0), mask=cand)
                    # Order-preserving int32 keys: negative floats' magnitude bits flipped; -0.0 as +0.0.
                    bits = score.to(tl.int32, bitcast=True)
                    key = tl.where(score == 0.0, 0, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits))
                    tl.store(scratch + b * stride_sb + heads[:, None] * stride_sh + c[None, :],
                             tl.where(use, key, _NOT_CANDIDATE), mask=g_ok[:, None] & c_in[None, :])

    @triton.jit
    def _page_select_kernel(
        num_pages, wanted,  # [bs] int64
        votes, stride_v,  # [bs, max_pages] float32
        scratch, stride_sb, stride_sh,  # [bs, num_heads, max_pages] int32 (the bound kernel's keys)
        host_bound,  # max_pages, a host int (loop bound when BOUND_ON_HOST)
        SELECT: tl.constexpr, BOUND_ON_HOST: tl.constexpr,
    ):
        b = tl.program_id(0)
        head = tl.program_id(1)
        n = tl.load(num_pages + b)
        lane_wanted = tl.load(wanted + b)
        if BOUND_ON_HOST:
            bound = host_bound
        else:
            bound = n
        if (n > 0) & (lane_wanted > 0):
            keys = scratch + b * stride_sb + head * stride_sh
            candidates = tl.full([], 0, tl.int32)
            for start in range(0, bound, SELECT):
                c = start + tl.arange(0, SELECT)
                key = tl.load(keys + c, mask=c < n, other=_NOT_CANDIDATE)
                candidates += tl.sum((key != _NOT_CANDIDATE).to(tl.int32), axis=0)
            p = tl.minimum(lane_wanted, candidates).to(tl.int32)
            # The largest t with at least p keys >= t (bisection over the int32 range); every
            # candidate's key is above NOT_CANDIDATE + 1.
            low_t = tl.full([], _NOT_CANDIDATE + 1, tl.int64)
            high_t = tl.full([], 2**31 - 1, tl.int64)
            for _ in range(32):
                mid = (low_t + high_t + 1) >> 1
                at_least = tl.full([], 0, tl.int32)
                for start in range(0, bound, SELECT):
                    c = start + tl.arange(0, SELECT)
                    key = tl.load(keys + c, mask=c < n, other=_NOT_CANDIDATE).to(tl.int64)
                    at_least += tl.sum((key >= mid).to(tl.int32), axis=0)
                enough = at_least >= p
                low_t = tl.where(enough, mid, low_t)
                high_t = tl.where(enough, high_t, mid - 1)
            above = tl.full([], 0, tl.int32)
            for start in range(0, bound, SELECT):
                c = start + tl.arange(0, SELECT)
                key = tl.load(keys + c, mask=c < n, other=_NOT_CANDIDATE).to(tl.int64)
                above += tl.sum((key > low_t).to(tl.int32), axis=0)
            ties_taken = p - above  # keys equal to the threshold that still get a vote, lowest page first
            ties_seen = tl.full([], 0, tl.int32)
            for start in range(0, bound, SELECT):
                c = start + tl.arange(0, SELECT)
                c_in = c < n
                key = tl.load(keys + c, mask=c_in, other=_NOT_CANDIDATE).to(tl.int64)
                tie = (key == low_t).to(tl.int32)
                voted = (key > low_t) | ((tie > 0) & (ties_seen + tl.cumsum(tie, axis=0) <= ties_taken))
                voted = voted & (key != _NOT_CANDIDATE)
                tl.atomic_add(votes + b * stride_v + c, voted.to(tl.float32), mask=c_in & voted)
                ties_seen += tl.sum(tie, axis=0)

else:  # pragma: no cover
    _page_bound_kernel = None
    _page_select_kernel = None


def page_vote_scratch(bs: int, num_heads: int, max_pages: int, device) -> torch.Tensor:
    """The kernel's key buffer ``[bs, num_heads, max_pages]`` int32 (allocated once, with the votes)."""
    return torch.empty(bs, num_heads, max_pages, dtype=torch.int32, device=device)


def accumulate_page_votes_triton(query, lows, highs, row_pages, rows, num_pages, candidate, wanted, votes, weights, *,
                                 scratch: torch.Tensor) -> None:
    """Triton version of :func:`zoomr_sglang.algo.page_bounds.accumulate_page_votes`; ``num_pages``
    ``[bs]`` int64: complete pages per lane (``candidate`` is False from there on); ``scratch``
    from :func:`page_vote_scratch`. One launch, no host sync."""
    if not triton_available():
        raise RuntimeError("triton is not installed")
    bs, max_pages = votes.shape
    _, num_heads, head_dim = query.shape
    num_kv_heads = lows.shape[1]
    if bs == 0:
        return
    for name, t in (("votes", votes), ("weights", weights)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous float32 in its last dimension, got {t.dtype}, strides {t.stride()}")
    if scratch.dtype != torch.int32 or scratch.stride(-1) != 1:
        raise ValueError("scratch must be int32, contiguous in its last dimension")
    if query.stride(-1) != 1 or lows.stride(-1) != 1 or row_pages.stride(-1) != 1 or candidate.stride(-1) != 1:
        raise ValueError("query, lows, highs, row_pages and candidate must be contiguous in their last dimension")
    if lows.shape != highs.shape or lows.stride() != highs.stride():
        raise ValueError(f"lows and highs must have one shape and strides, got {tuple(lows.shape)} {lows.stride()}"
                         f" and {tuple(highs.shape)} {highs.stride()}")
    group_p2, dim_p2 = triton.next_power_of_2(num_heads // num_kv_heads), triton.next_power_of_2(head_dim)
    block = max(1, min(BLOCK_PAGES, TILE_ELEMENTS // (group_p2 * dim_p2)))
    splits = min(PAGE_SPLITS, -(-max_pages // block))
    interpreted = triton_interpreted()
    _page_bound_kernel[(bs, num_kv_heads, splits)](
        query, query.stride(0), query.stride(1),
        lows, highs, lows.stride(0), lows.stride(1),
        row_pages, row_pages.stride(0),
        rows, num_pages, wanted,
        candidate.view(torch.uint8), candidate.stride(0),
        weights, weights.stride(0),
        scratch, scratch.stride(0), scratch.stride(1),
        max_pages,
        GROUP=num_heads // num_kv_heads, GROUP_P2=group_p2, HEAD_DIM=head_dim, DIM_P2=dim_p2, BLOCK=block,
        BOUND_ON_HOST=interpreted, num_warps=4,
    )
    _page_select_kernel[(bs, num_heads)](
        num_pages, wanted, votes, votes.stride(0), scratch, scratch.stride(0), scratch.stride(1), max_pages,
        SELECT=min(SELECT_PAGES, triton.next_power_of_2(max_pages)), BOUND_ON_HOST=interpreted, num_warps=4,
    )


def accumulate_page_votes(query, lows, highs, row_pages, rows, num_pages, candidate, wanted, votes, weights, *,
                          max_wanted: int, scratch: torch.Tensor) -> None:
    """Add one layer's page votes of every lane (arguments: the torch reference's, plus
    ``num_pages`` and ``scratch``). Triton on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1``; the torch reference otherwise."""
    if triton_available() and (votes.is_cuda or triton_interpreted()):
        accumulate_page_votes_triton(query, lows, highs, row_pages, rows, num_pages, candidate, wanted, votes,
                                     weights, scratch=scratch)
    else:
        accumulate_page_votes_torch(query, lows, highs, row_pages, rows, candidate, wanted, votes, weights,
                                    max_wanted=max_wanted)
