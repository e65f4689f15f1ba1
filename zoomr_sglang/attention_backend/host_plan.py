"""A decode step as the host plans it (:class:`HostPlan`) and the packing of its ranges: the last
stage of the planner's pipeline.

A request attends ranges that change little from step to step (a policy's fixed ranges, until a
thought closes or the selection changes) plus a recent tail that grows by one token. The planner
keeps each request's fixed ranges packed (:func:`request_block`), collects what each request adds
to the step (:class:`StepLists`) and builds the batch's ranges from the blocks and the tails in a
handful of numpy calls (:class:`BatchRanges`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import List, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.attention_backend.page_slots import NewPages
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
    whatever token it decodes); observers: per request whose policy reads every layer's query
    on the host, (batch index, state, positions ``[n, 2]`` whose keys it reads); fine_lanes: the
    requests whose fine levels observe this step on the device (``fine_observers.py``); new_pages:
    pages given bound slots this step (``page_slots.py``).
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
    fine_lanes: List["FineLane"] = field(default_factory=list)
    new_pages: List[NewPages] = field(default_factory=list)
    self_check: bool = False
    fidelity_rows: List[int] = field(default_factory=list)  # batch indices measuring zoomr_fidelity
    failed: List[Tuple[object, str]] = field(default_factory=list)  # (Req, message): requests to abort

    @staticmethod
    def empty() -> "HostPlan":
        """A step with no request (a CUDA-graph capture batch is all padding)."""
        return HostPlan(rows=[], seq_lens=[], states=[], kv_indptr=torch.zeros(1, dtype=torch.int32),
                        ranges=np.zeros((0, 4), dtype=np.int64), commits=np.zeros((0, 3), dtype=np.int64),
                        fresh_entries=[], new_candidates=np.zeros((0, 5), dtype=np.int64),
                        votes=np.zeros((0, 4), dtype=np.int64))

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def needs_eager(self) -> bool:
        """Per-layer Python work (observers, self-checks, fidelity) cannot replay in a graph (the fine
        levels' observations can: their passes run after the forward)."""
        return bool(self.observers) or self.self_check or bool(self.fidelity_rows)

    @cached_property
    def working_sets(self) -> List[np.ndarray]:
        """Per request its ``[n, 2]`` position ranges, ascending (diagnostics and tests read them)."""
        ranges = self.ranges[np.argsort(self.ranges[:, 3], kind="stable")]
        request = np.searchsorted(self.kv_indptr.numpy(), ranges[:, 3], side="right") - 1
        spans = np.stack([ranges[:, 1], ranges[:, 1] + ranges[:, 2]], axis=1)
        return np.split(spans, np.searchsorted(request, np.arange(1, self.batch_size)))


@dataclass
class FineLane:
    """A request whose fine levels observe this step: its batch index, state and working set
    ``ranges [n, 2]``; its pages ``[0, num_pages)`` have bounds (the vote ranks those the
    working set leaves out) and it zooms into ``pages_wanted`` of them."""

    batch_index: int
    state: RequestState
    ranges: np.ndarray
    num_pages: int
    pages_wanted: int


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


class StepLists:
    """What a step's requests add to its plan, flat, in batch order (the fields' widths are
    :class:`HostPlan`'s): index commits, fresh entries, new candidates, vote rows, observers,
    fine lanes, new pages, failures, and per request its block of fixed ranges, its tail and its
    ``kv_indptr`` entry (the planner's loop appends those in line, :meth:`StepPlanner.plan`)."""

    __slots__ = ("commits", "fresh", "new_candidates", "votes", "observers", "fine_lanes", "new_pages", "failed",
                 "blocks", "tails", "indptr")

    def __init__(self) -> None:
        self.commits: List[int] = []
        self.fresh: List[int] = []
        self.new_candidates: List[int] = []
        self.votes: List[int] = []
        self.observers: List[Tuple[int, RequestState, np.ndarray]] = []
        self.fine_lanes: List[FineLane] = []
        self.new_pages: List[NewPages] = []
        self.failed: List[Tuple[object, str]] = []
        self.blocks: List[np.ndarray] = []
        self.tails: List[int] = []  # (row, start, length, output offset) per tail, flat
        self.indptr = [0]  # a request's ranges start at its entry

    def drop(self, batch_index: int, row: int) -> None:
        """Forget what the request at ``batch_index`` (in ``row``) added: its planning raised part
        way. Its entries are the last ones of its row (a row is in a batch once); its fresh index
        entries stay (zeroed; freed with its state)."""
        for flat, width in ((self.commits, 3), (self.new_candidates, 5), (self.tails, 4)):
            flat[:] = [v for start in range(0, len(flat), width) if flat[start] != row
                       for v in flat[start:start + width]]
        self.observers[:] = [o for o in self.observers if o[0] != batch_index]
        self.fine_lanes[:] = [lane for lane in self.fine_lanes if lane.batch_index != batch_index]
        self.new_pages[:] = [pages for pages in self.new_pages if pages.row != row]  # freed with its state
        del self.votes[4 * batch_index:], self.blocks[batch_index:], self.indptr[batch_index + 1:]

    def plan(self, rows: List[int], seq_lens: Sequence[int], states: List[RequestState],
             batch_ranges: "BatchRanges", self_check: bool, fidelity_rows: List[int]) -> HostPlan:
        """The step's :class:`HostPlan`: the lists as tables, the ranges packed by ``batch_ranges``."""
        kv_indptr = np.array(self.indptr, dtype=np.int32)
        return HostPlan(
            rows=rows, seq_lens=list(seq_lens), states=states, kv_indptr=torch.from_numpy(kv_indptr),
            ranges=batch_ranges(self.blocks, kv_indptr, self.tails), commits=table(self.commits, 3),
            fresh_entries=self.fresh, new_candidates=table(self.new_candidates, 5), votes=table(self.votes, 4),
            observers=self.observers, fine_lanes=self.fine_lanes, new_pages=self.new_pages, self_check=self_check,
            fidelity_rows=fidelity_rows, failed=self.failed,
        )


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
