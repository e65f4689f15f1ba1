"""The working-set policies the server serves: which KV positions one request attends at one step.

One small class per method behind one interface (the kvpress idea); each says only what it keeps
and its units (thoughts, pages, tokens) in rank order (``Policy.rank_units``), and one shared
step, ``Policy.fill``, turns that into a working set within the budget:

=========== ==================================================================================
full        every position (dense attention)
zoomr       sinks + prompt + summaries + the c voted thoughts + recent window; without summaries
            and under a budget, pages voted by key bounds and the tokens the last step attended most
=========== ==================================================================================

The research baselines (streaming, sumr, h2o, quest, zoomr_pages, oracle, random) live in the
repository's ``testbed/`` and register only when a setting names one (``policy_registry``).

``budget`` is the most KV tokens a request may attend per step (0: unbounded). With a budget every
policy keeps what it cannot do without (its sinks, the last ``MIN_WINDOW`` tokens and, for the
thought policies, the prompt and the summaries), then fills the budget in its own order; the
recent window is shrunk before anything else is dropped and grows into whatever is left. With no
budget, ``zoomr`` is the paper's working set (the open thought attended whole).

A policy instance belongs to one request. The engine builds a :class:`StepView` each step and asks
for :meth:`Policy.working_set`: sorted disjoint ``[n, 2]`` int64 position ranges (numpy). Thought
policies cache their skeleton (sinks, prompt, summaries) so that an unbounded step costs a binary
search, not a pass over every thought.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple, Type

import numpy as np

from zoomr_sglang.algo.fine_zoom import FineZoom, first_window, zooms_fine
from zoomr_sglang.algo.policy_base import Policy, Ranking, Stage, StepView
from zoomr_sglang.algo.working_set import Range, as_range_array, merge_range_array, with_tail

__all__ = ["SERVED_POLICIES", "FullPolicy", "Policy", "StepView", "ThoughtPolicy", "ZoomRPolicy"]


class FullPolicy(Policy):
    """Dense attention: no budget applies, so it ranks nothing (its step stays one array)."""

    name = "full"

    def working_set(self, view: StepView) -> np.ndarray:
        return as_range_array([(0, view.seq_len)])


def open_thought_sink(view: StepView) -> np.ndarray:
    """``[1, 2]``: the open thought's first ``view.thought_sink`` tokens, kept under a budget. They
    say what the thought is doing; without a budget it is attended whole."""
    return np.asarray([[view.open_from, min(view.open_from + view.thought_sink, view.seq_len)]], dtype=np.int64)


class ThoughtPolicy(Policy):
    """Skeleton (sinks, prompt, every closed thought's summary) + the selected thoughts + a window.

    The skeleton grows only when a thought closes and the selection changes only at refresh
    points, so their union is cached as a merged array; a step without a budget then attends that
    union below ``cut = min(open_from, seq_len - window)`` plus ``[cut, seq_len)``. The ranges
    below the cut change only when the cut crosses a range's edge, so they are cached too, with
    the interval of cuts they hold for: a steady step is a few comparisons.
    """

    thought_level = True

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self._skeleton: List[Range] = []  # merged, ascending
        self._skeleton_array: Optional[np.ndarray] = None  # the same as [n, 2] int64 (None: rebuild)
        self._closed = 0  # closed thoughts whose summaries are in the skeleton
        self._summaries = 0  # how many of them have a summary
        self._static = np.zeros((0, 2), dtype=np.int64)
        self._static_key: Tuple = (-1, ())  # (closed thoughts, zoomed) the static union was built for
        # (lo, hi, fixed, tail_from): for cuts in (lo, hi], the static ranges below the tail and
        # where the tail starts (None: at the cut; else the start of the range the tail merges with).
        self._below: Tuple = (0, -1, self._static, None)
        self._cut_from: Optional[Tuple[int, int]] = None  # the last unbounded view's (open_from, window)

    def _update_skeleton(self, view: StepView) -> None:
        if not self._skeleton:
            self._skeleton = [(0, max(view.sink, view.prompt_len))]
            self._skeleton_array = None
        closed = len(view.thoughts) - (1 if view.thoughts and not view.thoughts[-1].final else 0)
        for thought in view.thoughts[self._closed:closed]:
            if thought.summary_start is not None:
                self._append(thought.summary_start, thought.summary_end)
                self._summaries += 1
        self._closed = closed

    def _append(self, start: int, end: int) -> None:
        """Summaries close in position order: each one extends or follows the last range."""
        self._skeleton_array = None
        last_start, last_end = self._skeleton[-1]
        if start <= last_end:
            self._skeleton[-1] = (last_start, max(last_end, end))
        else:
            self._skeleton.append((start, end))

    def working_set(self, view: StepView) -> np.ndarray:
        return with_tail(*self.working_set_parts(view), view.seq_len)

    def working_set_parts(self, view: StepView) -> Tuple[np.ndarray, int]:
        self._update_skeleton(view)
        if view.budget:
            self._cut_from = None
            return super().working_set(view), view.seq_len  # rank_units, then the shared fill
        zoomed = self.zoomed_thoughts(view)
        key = (self._closed, tuple(zoomed))
        if key != self._static_key:
            spans = [(view.thoughts[i].start, view.thoughts[i].span_end()) for i in zoomed]
            self._static = merge_range_array(as_range_array([*self._skeleton, *spans]))
            self._static_key = key
            self._below = (0, -1, self._static, None)  # holds for no cut: recomputed below
        self._cut_from = (view.open_from, view.window)
        return self.working_set_next(view.seq_len)

    def working_set_next(self, seq_len: int) -> Optional[Tuple[np.ndarray, int]]:
        if self._cut_from is None:  # the last view had a budget
            return None
        open_from, window = self._cut_from
        cut = max(0, min(open_from, seq_len - window))
        lo, hi, fixed, tail_from = self._below
        if not lo < cut <= hi:
            self._below = lo, hi, fixed, tail_from = self._ranges_below(cut)
        return fixed, cut if tail_from is None else tail_from

    def steady_cuts(self) -> Optional[Tuple[int, int, int, int, Optional[int]]]:
        if self._cut_from is None:
            return None
        lo, hi, _, tail_from = self._below
        return (*self._cut_from, lo, hi, tail_from)

    def _ranges_below(self, cut: int) -> Tuple[int, int, np.ndarray, Optional[int]]:
        """The static ranges that start below ``cut``, for every cut with the same answer (see
        ``_below``); a tail that starts inside (or right after) the last of them absorbs it."""
        starts, ends = self._static[:, 0].tolist(), self._static[:, 1].tolist()
        below = bisect.bisect_left(starts, cut)
        if below and ends[below - 1] >= cut:
            return starts[below - 1], ends[below - 1], self._static[: below - 1], starts[below - 1]
        upper = starts[below] if below < len(starts) else float("inf")
        return (ends[below - 1] if below else -1), upper, self._static[:below], None

    def rank_units(self, view: StepView) -> Ranking:
        """Within a budget: keeps the skeleton, then a window, the zoomed thoughts whole in their
        order while they fit, and the window grows (never past ``view.window_cap``)."""
        cap = view.seq_len if view.window_cap is None else view.window_cap
        if self._skeleton_array is None:  # a bounded step reads it every step: one array, not a list
            self._skeleton_array = as_range_array(self._skeleton)
        skeleton = self._skeleton_array
        if len(skeleton) and skeleton[-1, 1] > view.seq_len:  # only the last ranges can reach past it
            skeleton = np.minimum(skeleton[skeleton[:, 0] < view.seq_len], view.seq_len)
        skeleton = np.concatenate([skeleton, open_thought_sink(view)])
        spans = [(view.thoughts[i].start, view.thoughts[i].span_end()) for i in self.zoomed_thoughts(view)]
        return Ranking(keep=skeleton, window=min(view.window, cap), stages=(Stage(as_range_array(spans)),),
                       window_cap=cap)

    def zoomed_thoughts(self, view: StepView) -> Sequence[int]:
        return view.zoomed


class ZoomRPolicy(ThoughtPolicy):
    """The c thoughts most voted for by every (layer, query head) over their summaries.

    Under a budget, once thoughts have closed without any summary (a model that writes none) and
    ``view.zoom_pages`` allows it, the budget left by the skeleton and the window goes to pages and
    tokens instead of whole thoughts (:class:`FineZoom`'s stages); the steps ``view.observe`` allows
    are observed on the device, and what the levels leave goes to the window (as far back as
    ``view.window_cap``)."""

    name = "zoomr"
    votes = True
    fine_levels = True

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.fine = FineZoom()

    def zooms_fine(self, view: StepView) -> bool:
        return zooms_fine(view.budget, view.zoom_pages, self._closed, self._summaries)

    def rank_units(self, view: StepView) -> Ranking:
        """As the thought policies, or, zooming fine: the open thought's first tokens (the shared
        fill adds the sinks), a window of at most a quarter of the budget (``first_window``) and the
        fine levels' stages (tokens, pages, tokens) in place of the thoughts. The prompt is not kept
        whole: its pages and tokens compete with the reasoning's (a 77-token prompt held a third of
        a 220-token budget; on SmolLM2 letting the levels choose lost 145 steps of 6,144 instead of
        205)."""
        ranking = super().rank_units(view)
        if not self.zooms_fine(view):
            return ranking
        return replace(ranking, keep=open_thought_sink(view), window=first_window(ranking.window, view.budget),
                       stages=self.fine.stages(view.seq_len, view.budget, view.absent))

    def wanted_positions(self, view: StepView) -> Optional[np.ndarray]:
        return self.fine.wanted(view.seq_len, view.budget, view.bounds_end) if self.zooms_fine(view) else None

    def observes_on_device(self, view: StepView) -> bool:
        return view.observe and self.zooms_fine(view)

    def take_observation(self, ranges: np.ndarray, weights: np.ndarray, pages: np.ndarray) -> None:
        self.fine.take(ranges, weights, pages)


SERVED_POLICIES: Tuple[Type[Policy], ...] = (FullPolicy, ZoomRPolicy)
