"""ZoomR's finer granularities for thoughts without summaries: pages, then tokens.

A model that writes no summaries indexes each thought by its body's mean key, which says little
about which of its tokens a later step reads, and a paragraph is rarely worth its whole size in the
budget. Under a budget, :class:`FineZoom` then fills what the skeleton (sinks, prompt, the open
thought's first tokens, a recent window) leaves in two levels, each scored by the same decode
queries:

* **pages** (coarse): every layer's query heads vote, by Quest's key bounds (:class:`PageScorer`),
  for the pages the working set does not cover; the most voted are zoomed into at the next step
  (a quarter of the budget, :data:`PAGE_SHARE`, is kept for them);
* **tokens** (fine): of what the step attended, the tokens that drew the most attention, summed
  over layers and query heads, stay for the next step; the rest of the budget goes to them.

So a page zoomed into on a bound's promise keeps only the tokens that proved to matter, and the
next pages take the freed room. Both levels read the keys of the positions :meth:`watch` lists
(the attended ones and the pages completed since the last step): an observing step runs eagerly.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, PageScorer, attention_weights, page_ranges
from zoomr_sglang.algo.policy_base import mask_to_ranges, recent_fill
from zoomr_sglang.algo.working_set import Range, as_range_array, merge_ranges

PAGE_SHARE = 4  # 1 / PAGE_SHARE of the budget is kept for pages the bounds newly point at


class FineZoom:
    """One request's page votes and last step's per-token attention (the fine levels' state)."""

    def __init__(self) -> None:
        self.scorer = PageScorer()
        self.attended = np.zeros((0, 2), dtype=np.int64)  # the ranges the observed step attends
        self.observing: Optional[torch.Tensor] = None  # [positions] weights being summed this step
        self.weights = torch.zeros(0, dtype=torch.float64)  # [positions] last observed step's sums (CPU)
        self.new_pages: Range = (0, 0)  # positions of the pages whose bounds this step adds

    def fill(self, base: List[Range], seq_len: int, budget: int, window_cap: int) -> np.ndarray:
        """``base`` (what the policy keeps, window included) + the tokens and pages the last step
        chose, within ``budget``; the recent window grows into what is left (at most ``window_cap``
        tokens back). Asks this step's queries to vote for the pages still outside."""
        if self.observing is not None:  # the last step's layers are all done: its sums are final
            self.weights, self.observing = self.observing.cpu(), None
        keep = torch.zeros(seq_len, dtype=torch.bool)
        for start, end in base:
            keep[start:end] = True
        page_room = budget // PAGE_SHARE
        weights = torch.zeros(seq_len, dtype=torch.float64)
        weights[: min(seq_len, self.weights.numel())] = self.weights[:seq_len]
        ranked = torch.argsort(weights, descending=True, stable=True)
        ranked = ranked[weights[ranked] > 0]  # attended at the last step
        self._take(keep, ranked, budget - page_room)
        for start, end in page_ranges(self.scorer.ranking()):
            if end <= seq_len and int(keep.sum()) + int((~keep[start:end]).sum()) <= budget:
                keep[start:end] = True
        self._take(keep, ranked, budget)
        ranges = as_range_array(recent_fill(mask_to_ranges(keep), seq_len, budget, window_cap))
        complete = seq_len // QUEST_PAGE_SIZE
        covered = torch.zeros(seq_len, dtype=torch.bool)  # the final ranges hold every kept position
        for start, end in ranges.tolist():
            covered[start:end] = True
        outside = ~covered[: complete * QUEST_PAGE_SIZE].reshape(complete, QUEST_PAGE_SIZE).all(dim=1)
        self.scorer.ask(torch.nonzero(outside).flatten(), max(1, page_room // QUEST_PAGE_SIZE))
        self.attended = ranges
        return ranges

    @staticmethod
    def _take(keep: torch.Tensor, ranked: torch.Tensor, limit: int) -> None:
        """Keep the first of ``ranked`` not yet kept until ``keep`` holds ``limit`` positions."""
        room = limit - int(keep.sum())
        if room > 0:
            fresh = ranked[~keep[ranked]]
            keep[fresh[:room]] = True

    def watch(self, seq_len: int) -> List[Range]:
        """Positions whose keys :meth:`observe` needs this step: the attended ones and the pages
        completed since the last observed step (their bounds)."""
        self.new_pages = self.scorer.new_pages(seq_len)[0]
        return merge_ranges([*map(tuple, self.attended.tolist()), self.new_pages])

    def step_signals(self) -> List[torch.Tensor]:
        """This step's per-position attention sums and page votes (see ``Policy.step_signals``)."""
        scorer = self.scorer
        return [t for t in (self.observing, scorer.page_votes, scorer.page_score_sums) if t is not None]

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        """query ``[num_heads, head_dim]``, keys ``[n, num_kv_heads, head_dim]`` of ``positions [n]``
        (the ones :meth:`watch` listed, ascending)."""
        starts, ends = (torch.from_numpy(np.ascontiguousarray(self.attended[:, i])) for i in (0, 1))
        slot = torch.searchsorted(starts, positions, right=True) - 1
        attended = (slot >= 0) & (positions < ends[slot.clamp(min=0)])
        weights = attention_weights(query, keys[attended.to(keys.device)], scaling)
        if self.observing is None:
            self.observing = torch.zeros(int(positions.max()) + 1, dtype=torch.float64, device=weights.device)
        self.observing.index_add_(0, positions[attended].to(weights.device), weights)
        first, last = self.new_pages
        paged = (positions >= first) & (positions < last)
        self.scorer.observe(layer_id, query, keys[paged.to(keys.device)])
