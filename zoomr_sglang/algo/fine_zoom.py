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
next pages take the freed room. :meth:`FineZoom.stages` says this as ranked units for the shared
budget step (``Policy.fill``). At an observed step (at refresh points, ``fine_observe``) the page
votes read the keys of the pages completed since the last one (their bounds, :meth:`watch`, on the
host: such a step runs eagerly) and the token weights are summed on the device for the whole batch
(``algo/token_weights.py``) and come back two steps later (:meth:`take_token_weights`); the steps
in between keep the last choice.

With the host tier, closed thoughts leave the device whole and the levels bring back only what they
may attend: :meth:`FineZoom.wanted` names those positions before the fill (the host tier copies the
absent ones in), and the stages skip what is still absent (a copy under way on a GPU).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, PageScorer, page_ranges
from zoomr_sglang.algo.policy_base import Stage, range_mask, range_positions, token_units
from zoomr_sglang.algo.working_set import Range, as_range_array, sorted_unique

PAGE_SHARE = 4  # 1 / PAGE_SHARE of the budget is kept for pages the bounds newly point at


def zooms_fine(budget: float, zoom_pages: bool, thoughts_closed: int, summaries: int) -> bool:
    """Whether a request zooms into pages and tokens instead of whole thoughts: under a budget,
    where allowed (``implicit_zoom``), once thoughts have closed and none of them had a summary.
    The policy asks it of its skeleton, the request of its counters: one rule."""
    return bool(budget) and zoom_pages and thoughts_closed > 0 and summaries == 0


class FineZoom:
    """One request's page votes and the ranking of its last observed step's tokens (the fine levels' state)."""

    def __init__(self) -> None:
        self.scorer = PageScorer()
        self._ranked = np.zeros(0, dtype=np.int64)  # the positions with weight, most attended first

    def take_token_weights(self, ranges: np.ndarray, weights: np.ndarray) -> None:
        """An observed step attended ``ranges`` ``[m, 2]`` and gave their positions ``weights [n]``
        (summed over layers and query heads, in position order): rank them once, most attended
        first, ties to the lower position; positions without weight are not ranked."""
        order = np.argsort(-weights, kind="stable")
        self._ranked = range_positions(ranges)[order[weights[order] > 0]]

    def _ranked_tokens(self, seq_len: int) -> np.ndarray:
        """``[n]`` int64: the ranked positions below ``seq_len``."""
        return self._ranked[self._ranked < seq_len]

    def _pages(self, seq_len: int) -> List[int]:
        return [page for page in self.scorer.ranking() if (page + 1) * QUEST_PAGE_SIZE <= seq_len]

    def wanted(self, seq_len: int, budget: int) -> np.ndarray:
        """Sorted ``[n]`` int64 positions this step's fill may take from the fine levels (the
        ``budget`` most attended tokens of the last step and the voted pages) and the new pages
        whose keys :meth:`observe` reads: what the host tier must have on the device."""
        pages = self._pages(seq_len)
        parts = [self._ranked_tokens(seq_len)[:budget],
                 np.arange(self.scorer.pages_bounded * QUEST_PAGE_SIZE, seq_len // QUEST_PAGE_SIZE * QUEST_PAGE_SIZE)]
        if pages:
            parts.append((np.asarray(pages, dtype=np.int64)[:, None] * QUEST_PAGE_SIZE
                          + np.arange(QUEST_PAGE_SIZE)).reshape(-1))
        return sorted_unique(np.concatenate(parts))

    def stages(self, seq_len: int, budget: int, absent: Optional[np.ndarray] = None) -> Tuple[Stage, Stage, Stage]:
        """What fills the budget after the skeleton and the window, in order: the tokens the last
        step attended most (until all but :data:`PAGE_SHARE`'s share of the budget is used), the
        pages the last vote chose (whole), then more of those tokens. ``absent``: bool ``[>=
        seq_len]``, positions whose KV is not on the device (the host tier): never taken."""
        ranked = self._ranked_tokens(seq_len)
        pages = self._pages(seq_len)
        if absent is not None:
            ranked = ranked[~absent[ranked]]
            pages = [p for p in pages if not absent[p * QUEST_PAGE_SIZE:(p + 1) * QUEST_PAGE_SIZE].any()]
        tokens = token_units(ranked)
        return (Stage(tokens, whole=False, limit=budget - budget // PAGE_SHARE),
                Stage(as_range_array(page_ranges(pages))), Stage(tokens, whole=False))

    def attends(self, ranges: np.ndarray, seq_len: int, budget: int) -> None:
        """This step attends ``ranges`` ``[n, 2]`` (within ``seq_len``): its queries vote for the
        complete pages still outside."""
        complete = seq_len // QUEST_PAGE_SIZE
        covered = range_mask(ranges, seq_len)[: complete * QUEST_PAGE_SIZE]
        outside = ~covered.reshape(complete, QUEST_PAGE_SIZE).all(axis=1)
        self.scorer.ask(torch.from_numpy(np.flatnonzero(outside)), max(1, budget // PAGE_SHARE // QUEST_PAGE_SIZE))

    def watch(self, seq_len: int) -> List[Range]:
        """Positions whose keys :meth:`observe` needs this step: the pages completed since the last
        observed step (their bounds)."""
        first, last = new_pages = self.scorer.new_pages(seq_len)[0]
        return [new_pages] if last > first else []

    def step_signals(self) -> List[torch.Tensor]:
        """This step's page votes and bound sums (see ``Policy.step_signals``)."""
        scorer = self.scorer
        return [t for t in (scorer.page_votes, scorer.page_score_sums) if t is not None]

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        """query ``[num_heads, head_dim]``, keys ``[n, num_kv_heads, head_dim]`` of the new pages'
        ``positions [n]`` (the ones :meth:`watch` listed)."""
        self.scorer.observe(layer_id, query, keys)
