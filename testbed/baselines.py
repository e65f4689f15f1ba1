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
from typing import List, Optional, Sequence

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, PageScorer, page_ranges
from zoomr_sglang.algo.policies import ThoughtPolicy
from zoomr_sglang.algo.policy_base import Policy, StepView, add_within_budget, current_thought, fill_budget, recent_fill
from zoomr_sglang.algo.working_set import Range, as_range_array, merge_ranges, ranges_size
from zoomr_sglang.algo.policy_registry import register_policy
from testbed.attention_baselines import ObservesPages


@register_policy
class StreamingPolicy(Policy):
    """StreamingLLM: attention sinks and a recent window, the window filling the budget."""

    name = "streaming"

    def working_set(self, view: StepView) -> np.ndarray:
        sinks = [(0, min(view.sink, view.seq_len))]
        if not view.budget:
            return as_range_array(merge_ranges([*sinks, (max(0, view.seq_len - view.window), view.seq_len)]))
        return fill_budget(sinks, view.seq_len, view.budget, view.seq_len, [], view.seq_len)


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

    def fill(self, view: StepView, skeleton: List[Range], spans: List[Range], cap: int) -> np.ndarray:
        base = recent_fill(skeleton, view.seq_len, view.budget, min(view.window, cap))
        whole = add_within_budget(base, spans, view.budget)
        # Complete pages inside the voted thoughts that did not fit whole, outside what is attended.
        attended = as_range_array(whole)
        pages = []
        for start, end in spans:
            first, last = -(-start // QUEST_PAGE_SIZE), end // QUEST_PAGE_SIZE
            pages.extend(p for p in range(first, last) if not _inside(attended, p * QUEST_PAGE_SIZE, (p + 1) * QUEST_PAGE_SIZE))
        candidates = set(pages)
        chosen = add_within_budget(whole, page_ranges([p for p in self.scorer.ranking() if p in candidates]), view.budget)
        self.scorer.ask(torch.tensor(pages, dtype=torch.int64), max(0, (view.budget - ranges_size(whole)) // QUEST_PAGE_SIZE))
        return as_range_array(recent_fill(chosen, view.seq_len, view.budget, cap))


def _inside(ranges: np.ndarray, start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies within one of the sorted disjoint ``ranges`` ``[n, 2]``."""
    i = int(np.searchsorted(ranges[:, 0], start, side="right")) - 1
    return i >= 0 and int(ranges[i, 1]) >= end


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
