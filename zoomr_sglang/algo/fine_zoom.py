"""ZoomR's finer granularities for thoughts without summaries: pages, then tokens.

A model that writes no summaries indexes each thought by its body's mean key, which says little
about which of its tokens a later step reads, and a paragraph is rarely worth its whole size in the
budget. Under a budget, :class:`FineZoom` then fills what the skeleton (sinks, the open thought's
first tokens, a recent window) leaves in two levels, each scored by the same decode queries; the
prompt is not kept whole but reached through the levels like the reasoning:

* **pages** (coarse): every layer's query heads vote, by Quest's key bounds (the element-wise min
  and max key of each 16-token page), for the pages the working set does not cover; the most voted
  are zoomed into (a quarter of the budget, :data:`PAGE_SHARE`, is kept for them);
* **tokens** (fine): of what the step attended, the tokens that drew the most attention, summed
  over query heads and over layers (the late ones weighing more: ``token_weights.token_layer_weight``),
  stay for the next step; the rest of the budget goes to them.

So a page zoomed into on a bound's promise keeps only the tokens that proved to matter, and the
next pages take the freed room. :meth:`FineZoom.stages` says this as ranked units for the shared
budget step (``Policy.fill``). At an observed step (at refresh points, ``fine_observe``) the token
weights and the page votes are computed on the device for the whole batch (``algo/token_weights.py``,
``algo/page_bounds.py``) and come back two steps later (:meth:`FineZoom.take`); the steps in between
keep the last choice. The per-request reference of the page vote is ``page_scores.PageScorer``.

With the host tier, closed thoughts leave the device whole and the levels bring back only what they
may attend: :meth:`FineZoom.wanted` names those positions before the fill (the host tier copies the
absent ones in), and the stages skip what is still absent (a copy under way on a GPU).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE
from zoomr_sglang.algo.policy_base import Stage, range_positions, token_units
from zoomr_sglang.algo.working_set import sorted_unique

PAGE_SHARE = 4  # 1 / PAGE_SHARE of the budget is kept for pages the bounds newly point at


def zooms_fine(budget: float, zoom_pages: bool, thoughts_closed: int, summaries: int) -> bool:
    """Whether a request zooms into pages and tokens instead of whole thoughts: under a budget,
    where allowed (``implicit_zoom``), once thoughts have closed and none of them had a summary.
    The policy asks it of its skeleton, the request of its counters: one rule."""
    return bool(budget) and zoom_pages and thoughts_closed > 0 and summaries == 0


def pages_wanted(budget: int) -> int:
    """Pages a vote zooms into under a ``budget`` of tokens: :data:`PAGE_SHARE`'s share, at least one."""
    return max(1, budget // PAGE_SHARE // QUEST_PAGE_SIZE)


def first_window(window: int, budget: int) -> int:
    """The recent window taken before the levels under a ``budget`` of tokens: at most
    :data:`PAGE_SHARE`'s share of it. A window as long as the budget's rest would starve both
    levels (a 256-token window under a 550-token budget left the tokens none); what the levels
    leave goes back to the window (``Ranking.window_cap``)."""
    return min(window, budget // PAGE_SHARE)


def page_positions(pages: np.ndarray) -> np.ndarray:
    """``[k, QUEST_PAGE_SIZE]`` int64: the positions of each of ``pages [k]``."""
    return pages[:, None] * QUEST_PAGE_SIZE + np.arange(QUEST_PAGE_SIZE)


class FineZoom:
    """One request's last observed choice: its most attended tokens and its most voted pages."""

    def __init__(self) -> None:
        self._ranked = np.zeros(0, dtype=np.int64)  # the positions with weight, most attended first
        self._pages = np.zeros(0, dtype=np.int64)  # the pages the last vote chose, most voted first

    def take(self, ranges: np.ndarray, weights: np.ndarray, pages: np.ndarray) -> None:
        """An observed step attended ``ranges`` ``[m, 2]``, gave their positions ``weights [n]``
        (summed over query heads and weighed layers, in position order) and its heads voted for ``pages
        [k]``: rank the tokens once, most attended first, ties to the lower position (positions
        without weight are not ranked), and keep the pages."""
        order = np.argsort(-weights, kind="stable")
        self._ranked = range_positions(ranges)[order[weights[order] > 0]]
        self._pages = np.asarray(pages, dtype=np.int64)

    def _ranked_tokens(self, seq_len: int) -> np.ndarray:
        """``[n]`` int64: the ranked positions below ``seq_len``."""
        return self._ranked[self._ranked < seq_len]

    def wanted(self, seq_len: int, budget: int, bounds_end: int) -> np.ndarray:
        """Sorted ``[n]`` int64 positions this step's fill may take from the fine levels (the
        ``budget`` most attended tokens of the last step and the voted pages) and the complete
        pages from ``bounds_end`` on, whose keys their bounds are taken from: what the host tier
        must have on the device."""
        complete = seq_len // QUEST_PAGE_SIZE
        parts = [self._ranked_tokens(seq_len)[:budget],
                 np.arange(min(bounds_end, complete) * QUEST_PAGE_SIZE, complete * QUEST_PAGE_SIZE),
                 page_positions(self._pages).reshape(-1)]
        return sorted_unique(np.concatenate(parts))

    def stages(self, seq_len: int, budget: int, absent: Optional[np.ndarray] = None) -> Tuple[Stage, Stage, Stage]:
        """What fills the budget after the skeleton and the window, in order: the tokens the last
        step attended most (until all but :data:`PAGE_SHARE`'s share of the budget is used), the
        pages the last vote chose (whole), then more of those tokens. ``absent``: bool ``[>=
        seq_len]``, positions whose KV is not on the device (the host tier): never taken."""
        ranked = self._ranked_tokens(seq_len)
        pages = self._pages
        if absent is not None:
            ranked = ranked[~absent[ranked]]
            pages = pages[~absent[page_positions(pages)].any(axis=1)]
        tokens = token_units(ranked)
        return (Stage(tokens, whole=False, limit=budget - budget // PAGE_SHARE),
                Stage(np.stack([pages * QUEST_PAGE_SIZE, (pages + 1) * QUEST_PAGE_SIZE], axis=1)),
                Stage(tokens, whole=False))
