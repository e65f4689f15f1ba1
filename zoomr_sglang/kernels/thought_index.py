"""ZoomR's per-layer index work in one launch each (Triton), with dispatchers to the torch references.

* :func:`commit_keys`: add the keys of this step's newly segmented tokens to their index entries
  (reference: ``IndexKeyStore.add``). One program per commit slot; slots past the step's count
  (read from the device) do nothing, so the buffers can keep a fixed size inside a CUDA graph.
* :func:`accumulate_votes`: every voting request's scores and votes (reference:
  :func:`zoomr_sglang.algo.batched_votes.accumulate_votes`, same arguments, same result).

The vote kernel's grid is ``(voter slots, KV heads, splits)``; a program of a slot with no candidates
returns at once, so the launch keeps a fixed size inside a CUDA graph. A program holds the query rows
of the GQA group that reads its KV head and walks its voter's candidates in blocks of ``BLOCK`` (16;
fewer for large groups, so that a step's products ``[group, BLOCK, head_dim]`` stay within
``TILE_ELEMENTS``): the group's scores against the block's mean keys, then the mass (or, for count
votes, the summed score) added to ``weights`` with atomics. A mass voter's blocks are dealt out over
the ``splits`` programs (block i to split i mod splits) and its summaries are scored key by key: the
block's scored tokens (each summary's first ``width``) are numbered one after another and scored
``TOKENS`` at a time (16 for a group of 4 at head_dim 128) whatever summary they belong to, so a
10-token summary costs 10 keys and a candidate without a summary none. A count voter has one program
per KV head (split 0): each head's top-k needs all its scores, which it stores in a scratch buffer and
reads back, so every pass compares the same floats.

Estimated GPU cost (not measured; compiled here for sm_90a, ptxas reports at most 128 registers a
thread and no spills for groups of 3 to 16 at head_dim 64-256, so four 4-warp programs fit on an
SM): batch 64 with every request casting a mass vote over 64 candidates with 10-token summaries, 8
KV heads of 128 (a Llama-3.1-8B layer): 64 x 8 x 4 = 2048 programs, each one block: one mean-key
step and 10 summary steps of two dependent loads (slots, then keys), about 10-15 us of memory
latency, in 4 waves on 132 SMs: roughly 30-60 us per voting layer, for 84 MB of summary keys (25 us
at 3.35 TB/s). A step in which a few requests vote runs one wave: about 10-15 us per layer; count
votes, 4 blocks and the top-k passes per program, about as much. The previous kernel (one program
per voter, serial over KV heads, blocks and tokens) was estimated at 0.5-1 ms per layer.
"""

from __future__ import annotations

import torch

from zoomr_sglang.algo.batched_votes import COUNT, MASS, SummaryKeys
from zoomr_sglang.algo.batched_votes import accumulate_votes as accumulate_votes_torch
from zoomr_sglang.kernels.kv_indices import tl, triton, triton_available, triton_interpreted

