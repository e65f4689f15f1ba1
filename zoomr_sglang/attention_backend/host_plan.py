"""A decode step as the host plans it (:class:`HostPlan`) and the packing of its ranges.

A request attends ranges that change little from step to step (a policy's fixed ranges, until a
thought closes or the selection changes) plus a recent tail that grows by one token. The planner
keeps each request's fixed ranges packed (:func:`request_block`) and builds the batch's ranges from
those blocks and the tails in a handful of numpy calls (:class:`BatchRanges`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import List, Tuple

import numpy as np
import torch

from zoomr_sglang.attention_backend.request_state import RequestState


@dataclass
class HostPlan:
    """One decode step, planned on the host (all arrays on the CPU).

    Shapes: ``bs`` requests, ``n_ranges`` attended position ranges over the batch, ``n_commits``
    keys to add to index entries.

    kv_indptr ``[bs + 1]`` int32: request i attends ``kv_indptr[i + 1] - kv_indptr[i]`` KV tokens;
    ranges ``[n_ranges, 4]`` int64: (pool row, start, length, output offset) per range, in request
    order except for the recent tails, after all the others (:class:`BatchRanges`); commits
    ``[n_commits, 3]`` int64: (pool row, position, entry); fresh_entries: entries handed out this
    step (zeroed on the device before any key is added); new_candidates ``[m, 5]`` int64: (pool
    row, column, entry, summary start, summary length) appended to the rows' candidate tables;
    votes ``[bs, 4]`` int64 per request: (pool row, candidates a vote would rank, 0 if it cannot
    vote; its vote kind, an index into ``VOTE_KINDS``; 1 if the host asks it to vote this step
    whatever token it decodes).
    """

    rows: List[int]
    seq_lens: List[int]
    states: List[RequestState]
    kv_indptr: torch.Tensor
    ranges: np.ndarray
    commits: np.ndarray
    fresh_entries: List[int]
    new_candidates: np.ndarray
    votes: np.ndarray
    observers: List[Tuple[int, RequestState, np.ndarray]] = field(default_factory=list)
    self_check: bool = False
    fidelity_rows: List[int] = field(default_factory=list)  # batch indices measuring zoomr_fidelity
    failed: List[Tuple[object, str]] = field(default_factory=list)  # (Req, message): requests to abort

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def needs_eager(self) -> bool:
        """Per-layer Python work (baseline observers, self-checks, fidelity) cannot replay in a graph."""
        return bool(self.observers) or self.self_check or bool(self.fidelity_rows)

    @cached_property
    def working_sets(self) -> List[np.ndarray]:
        """Per request its ``[n, 2]`` position ranges, ascending (diagnostics and tests read them)."""
        ranges = self.ranges[np.argsort(self.ranges[:, 3], kind="stable")]
        request = np.searchsorted(self.kv_indptr.numpy(), ranges[:, 3], side="right") - 1
        spans = np.stack([ranges[:, 1], ranges[:, 1] + ranges[:, 2]], axis=1)
        return np.split(spans, np.searchsorted(request, np.arange(1, self.batch_size)))


def request_block(row: int, fixed: np.ndarray) -> Tuple[np.ndarray, int]:
    """``fixed`` ``[n, 2]`` as ranges ``[n, 4]`` (row, start, length, offset within the request),
    and their size."""
    lengths = fixed[:, 1] - fixed[:, 0]
    ends = np.cumsum(lengths)
    block = np.stack([np.full(len(fixed), row, dtype=np.int64), fixed[:, 0], lengths, ends - lengths], axis=1)
    return block, int(ends[-1]) if len(ends) else 0


def table(flat: List[int], width: int) -> np.ndarray:
    """``[len(flat) // width, width]`` int64 of the row-major values ``flat``."""
    return np.array(flat, dtype=np.int64).reshape(-1, width)


class BatchRanges:
    """``[n_ranges, 4]`` (row, start, length, output offset) of a batch, step after step: every
    request's fixed ranges (its block, :func:`request_block`) moved to where its request starts in
    the output, then the tails (flat, already placed). The KV-list kernel places each range by its
    offset, so the order is free. The blocks' concatenation is kept while every request's block is
    the last step's (most steps): then a step costs a repeat and an add."""

    def __init__(self) -> None:
        self.blocks: List[np.ndarray] = []
        self.fixed = np.zeros((0, 4), dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def __call__(self, blocks: List[np.ndarray], indptr: np.ndarray, tails: List[int]) -> np.ndarray:
        """``blocks``: per request its block; ``indptr`` ``[batch + 1]``; ``tails``: flat ranges."""
        if len(blocks) != len(self.blocks) or not all(map(operator.is_, blocks, self.blocks)):
            self.blocks = blocks
            self.fixed = np.concatenate([np.zeros((0, 4), dtype=np.int64), *blocks])
            self.counts = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
        fixed = self.fixed.copy()
        fixed[:, 3] += np.repeat(indptr[:len(blocks)], self.counts)
        return np.concatenate([fixed, table(tails, 4)])
