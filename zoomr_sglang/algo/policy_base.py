"""What every working-set policy shares: the view of a step, the interface, and the budget step.

A policy says only what it keeps and in which order it wants its units (thoughts, pages, tokens);
:func:`fill_budget`, the one step all of them share, turns that into a working set within the
budget. See ``policies.py`` for the methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.segmentation import Thought
from zoomr_sglang.algo.working_set import MIN_WINDOW, Range, as_range_array, merge_ranges, ranges_size


@dataclass
class StepView:
    """What a policy sees of one request at one decode step (positions are absolute).

    thoughts: the segmenter's thoughts, ``thoughts[i].index == i`` (the final ones first, at most the
    last one open); candidates: closed thoughts that have an index key, in closing order; zoomed:
    the current thought selection; open_from: first position not inside a closed thought;
    window_cap: with the host tier on, how far back (tokens) a recent window may reach, since
    older closed thoughts may have left the device; None: anywhere; thought_sink: under a budget,
    the first tokens of the thought being written that thought-level policies always keep;
    zoom_pages: under a budget, zoomr zooms into pages and tokens of thoughts without summaries.
    """

    seq_len: int
    prompt_len: int
    sink: int
    window: int
    budget: int
    thoughts: Sequence[Thought]
    candidates: Sequence[int]
    zoomed: Sequence[int]
    open_from: int
    window_cap: Optional[int] = None
    thought_sink: int = 0
    zoom_pages: bool = False


def recent_fill(fixed: Sequence[Range], seq_len: int, budget: int, max_window: int) -> List[Range]:
    """``fixed`` plus the longest recent window ``[seq_len - w, seq_len)``, ``w <= max_window``,
    that keeps the union within ``budget`` tokens (``w >= MIN_WINDOW`` whatever the budget).

    Positions already in ``fixed`` cost nothing, so the window walks back over them for free.
    """
    fixed = merge_ranges(fixed)
    free = budget - ranges_size(fixed)
    start = lowest = max(0, seq_len - max_window)
    for gap_start, gap_end in reversed(_gaps(fixed, lowest, seq_len)):
        if free < gap_end - gap_start:
            start = gap_end - max(free, 0)
            break
        free -= gap_end - gap_start
    start = min(start, max(0, seq_len - MIN_WINDOW))
    return merge_ranges([*fixed, (start, seq_len)])


def _gaps(fixed: Sequence[Range], lo: int, hi: int) -> List[Range]:
    """Parts of [lo, hi) outside the sorted disjoint ranges ``fixed``."""
    gaps, cursor = [], lo
    for start, end in fixed:
        if end <= cursor:
            continue
        if start >= hi:
            break
        if start > cursor:
            gaps.append((cursor, min(start, hi)))
        cursor = max(cursor, end)
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def add_within_budget(base: Sequence[Range], extras: Sequence[Range], budget: int) -> List[Range]:
    """``base`` plus each of ``extras`` in order, whole, while the union stays within ``budget``."""
    chosen = merge_ranges(base)
    for extra in extras:
        trial = merge_ranges([*chosen, extra])
        if ranges_size(trial) <= budget:
            chosen = trial
    return chosen


def fill_budget(fixed: Sequence[Range], seq_len: int, budget: int, first_window: int, units: Sequence[Range],
                window_cap: int) -> np.ndarray:
    """The step every bounded policy shares: what it keeps (``fixed``), a recent window of at most
    ``first_window``, each of its ``units`` whole in its order while they fit, then the window grows
    into what is left, never further back than ``window_cap`` tokens."""
    base = recent_fill(fixed, seq_len, budget, first_window)
    return as_range_array(recent_fill(add_within_budget(base, units, budget), seq_len, budget, window_cap))


def mask_to_ranges(mask: torch.Tensor) -> List[Range]:
    """Ranges of the True runs of a 1-D bool mask, ascending."""
    if mask.numel() == 0:
        return []
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8).cpu(), torch.zeros(1, dtype=torch.int8)])
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


class Policy:
    """One request's working-set rule. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str]
    thought_level: ClassVar[bool] = False  # attends whole thoughts: the host tier may offload the rest
    votes: ClassVar[bool] = False  # casts ZoomR's index-key votes at refresh points

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        self.num_thoughts = num_thoughts

    def working_set(self, view: StepView) -> np.ndarray:
        raise NotImplementedError

    def working_set_parts(self, view: StepView) -> Tuple[np.ndarray, int]:
        """The working set as ``(fixed, tail_from)``: the ranges ``fixed`` ``[n, 2]``, then
        ``[tail_from, view.seq_len)`` when ``tail_from < view.seq_len``. A policy whose set only
        grows at its end from one step to the next returns the same ``fixed`` (never modified
        afterwards), so a planner packs it with no per-request array work."""
        return self.working_set(view), view.seq_len

    def working_set_next(self, seq_len: int) -> Optional[Tuple[np.ndarray, int]]:
        """:meth:`working_set_parts` at ``seq_len`` when nothing but the sequence length changed
        since the last call (the same thoughts, open thought and selection), if the policy can
        tell without a view; None: ask :meth:`working_set_parts`."""
        return None

    def steady_cuts(self) -> Optional[Tuple[int, int, int, int, Optional[int]]]:
        """When :meth:`working_set_next` would answer without new work: ``(open_from, window, lo, hi,
        tail_from)``, meaning that at a sequence length whose cut ``min(open_from, seq_len -
        window)`` lies in ``(lo, hi]`` it returns the last fixed ranges again and a tail from
        ``tail_from`` (None: from the cut). None: no such promise."""
        return None

    def choose_thoughts(self, view: StepView) -> Optional[List[int]]:
        """At a refresh point, the thoughts to zoom into (None: keep the selection, or vote)."""
        return None

    def observe_positions(self, view: StepView, ranges: np.ndarray) -> Optional[List[Range]]:
        """Positions whose keys :meth:`observe` needs at every layer this step (None: no observing).
        Asked only at steps under a budget (without one every policy attends all it needs)."""
        return None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        """query ``[num_heads, head_dim]``, keys ``[n, num_kv_heads, head_dim]`` of ``positions [n]``."""

    def step_signals(self) -> List[torch.Tensor]:
        """What this step's observations summed over every query head, read at the next step: with
        tensor parallelism each rank sums its own heads, and the ranks add these up after the last
        layer (so every rank ranks as one holding every head would). Sums only; none by default."""
        return []


def current_thought(thoughts: Sequence[Thought]) -> int:
    """Index of the thought being written: the open one, or the next one after the last closed."""
    if thoughts and not thoughts[-1].final:
        return thoughts[-1].index
    return len(thoughts)
