"""What every working-set policy shares: the view of a step, the interface, and the budget step.

A policy says only what it keeps and its units (thoughts, pages, tokens) in rank order, a
:class:`Ranking` (:meth:`Policy.rank_units`); :meth:`Policy.fill`, the one step all of them share,
turns that into a working set within the budget (kvpress's ScorerPress shape: a press scores, the
base class keeps). See ``policies.py`` for the methods.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.segmentation import Thought
from zoomr_sglang.algo.working_set import MIN_WINDOW, Range, as_range_array

UNBOUNDED = sys.maxsize  # the budget of a view without one (``view.budget == 0``)


@dataclass
class StepView:
    """What a policy sees of one request at one decode step (positions are absolute).

    thoughts: the segmenter's thoughts, ``thoughts[i].index == i`` (the final ones first, at most the
    last one open); candidates: closed thoughts that have an index key, in closing order; zoomed:
    the current thought selection; open_from: first position not inside a closed thought;
    window_cap: with the host tier on, how far back (tokens) a recent window may reach, since
    older closed thoughts may have left the device; None: anywhere; thought_sink: under a budget,
    the first tokens of the thought being written that thought-level policies always keep;
    zoom_pages: under a budget, zoomr zooms into pages and tokens of thoughts without summaries;
    absent: bool ``[>= seq_len]``, positions whose KV is not on the device (the host tier's holes),
    set at steps that asked :meth:`Policy.wanted_positions` (None: every position is there);
    observe: zoomr's page and token levels may read this step's decode queries (every step, or only
    at refresh points: ``ZoomRConfig.fine_observe``); the baselines that observe ignore it;
    bounds_end: zoomr's page level has key bounds for the pages below this one (from the prompt's
    end on): the keys of the later complete pages must be on the device for theirs to be taken.
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
    absent: Optional[np.ndarray] = None
    observe: bool = True
    bounds_end: int = 0


@dataclass(frozen=True, eq=False)
class Stage:
    """Units in rank order, taken while the working set holds at most ``limit`` positions (None:
    the budget).

    units: ``[n, 2]`` int64 ranges, best first: thoughts, pages, or single tokens
    (:func:`token_units`). whole: a unit is taken whole or not at all, and the next ones are still
    tried; False (tokens): the positions of each unit that are not kept yet, in order, as many as
    fit (the units must not overlap)."""

    units: np.ndarray
    whole: bool = True
    limit: Optional[int] = None


@dataclass(frozen=True)
class Ranking:
    """What a policy asks of :meth:`Policy.fill`: ``keep``, ranges attended whatever the budget
    (the fill adds the sinks and the last :data:`MIN_WINDOW` tokens); ``window``, the recent window
    wanted before any unit (shrunk first when the budget is short); ``stages`` of ranked units;
    ``window_cap``, how far back the window grows into what the units leave."""

    keep: Sequence[Range] = ()
    window: int = 0
    stages: Sequence[Stage] = ()
    window_cap: int = 0


class Filled(NamedTuple):
    """What :meth:`Policy.fill` made: ``ranges`` ``[n, 2]`` int64, the working set, and ``reached``,
    bool masks over positions (at least ``seq_len`` long) of what was kept after the keep and the
    first window (``reached[0]``), then after each stage (``reached[i]``, stage ``i - 1``)."""

    ranges: np.ndarray
    reached: List[np.ndarray]


