"""The baselines that learn from each layer's attention: H2O (tokens) and Quest (pages).

Research baselines, registered with the server only when a setting asks for one
(``zoomr_sglang.algo.policy_registry``). Their per-layer state stays where the keys are (no copy per
layer); the host reads it once per step when it builds the working set. Both observe through a
Python call per request and layer, so a step with either runs eagerly (no CUDA graph).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from zoomr_sglang.algo.page_scores import QUEST_PAGE_SIZE, PageScorer, page_ranges
from zoomr_sglang.algo.policy_base import (Filled, Policy, Ranking, Stage, StepView, mask_to_ranges, range_mask,
                                            token_units)
from zoomr_sglang.algo.voting import score_thoughts
from zoomr_sglang.algo.working_set import MIN_WINDOW, Range, as_range_array
from zoomr_sglang.algo.policy_registry import register_policy


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """[n] float64: the attention query ``[num_heads, head_dim]`` gives each of ``keys``
    ``[n, num_kv_heads, head_dim]`` (softmax over them), summed over the query heads."""
    logits = score_thoughts(query, keys) * scaling  # [num_heads, n]: q . k per GQA group
    return torch.softmax(logits.double(), dim=-1).sum(dim=0)


@register_policy
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

    def rank_units(self, view: StepView) -> Ranking:
        """Keeps the sinks and the recent window (never evicted); ranks the other tokens not evicted
        yet by accumulated attention (ties: the newer one), all of them kept while they fit."""
        n = view.seq_len
        if self.evicted.numel() < n:
            self.evicted = torch.cat([self.evicted, torch.zeros(n - self.evicted.numel(), dtype=torch.bool)])
        kept = ~self.evicted[:n]
        if not view.budget:
            return Ranking(keep=mask_to_ranges(kept))
        scores = torch.zeros(n, dtype=torch.float64)
        if self.scores is not None:
            seen = self.scores[:n].cpu()  # the one read of this request's scores per step
            scores[: seen.numel()] = seen
        recent = max(MIN_WINDOW, min(view.window, view.budget // 2))
        protected = torch.zeros(n, dtype=torch.bool)
        protected[: min(view.sink, n)] = True
        protected[max(0, n - recent):] = True
        eligible = kept & ~protected
        # Lowest first, ties to the older one (the eviction order), reversed: most attended first.
        order = torch.argsort(torch.where(eligible, scores, torch.inf), stable=True)[: int(eligible.sum())]
        tokens = Stage(token_units(order.flip(0).numpy()), whole=False)
        return Ranking(keep=mask_to_ranges(kept & protected), stages=(tokens,))

    def after_fill(self, view: StepView, ranking: Ranking, filled: Filled) -> None:
        """A token the budget left out is evicted for good."""
        if view.budget:
            self.evicted[: view.seq_len] = torch.from_numpy(~range_mask(filled.ranges, view.seq_len))

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


class ObservesPages:
    """A policy mixin: with a budget, each step's new pages extend ``self.scorer``'s key bounds and
    every layer's query votes among the pages the policy asked about."""

    scorer: PageScorer

    def observe_positions(self, view: StepView, ranges: np.ndarray) -> Optional[List[Range]]:
        return self.scorer.new_pages(view.seq_len) if view.budget else None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        self.scorer.observe(layer_id, query, keys)


@register_policy
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

    def rank_units(self, view: StepView) -> Ranking:
        """The sinks and a window, then the pages the last vote chose, most voted first; then the
        window grows. Without a budget, everything."""
        if not view.budget:
            return Ranking(keep=[(0, view.seq_len)])
        recent = max(MIN_WINDOW, min(view.window, view.budget // 4))
        pages = as_range_array(page_ranges(self.scorer.ranking()))
        return Ranking(window=recent, stages=(Stage(pages),), window_cap=view.seq_len)

    def after_fill(self, view: StepView, ranking: Ranking, filled: Filled) -> None:
        """Asks this step's queries to vote on the pages that the sinks and window do not touch."""
        if not view.budget:
            return
        base = filled.reached[0]
        complete = view.seq_len // QUEST_PAGE_SIZE
        touched = base[: complete * QUEST_PAGE_SIZE].reshape(complete, QUEST_PAGE_SIZE).any(axis=1)
        wanted = max(0, (view.budget - int(np.count_nonzero(base))) // QUEST_PAGE_SIZE)
        self.scorer.ask(torch.from_numpy(np.flatnonzero(~touched)), wanted)
