"""The baselines that learn from each layer's attention: H2O (tokens) and Quest (pages).

Their per-layer state stays where the keys are (no copy per layer); the host reads it once per
step when it builds the working set. Both observe through a Python call per request and layer, so
a step with either runs eagerly (no CUDA graph): they are comparison baselines, not the fast path.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.policy_base import Policy, StepView, add_within_budget, mask_to_ranges, recent_fill
from zoomr_sglang.algo.voting import head_votes, score_thoughts, select_thoughts
from zoomr_sglang.algo.working_set import MIN_WINDOW, Range, as_range_array, ranges_size

QUEST_PAGE_SIZE = 16  # Quest's default page size


class H2OPolicy(Policy):
    """Heavy-Hitter Oracle: keeps the tokens with the most accumulated attention plus a recent
    window; a token evicted once is never attended again.

    Attention is accumulated over every layer and query head (SGLang's KV slots are shared by all
    heads of a request, so one set per request rather than one per head as in the paper); the
    recent window is half the budget, capped at ``view.window``.
    """

    name = "h2o"

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.scores: Optional[torch.Tensor] = None  # [positions seen] float64 accumulated attention (keys' device)
        self.evicted = torch.zeros(0, dtype=torch.bool)

    def working_set(self, view: StepView) -> np.ndarray:
        n = view.seq_len
        if self.evicted.numel() < n:
            self.evicted = torch.cat([self.evicted, torch.zeros(n - self.evicted.numel(), dtype=torch.bool)])
        if view.budget:
            scores = torch.zeros(n, dtype=torch.float64)
            if self.scores is not None:
                seen = self.scores[:n].cpu()  # the one read of this request's scores per step
                scores[: seen.numel()] = seen
            recent = max(MIN_WINDOW, min(view.window, view.budget // 2))
            protected = torch.zeros(n, dtype=torch.bool)
            protected[: min(view.sink, n)] = True
            protected[max(0, n - recent):] = True
            kept = ~self.evicted[:n]
            excess = int(kept.sum()) - view.budget
            if excess > 0:
                # Evict the lowest-scored unprotected kept tokens (ties: the older one).
                eligible = kept & ~protected
                order = torch.argsort(torch.where(eligible, scores, torch.inf), stable=True)
                victims = order[: min(excess, int(eligible.sum()))]
                self.evicted[victims] = True
        return as_range_array(mask_to_ranges(~self.evicted[:n]))

    def observe_positions(self, view: StepView, ranges: np.ndarray) -> Optional[List[Range]]:
        return [tuple(r) for r in ranges.tolist()] if view.budget else None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        weights = attention_weights(query, keys, scaling)
        positions = positions.to(weights.device)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if self.scores is None or self.scores.numel() < needed:
            grown = torch.zeros(max(needed, 2 * (0 if self.scores is None else self.scores.numel())),
                                dtype=torch.float64, device=weights.device)
            if self.scores is not None:
                grown[: self.scores.numel()] = self.scores
            self.scores = grown
        self.scores.index_add_(0, positions, weights)


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """[n] float64: the attention query ``[num_heads, head_dim]`` gives each of ``keys``
    ``[n, num_kv_heads, head_dim]`` (softmax over them), summed over the query heads."""
    logits = score_thoughts(query, keys) * scaling  # [num_heads, n]: q . k per GQA group
    return torch.softmax(logits.double(), dim=-1).sum(dim=0)


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


class ObservesPages:
    """A policy mixin: with a budget, each step's new pages extend ``self.scorer``'s key bounds and
    every layer's query votes among the pages the policy asked about."""

    scorer: PageScorer

    def observe_positions(self, view: StepView, ranges: np.ndarray) -> Optional[List[Range]]:
        return self.scorer.new_pages(view.seq_len) if view.budget else None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        self.scorer.observe(layer_id, query, keys)


class QuestPolicy(ObservesPages, Policy):
    """Quest: pages keep key bounds (:class:`PageScorer`), and a query bounds a page's score by
    ``sum_d max(q_d * min_d, q_d * max_d)``.

    Each (layer, query head) votes for its top pages (as many as the budget holds besides sinks and
    the recent window, a quarter of the budget at most ``view.window``); the most voted pages are
    attended at the next step. The paper selects per head and layer, which SGLang's one slot list
    per request cannot express.
    """

    name = "quest"

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.scorer = PageScorer()

    def working_set(self, view: StepView) -> np.ndarray:
        if not view.budget:
            return as_range_array([(0, view.seq_len)])
        recent = max(MIN_WINDOW, min(view.window, view.budget // 4))
        base = recent_fill([(0, min(view.sink, view.seq_len))], view.seq_len, view.budget, recent)
        chosen = add_within_budget(base, page_ranges(self.scorer.ranking()), view.budget)
        # Pages already attended anyway (sinks, window) are not voted on.
        complete = view.seq_len // QUEST_PAGE_SIZE
        covered = torch.zeros(complete, dtype=torch.bool)
        for start, end in base:
            covered[start // QUEST_PAGE_SIZE: -(-end // QUEST_PAGE_SIZE)] = True
        self.scorer.ask(torch.nonzero(~covered).flatten(), max(0, (view.budget - ranges_size(base)) // QUEST_PAGE_SIZE))
        return as_range_array(recent_fill(chosen, view.seq_len, view.budget, view.seq_len))


def quest_upper_bound(query: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """Upper bounds [num_heads, n_pages] of ``q . k`` over each page's keys, from query
    [num_heads, head_dim] and the page's element-wise key bounds lows/highs [n_pages, num_kv_heads,
    head_dim] (GQA: consecutive query heads share a KV head)."""
    num_heads, head_dim = query.shape
    n_pages, num_kv_heads, _ = lows.shape
    q = query.float().reshape(num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    per_dim = torch.maximum(q * lows.float().movedim(1, 0)[:, None], q * highs.float().movedim(1, 0)[:, None])
    return per_dim.sum(dim=-1).reshape(num_heads, n_pages)
