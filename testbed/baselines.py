"""Thought-level baselines and measurement policies: streaming, summaries only, ZoomR with pages,
the oracle (a ceiling) and random thoughts (a floor).

Research policies, registered with the server only when a setting asks for one
(``zoomr_sglang.algo.policy_registry``); the installed package serves ``zoomr`` and ``full``.

=========== ==================================================================================
streaming   sinks + a recent window (StreamingLLM)
sumr        sinks + prompt + every summary + recent window (summary-only, no zoom-in)
zoomr_pages as zoomr, but a voted thought that does not fit the budget whole gives its best pages
oracle      as zoomr, but the thoughts are the ones the task says the step reads (a ceiling)
random      as zoomr, but c random closed thoughts (a floor)
=========== ==================================================================================
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import List, Optional, Sequence

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, PageScorer, page_ranges
from zoomr_sglang.algo.policies import ThoughtPolicy
from zoomr_sglang.algo.policy_base import Filled, Policy, Ranking, Stage, StepView, current_thought
from zoomr_sglang.algo.working_set import as_range_array
from zoomr_sglang.algo.policy_registry import register_policy
from testbed.attention_baselines import ObservesPages


@register_policy
class StreamingPolicy(Policy):
    """StreamingLLM: attention sinks and a recent window, the window filling the budget (without
    one, ``view.window`` tokens)."""

    name = "streaming"

    def rank_units(self, view: StepView) -> Ranking:
        window = view.seq_len if view.budget else view.window
        return Ranking(window=window, window_cap=window)


@register_policy
class SummaryOnlyPolicy(ThoughtPolicy):
    """Summaries and a recent window, never a thought body once it left the window."""

    name = "sumr"

    def zoomed_thoughts(self, view: StepView) -> Sequence[int]:
        return ()


@register_policy
class ZoomRPagesPolicy(ObservesPages, ThoughtPolicy):
    """ZoomR with a third granularity: a voted thought the budget cannot take whole is attended by
    its best pages instead (Quest's key bounds, :class:`PageScorer`, scored by the same step's
    queries and read at the next step), never beyond the voted thoughts. Without a budget it is
    ``zoomr``; it observes every layer's query, so its steps run eagerly."""

    name = "zoomr_pages"
    votes = True

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.scorer = PageScorer()

    def rank_units(self, view: StepView) -> Ranking:
        """The thoughts whole, then the pages the last vote chose inside them (as the last vote
        ranked them; a page inside a thought attended whole costs nothing)."""
        ranking = super().rank_units(view)
        inside = set(_pages_inside(ranking.stages[0].units))
        pages = [p for p in self.scorer.ranking() if p in inside]
        return replace(ranking, stages=(*ranking.stages, Stage(as_range_array(page_ranges(pages)))))

    def after_fill(self, view: StepView, ranking: Ranking, filled: Filled) -> None:
        """Asks for votes on the complete pages of the voted thoughts that did not fit whole."""
        whole = filled.reached[1]  # what was kept once the thoughts were in
        pages = [p for p in _pages_inside(ranking.stages[0].units)
                 if not whole[p * QUEST_PAGE_SIZE: (p + 1) * QUEST_PAGE_SIZE].all()]
        wanted = max(0, (view.budget - int(np.count_nonzero(whole))) // QUEST_PAGE_SIZE)
        self.scorer.ask(torch.tensor(pages, dtype=torch.int64), wanted)


def _pages_inside(spans: np.ndarray) -> List[int]:
    """The complete pages inside each of ``spans`` ``[n, 2]``, span by span, ascending."""
    return [p for start, end in spans.tolist() for p in range(-(-start // QUEST_PAGE_SIZE), end // QUEST_PAGE_SIZE)]


@register_policy
class OraclePolicy(ThoughtPolicy):
    """Zooms into the thoughts the current thought really reads, as the task generator states them.

    ``oracle[i]``: thought indices that thought ``i`` reads, most needed first.
    """

    name = "oracle"

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        if oracle is None:
            raise ValueError("the oracle policy needs the task's dependencies (zoomr_oracle)")
        self.oracle = [list(deps) for deps in oracle]

    def choose_thoughts(self, view: StepView) -> Optional[List[int]]:
        current = current_thought(view.thoughts)
        wanted = self.oracle[current] if current < len(self.oracle) else []
        closed = set(view.candidates)
        return [i for i in wanted if i in closed][: self.num_thoughts]


@register_policy
class RandomPolicy(ThoughtPolicy):
    """c closed thoughts drawn at random at every refresh point (seeded per request)."""

    name = "random"

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.rng = random.Random(seed)

    def choose_thoughts(self, view: StepView) -> Optional[List[int]]:
        candidates = list(view.candidates)
        return self.rng.sample(candidates, min(self.num_thoughts, len(candidates)))