def token_units(positions: np.ndarray) -> np.ndarray:
    """``[n, 2]`` one-token units of ``positions [n]`` (int64), in their order."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.stack([positions, positions + 1], axis=1)


def range_positions(ranges: np.ndarray) -> np.ndarray:
    """int64 positions of the ``[n, 2]`` ranges, range by range, each ascending (empty ones add none)."""
    starts, ends = ranges[:, 0], ranges[:, 1]
    lengths = np.maximum(ends - starts, 0)
    # Range i's j-th position is starts[i] + j, and it comes after the lengths of ranges 0..i-1.
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))


def range_mask(ranges: np.ndarray, length: int) -> np.ndarray:
    """bool ``[length]``: True inside any of the ``[n, 2]`` ranges (ending at most at ``length``)."""
    mask = np.zeros(length, dtype=bool)
    if len(ranges) <= 32:  # one slice each costs less than the vectorized form's fixed cost
        for start, end in ranges.tolist():
            mask[start:end] = True
    else:
        mask[range_positions(ranges)] = True
    return mask


def mask_ranges(mask: np.ndarray) -> np.ndarray:
    """``[n, 2]`` int64 ranges of the True runs of a 1-D bool mask, ascending."""
    padded = np.concatenate(([False], mask, [False]))
    return np.flatnonzero(padded[1:] != padded[:-1]).astype(np.int64).reshape(-1, 2)


def mask_to_ranges(mask: torch.Tensor) -> List[Range]:
    """:func:`mask_ranges` of a 1-D torch bool mask, as ``(start, end)`` pairs."""
    return [tuple(r) for r in mask_ranges(mask.cpu().numpy()).tolist()]


def _grow_window(kept: np.ndarray, count: int, seq_len: int, budget: int, max_window: int) -> int:
    """Adds to ``kept`` (``count`` True) the longest recent window ``[seq_len - w, seq_len)``,
    ``w <= max_window``, that keeps it within ``budget`` (``w >= MIN_WINDOW`` whatever the budget);
    positions kept already cost nothing, so the window walks back over them for free. Returns the
    new count."""
    free = max(budget - count, 0)
    lowest = max(0, seq_len - max_window)
    # The last count + free + 1 positions hold more than ``free`` unkept ones: no need to look further.
    search_from = max(lowest, seq_len - (count + free + 1))
    unkept = np.flatnonzero(~kept[search_from:seq_len])
    start = lowest if len(unkept) <= free else search_from + int(unkept[len(unkept) - free - 1]) + 1
    start = min(start, max(0, seq_len - MIN_WINDOW))
    added = int(np.count_nonzero(~kept[start:seq_len]))
    kept[start:seq_len] = True
    return count + added


def _take(kept: np.ndarray, count: int, stage: Stage, limit: int) -> int:
    """Adds ``stage``'s units to the bool mask ``kept`` (``count`` True) while it holds at most
    ``limit`` positions; returns the new count."""
    if stage.whole:
        for start, end in stage.units.tolist():
            fresh = end - start - int(np.count_nonzero(kept[start:end]))
            if end > start and count + fresh <= limit:
                kept[start:end] = True
                count += fresh
        return count
    room = limit - count
    if room <= 0 or len(stage.units) == 0:
        return count
    positions = range_positions(stage.units)
    fresh = positions[~kept[positions]][:room]
    kept[fresh] = True
    return count + len(fresh)


class Policy:
    """One request's working-set rule. Subclasses set ``name``, say what they keep and how they rank
    their units (:meth:`rank_units`), and override what else they need."""

    name: ClassVar[str]
    thought_level: ClassVar[bool] = False  # attends whole thoughts: the host tier may offload the rest
    votes: ClassVar[bool] = False  # casts ZoomR's index-key votes at refresh points
    fine_levels: ClassVar[bool] = False  # zooms into pages and tokens of thoughts without summaries

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        self.num_thoughts = num_thoughts

    def working_set(self, view: StepView) -> np.ndarray:
        """Sorted disjoint ``[n, 2]`` int64 position ranges: :meth:`rank_units`, then :meth:`fill`."""
        ranking = self.rank_units(view)
        filled = self.fill(view, ranking)
        self.after_fill(view, ranking, filled)
        return filled.ranges

    def rank_units(self, view: StepView) -> Ranking:
        """What this policy keeps and its units in rank order at this step."""
        raise NotImplementedError

    def after_fill(self, view: StepView, ranking: Ranking, filled: Filled) -> None:
        """What the policy learns from the set it got (e.g. which pages to score for the next step)."""

    def fill(self, view: StepView, ranking: Ranking) -> Filled:
        """The budget step every policy shares: the sinks, ``ranking.keep`` and a recent window of at
        most ``ranking.window`` tokens (shrunk first, never under :data:`MIN_WINDOW`); then each
        stage's units in rank order while the set holds at most the stage's limit; then the window
        grows into what is left, at most ``ranking.window_cap`` tokens back. Without a budget it
        attends everything the ranking names."""
        seq_len, budget = view.seq_len, view.budget or UNBOUNDED
        keep = np.concatenate([as_range_array([(0, min(view.sink, seq_len))]), as_range_array(ranking.keep)])
        ends = [int(ranges[:, 1].max()) for ranges in (keep, *(s.units for s in ranking.stages)) if len(ranges)]
        kept = range_mask(keep, max(seq_len, *ends))
        count = _grow_window(kept, int(np.count_nonzero(kept)), seq_len, budget, ranking.window)
        reached = [kept.copy()]
        for stage in ranking.stages:
            count = _take(kept, count, stage, budget if stage.limit is None else stage.limit)
            reached.append(kept.copy())
        _grow_window(kept, count, seq_len, budget, ranking.window_cap)
        return Filled(mask_ranges(kept), reached)

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

    def wanted_positions(self, view: StepView) -> Optional[np.ndarray]:
        """Sorted ``[n]`` int64 positions this step may attend, or observe, beyond the whole thoughts
        it zooms into: the host tier brings the absent ones back before the working set is made
        (then in ``view.absent``). None: none (a policy that zooms whole thoughts)."""
        return None

    def observe_positions(self, view: StepView, ranges: np.ndarray) -> Optional[List[Range]]:
        """Positions whose keys :meth:`observe` needs at every layer this step (None: no observing).
        Asked only at steps under a budget (without one every policy attends all it needs)."""
        return None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        """query ``[num_heads, head_dim]``, keys ``[n, num_kv_heads, head_dim]`` of ``positions [n]``."""

    def observes_on_device(self, view: StepView) -> bool:
        """Whether this step's queries are observed on the device for this request: its attention
        weights over its working set summed over layers and query heads, and the pages its heads
        vote for, come back to :meth:`take_observation` (two steps later). Asked only at steps
        under a budget of requests that zoom fine (``fine_zoom.zooms_fine``)."""
        return False

    def take_observation(self, ranges: np.ndarray, weights: np.ndarray, pages: np.ndarray) -> None:
        """The weights ``[n]`` float32 an observed step gave the positions of its working set
        ``ranges`` ``[m, 2]`` (in position order) and the pages ``[k]`` int64 its vote chose, most
        voted first (see :meth:`observes_on_device`)."""


def current_thought(thoughts: Sequence[Thought]) -> int:
    """Index of the thought being written: the open one, or the next one after the last closed."""
    if thoughts and not thoughts[-1].final:
        return thoughts[-1].index
    return len(thoughts)