BLOCK_CANDIDATES = 16  # candidates per block of a vote program (fewer for large GQA groups, see TILE_ELEMENTS)
CANDIDATE_SPLITS = 4  # programs sharing a mass voter's candidate blocks, per KV head (a guess, not tuned on a GPU)
TILE_ELEMENTS = 8192  # products a vote program holds per step: GQA group x (candidates or summary keys) x head_dim


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    TILE = tl.constexpr(TILE_ELEMENTS)

    @triton.jit
    def _summary_mass(q, head_lse, mean_mass, row_spans, stride_pc, c, c_ok, row_slots, head_keys, stride_kb,
                      g_ok, d, d_ok, scaling, width, BLOCK: tl.constexpr, TOKENS: tl.constexpr,
                      BOUND_ON_HOST: tl.constexpr):
        """[BLOCK] mass the group's heads (q [GROUP_P2, DIM_P2]) give a block of candidates' summaries,
        summed over the heads: each summary's first ``width`` keys (scaled up to its length);
        ``mean_mass`` for candidates without a summary.

        The block's scored tokens are numbered one after another, candidate by candidate, and scored
        ``TOKENS`` at a time whatever summary they belong to: no work on padding or missing summaries."""
        start = tl.load(row_spans + c * stride_pc, mask=c_ok, other=0)
        length = tl.load(row_spans + c * stride_pc + 1, mask=c_ok, other=0)
        scored = tl.minimum(length, width)
        ends = tl.cumsum(scored, axis=0)  # [BLOCK]: one past each candidate's last token in the numbering
        total = tl.sum(scored, axis=0)
        if BOUND_ON_HOST:
            bound = BLOCK * width
        else:
            bound = total
        shift = start - (ends - scored)  # [BLOCK]: a token's position in its row minus its number
        column = tl.arange(0, BLOCK)
        token_mass = tl.zeros([BLOCK], tl.float32)
        for first in range(0, bound, TOKENS):
            if first < total:  # false only past the block's tokens, under the interpreter's host bound
                token = first + tl.arange(0, TOKENS)
                t_ok = token < total
                owner = tl.sum((token[:, None] >= ends[None, :]).to(tl.int32), axis=1)  # [TOKENS]: its candidate
                mine = owner[:, None] == column[None, :]  # [TOKENS, BLOCK]
                position = token + tl.sum(tl.where(mine, shift[None, :], 0), axis=1)
                slot = tl.load(row_slots + position, mask=t_ok, other=0).to(tl.int64)
                key = tl.load(head_keys + slot[:, None] * stride_kb + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                              other=0.0).to(tl.float32)
                score = tl.sum(q[:, None, :] * key[None, :, :], axis=2)  # [GROUP_P2, TOKENS]
                mass = tl.exp(score * scaling - head_lse[:, None])
                mass = tl.sum(tl.where(g_ok[:, None] & t_ok[None, :], mass, 0.0), axis=0)  # [TOKENS], over heads
                token_mass += tl.sum(tl.where(mine, mass[:, None], 0.0), axis=0)
        scale = length.to(tl.float32) / tl.maximum(scored, 1).to(tl.float32)
        return tl.where(length > 0, token_mass * scale, mean_mass)

    @triton.jit
    def _top_k_votes(head_scores, voter_votes, n, bound, g_ok, GROUP_P2: tl.constexpr, BLOCK: tl.constexpr,
                     TOPK: tl.constexpr):
        """One vote to each head's top-k of the ``n`` scores at ``head_scores`` ([GROUP_P2, 1] pointers),
        by (score desc, candidate asc); every pass reads back the same stored floats."""
        prev_score = tl.full([GROUP_P2], float("inf"), tl.float32)
        prev_index = tl.full([GROUP_P2], -1, tl.int64)
        for _ in tl.static_range(TOPK):
            best_score = tl.full([GROUP_P2], float("-inf"), tl.float32)
            best_index = tl.full([GROUP_P2], 1 << 40, tl.int64)
            for start in range(0, bound, BLOCK):
                c = (start + tl.arange(0, BLOCK)).to(tl.int64)
                ok = g_ok[:, None] & (c < n)[None, :]
                score = tl.load(head_scores + c[None, :], mask=ok, other=float("-inf"))
                after = (score < prev_score[:, None]) | (
                    (score == prev_score[:, None]) & (c[None, :] > prev_index[:, None]))
                ok = ok & after
                block_best = tl.max(tl.where(ok, score, float("-inf")), axis=1)
                block_index = tl.min(tl.where(ok & (score == block_best[:, None]), c[None, :], 1 << 40), axis=1)
                better = (block_best > best_score) | ((block_best == best_score) & (block_index < best_index))
                best_score = tl.where(better, block_best, best_score)
                best_index = tl.where(better, block_index, best_index)
            found = g_ok & (best_index < n)
            tl.atomic_add(voter_votes + best_index, tl.full([GROUP_P2], 1.0, tl.float32), mask=found)
            prev_score = best_score
            prev_index = best_index

    @triton.jit
    def _vote_kernel(
        query, stride_qb, stride_qh,  # [bs, num_heads, head_dim]
        lse, stride_lb,  # [bs, num_heads] float32
        sums, stride_se, stride_sk,  # [n_entries, num_kv_heads, head_dim] float32
        counts,  # [n_entries] float32
        candidates, stride_cr,  # [n_rows, max_candidates] int
        voter_rows, voter_batch, num_candidates, vote_kind,  # [n_voters] int64
        spans, stride_pr, stride_pc,  # [n_rows, max_candidates, 2] int32: summary start, length
        req_to_token, stride_rr,  # [n_rows, max_len] int32
        key_buffer, stride_kb, stride_kh,  # [n_slots, num_kv_heads, head_dim]
        votes, weights, stride_v,  # [n_voters, max_candidates] float32
        scratch, stride_sv, stride_sh,  # [n_voters, num_heads, max_candidates] float32 (count votes)
        scaling,
        host_bound,  # max_candidates, a host int (loop bound when BOUND_ON_HOST)
        width,  # summary tokens scored per candidate (a host int; BLOCK * width: the token loop's host bound)
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
        BLOCK: tl.constexpr, TOPK: tl.constexpr, BOUND_ON_HOST: tl.constexpr,
        MASS_KIND: tl.constexpr, COUNT_KIND: tl.constexpr,
    ):
        v = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)  # mass votes: this program's share of the candidate blocks
        splits = tl.num_programs(2)
        n = tl.load(num_candidates + v)
        row = tl.load(voter_rows + v)
        b = tl.load(voter_batch + v)
        kind = tl.load(vote_kind + v)
        is_count = kind == COUNT_KIND
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        TOKENS: tl.constexpr = (TILE + GROUP_P2 * DIM_P2 - 1) // (GROUP_P2 * DIM_P2)  # summary keys per step, >= 1
        # Triton 3.6's interpreter cannot loop to a loaded bound; compiled kernels loop to n.
        if BOUND_ON_HOST:
            bound = host_bound
        else:
            bound = n
        # An unused voter slot does nothing; a count vote's top-k needs all of a head's scores: one split.
        if (n > 0) & ((split == 0) | (kind != COUNT_KIND)):
            heads = kv_head * GROUP + g
            q = tl.load(query + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            head_lse = tl.load(lse + b * stride_lb + heads, mask=g_ok, other=0.0)
            for start in range(0, bound, BLOCK):
                if is_count | ((start // BLOCK) % splits == split):
                    c = start + tl.arange(0, BLOCK)
                    c_ok = c < n
                    entry = tl.load(candidates + row * stride_cr + c, mask=c_ok, other=0).to(tl.int64)
                    count = tl.maximum(tl.load(counts + entry, mask=c_ok, other=1.0), 1.0)
                    key = tl.load(sums + entry[:, None] * stride_se + kv_head * stride_sk + d[None, :],
                                  mask=c_ok[:, None] & d_ok[None, :], other=0.0) / count[:, None]
                    score = tl.sum(q[:, None, :] * key[None, :, :], axis=2)  # [GROUP_P2, BLOCK]
                    mass = tl.exp(score * scaling + tl.log(count)[None, :] - head_lse[:, None])
                    added = tl.where(is_count, score, mass)
                    added = tl.sum(tl.where(g_ok[:, None] & c_ok[None, :], added, 0.0), axis=0)  # [BLOCK]
                    if kind == MASS_KIND:
                        added = _summary_mass(q, head_lse, added, spans + row * stride_pr, stride_pc, c, c_ok,
                                              req_to_token + row * stride_rr, key_buffer + kv_head * stride_kh,
                                              stride_kb, g_ok, d, d_ok, scaling, width, BLOCK, TOKENS, BOUND_ON_HOST)
                    tl.atomic_add(weights + v * stride_v + c, added, mask=c_ok)
                    if is_count:
                        tl.store(scratch + v * stride_sv + heads[:, None] * stride_sh + c[None, :], score,
                                 mask=g_ok[:, None] & c_ok[None, :])
            if is_count:
                tl.debug_barrier()  # the scores one thread stored are read back by others
                _top_k_votes(scratch + v * stride_sv + heads[:, None] * stride_sh, votes + v * stride_v, n, bound,
                             g_ok, GROUP_P2, BLOCK, TOPK)

    @triton.jit
    def _commit_kernel(
        keys, stride_ks,  # [n_slots, num_kv_heads * head_dim] (one layer's key buffer)
        slots, entries, num_commits,  # [n] int64 each, and a [1] int64 count
        sums, stride_se,  # [n_entries, num_kv_heads * head_dim] float32
        counts,  # [n_entries] float32
        WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr,
    ):
        i = tl.program_id(0)
        active = i < tl.load(num_commits)
        slot = tl.load(slots + i, mask=active, other=0)
        entry = tl.load(entries + i, mask=active, other=0)
        offs = tl.arange(0, WIDTH_P2)
        ok = active & (offs < WIDTH)
        key = tl.load(keys + slot * stride_ks + offs, mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(sums + entry * stride_se + offs, key, mask=ok)
        tl.atomic_add(counts + entry, 1.0, mask=active)

else:  # pragma: no cover
    _vote_kernel = None
    _commit_kernel = None


def _use_triton(t: torch.Tensor) -> bool:
    return triton_available() and (t.is_cuda or triton_interpreted())


def commit_keys(store_sums: torch.Tensor, store_counts: torch.Tensor, key_buffer: torch.Tensor,
                slots: torch.Tensor, entries: torch.Tensor, num_commits: torch.Tensor) -> None:
    """Add ``key_buffer[slots[j]]`` to entry ``entries[j]`` for ``j < num_commits``.

    Args:
        store_sums: ``[n_entries, num_kv_heads, head_dim]`` float32 (one layer of the store);
            store_counts ``[n_entries]`` float32.
        key_buffer: ``[n_slots, num_kv_heads, head_dim]``, the layer's cached keys.
        slots, entries: ``[n]`` int64 (views of any stride); num_commits: ``[1]`` int64 on the
            device (Triton) or any tensor whose value the caller already sliced ``slots``/``entries``
            to (torch).
    """
    if _use_triton(store_sums):
        n = slots.shape[0]
        if n == 0:
            return
        # The kernel reads element i at base + i: a column of the load's [n, 3] commits is strided.
        slots, entries = slots.contiguous(), entries.contiguous()
        width = key_buffer.shape[1] * key_buffer.shape[2]
        if key_buffer.stride(2) != 1 or key_buffer.stride(1) != key_buffer.shape[2] or store_sums.stride(1) != store_sums.shape[2]:
            raise ValueError("commit_keys needs each slot's keys and each entry's sums contiguous")
        _commit_kernel[(n,)](
            key_buffer, key_buffer.stride(0), slots, entries, num_commits, store_sums, store_sums.stride(0),
            store_counts, WIDTH=width, WIDTH_P2=_next_power_of_2(width), num_warps=4,
        )
        return
    store_sums.index_add_(0, entries, key_buffer.index_select(0, slots).to(torch.float32))
    store_counts.index_add_(0, entries, torch.ones_like(entries, dtype=torch.float32))


def vote_scratch(n_voters: int, num_heads: int, max_candidates: int, device) -> torch.Tensor:
    """The kernel's score buffer for count votes, ``[n_voters, num_heads, max_candidates]`` float32."""
    return torch.empty(n_voters, num_heads, max_candidates, dtype=torch.float32, device=device)


def accumulate_votes_triton(query, log_normalizer, sums, counts, candidates, voter_rows, voter_batch,
                            num_candidates, vote_kind, votes, weights, *, scaling: float, topk: int,
                            summary: SummaryKeys, scratch: torch.Tensor) -> None:
    """Triton version of :func:`zoomr_sglang.algo.batched_votes.accumulate_votes`; ``scratch`` from
    :func:`vote_scratch`. One launch, no host sync."""
    if not triton_available():
        raise RuntimeError("triton is not installed")
    n_voters, max_candidates = votes.shape
    _, num_heads, head_dim = query.shape
    num_kv_heads = sums.shape[1]
    group = num_heads // num_kv_heads
    if n_voters == 0:
        return
    for name, t in (("sums", sums), ("votes", votes), ("weights", weights), ("scratch", scratch)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous float32 in its last dimension, got {t.dtype}, strides {t.stride()}")
    if query.stride(-1) != 1 or candidates.stride(-1) != 1 or weights.stride() != votes.stride():
        raise ValueError("query and candidates must be contiguous in their last dimension, votes and weights alike")
    spans, req_to_token, key_buffer = summary.spans, summary.req_to_token, summary.key_buffer
    if spans.stride(-1) != 1 or req_to_token.stride(-1) != 1 or key_buffer.stride(-1) != 1:
        raise ValueError("summary spans, req_to_token and key_buffer must be contiguous in their last dimension")
    group_p2, dim_p2 = _next_power_of_2(group), _next_power_of_2(head_dim)
    block = max(1, min(BLOCK_CANDIDATES, TILE_ELEMENTS // (group_p2 * dim_p2)))  # ptxas: 128 registers, no spill
    splits = min(CANDIDATE_SPLITS, -(-max_candidates // block))
    _vote_kernel[(n_voters, num_kv_heads, splits)](
        query, query.stride(0), query.stride(1),
        log_normalizer, log_normalizer.stride(0),
        sums, sums.stride(0), sums.stride(1),
        counts,
        candidates, candidates.stride(0),
        voter_rows, voter_batch, num_candidates, vote_kind,
        spans, spans.stride(0), spans.stride(1),
        req_to_token, req_to_token.stride(0),
        key_buffer, key_buffer.stride(0), key_buffer.stride(1),
        votes, weights, votes.stride(0),
        scratch, scratch.stride(0), scratch.stride(1),
        float(scaling), max_candidates, summary.width,
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, DIM_P2=dim_p2, BLOCK=block, TOPK=topk,
        BOUND_ON_HOST=triton_interpreted(), MASS_KIND=MASS, COUNT_KIND=COUNT, num_warps=4,
    )


def accumulate_votes(query, log_normalizer, sums, counts, candidates, voter_rows, voter_batch, num_candidates,
                     vote_kind, votes, weights, *, scaling: float, topk: int, summary: SummaryKeys,
                     scratch: torch.Tensor, kinds=(True, True, True)) -> None:
    """Add one layer's votes of every voter slot (arguments: the torch reference's). Triton on CUDA
    tensors, or on CPU tensors under ``TRITON_INTERPRET=1``; the torch reference otherwise."""
    if _use_triton(votes):
        accumulate_votes_triton(query, log_normalizer, sums, counts, candidates, voter_rows, voter_batch,
                                num_candidates, vote_kind, votes, weights, scaling=scaling, topk=topk,
                                summary=summary, scratch=scratch)
    else:
        accumulate_votes_torch(query, log_normalizer, sums, counts, candidates, voter_rows, voter_batch,
                               num_candidates, vote_kind, votes, weights, scaling=scaling, topk=topk,
                               summary=summary, kinds=kinds)
