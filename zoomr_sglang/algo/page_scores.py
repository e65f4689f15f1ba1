"""Page scores for the fine levels: Quest's per-page key bounds and the page votes they cast.

ZoomR's fine levels (:mod:`fine_zoom`) rank pages by an upper bound of a query's score over each
page's keys (``sum_d max(q_d * min_d, q_d * max_d)``, Quest's bound), and tokens by the attention
weights the step gave them (:mod:`token_weights`). Each (layer, query head) votes for its top
pages; the most voted are attended at the next step.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from zoomr_sglang.algo.voting import head_votes, select_thoughts
from zoomr_sglang.algo.working_set import Range

QUEST_PAGE_SIZE = 16  # Quest's default page size


class PageScorer:
    """Quest's page index for one request: per (layer, KV head) element-wise min and max keys of
    every complete :data:`QUEST_PAGE_SIZE`-token page, and the votes of each (layer, query head)
    for its top pages among the ones asked about at a step (they rank the pages at the next step)."""

    def __init__(self) -> None:
        self.ranked: List[int] = []  # pages the last vote chose, most voted first
        self.bounds: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (min, max) [pages, kv_heads, d]
        self.pages_bounded = 0  # complete pages whose bounds every layer has stored
        self.candidate_pages = torch.zeros(0, dtype=torch.int64)  # pages voted on this step
        self.pages_wanted = 0
        self.page_votes: Optional[torch.Tensor] = None  # [len(candidate_pages)] votes cast this step
        self.page_score_sums: Optional[torch.Tensor] = None

    def ranking(self) -> List[int]:
        """The pages the last vote chose, most voted first; last step's votes, if any, take effect now."""
        if self.page_votes is not None:
            ranked = select_thoughts(self.page_votes, self.page_score_sums, self.pages_wanted)
            self.ranked = [int(self.candidate_pages[j]) for j in ranked]
            self.page_votes = self.page_score_sums = None
        return self.ranked

    def ask(self, candidate_pages: torch.Tensor, pages_wanted: int) -> None:
        """This step's layers vote for ``pages_wanted`` of ``candidate_pages`` (int64 page numbers)."""
        self.candidate_pages, self.pages_wanted = candidate_pages, pages_wanted

    def new_pages(self, seq_len: int) -> List[Range]:
        """Positions of the pages completed since the last step: their keys extend the bounds."""
        start, self.pages_bounded = self.pages_bounded, seq_len // QUEST_PAGE_SIZE
        return [(start * QUEST_PAGE_SIZE, self.pages_bounded * QUEST_PAGE_SIZE)]

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        if keys.shape[0]:
            paged = keys.float().reshape(-1, QUEST_PAGE_SIZE, *keys.shape[1:])
            new_min, new_max = paged.amin(dim=1), paged.amax(dim=1)
            old = self.bounds.get(layer_id)
            self.bounds[layer_id] = (new_min, new_max) if old is None else (
                torch.cat([old[0], new_min]), torch.cat([old[1], new_max]))
        if layer_id not in self.bounds or self.candidate_pages.numel() == 0 or self.pages_wanted == 0:
            return
        lows, highs = self.bounds[layer_id]
        pages = self.candidate_pages.to(lows.device)
        votes, sums = head_votes(quest_upper_bound(query, lows[pages], highs[pages]), self.pages_wanted)
        if self.page_votes is None:
            self.page_votes, self.page_score_sums = votes, sums
        else:
            self.page_votes += votes
            self.page_score_sums += sums


def page_ranges(pages: Sequence[int]) -> List[Range]:
    return [(p * QUEST_PAGE_SIZE, (p + 1) * QUEST_PAGE_SIZE) for p in pages]


def quest_upper_bound(query: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """Upper bounds [num_heads, n_pages] of ``q . k`` over each page's keys, from query
    [num_heads, head_dim] and the page's element-wise key bounds lows/highs [n_pages, num_kv_heads,
    head_dim] (GQA: consecutive query heads share a KV head)."""
    num_heads, head_dim = query.shape
    n_pages, num_kv_heads, _ = lows.shape
    q = query.float().reshape(num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    per_dim = torch.maximum(q * lows.float().movedim(1, 0)[:, None], q * highs.float().movedim(1, 0)[:, None])
    return per_dim.sum(dim=-1).reshape(num_heads, n_pages)
