"""Working-set policies: which KV positions one request attends at one decode step.

One small class per method behind one interface (the kvpress idea), so that ZoomR and its
baselines run through the same engine, budget accounting and tests:

========== ==================================================================================
full       every position (dense attention)
streaming  sinks + a recent window (StreamingLLM)
h2o        sinks + recent window + heavy hitters by accumulated attention; evictions are final
sumr       sinks + prompt + every summary + recent window (summary-only, no zoom-in)
quest      sinks + recent window + the pages whose min/max key bounds score highest (Quest)
zoomr      sinks + prompt + summaries + the c voted thoughts + recent window
oracle     as zoomr, but the thoughts are the ones the task says the step reads (a ceiling)
random     as zoomr, but c random closed thoughts (a floor)
========== ==================================================================================

``budget`` is the most KV tokens a request may attend per step (0: unbounded). With a budget every
policy keeps what it cannot do without (its sinks, the last :data:`MIN_WINDOW` tokens and, for the
thought policies, the prompt and the summaries), then fills the budget in its own order; the
recent window is shrunk before anything else is dropped and grows into whatever is left. With no
budget, ``zoomr`` is the paper's working set (the open thought attended whole) and ``h2o`` and
``quest`` keep everything.

A policy instance belongs to one request. The engine glue (``attention_backend/controller.py``)
builds a :class:`StepView` each step, asks for :meth:`Policy.working_set`, and hands each layer's
query and the keys of :meth:`Policy.observe_positions` to :meth:`Policy.observe` (H2O and Quest
learn from them; their choice takes effect one step later, like ZoomR's vote). Pure torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from zoomr_sglang.algo.segmentation import Thought
from zoomr_sglang.algo.voting import head_votes, score_thoughts, select_thoughts
from zoomr_sglang.algo.working_set import MIN_WINDOW, Range, merge_ranges, ranges_size, working_set_ranges

QUEST_PAGE_SIZE = 16  # Quest's default page size


@dataclass
class StepView:
    """What a policy sees of one request at one decode step (positions are absolute).

    thoughts: the segmenter's thoughts, ``thoughts[i].index == i``; candidates: closed thoughts that
    have an index key, in closing order; zoomed: the current thought selection (ZoomR's vote, the
    oracle's or the random draw); open_from: first position not inside a closed thought;
    window_cap: with the host tier on, how far back (tokens) a recent window may reach, since
    older closed thoughts may have left the device; None: anywhere.
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


def recent_fill(fixed: Sequence[Range], seq_len: int, budget: int, max_window: int) -> List[Range]:
    """``fixed`` plus the longest recent window ``[seq_len - w, seq_len)``, ``w <= max_window``,
    that keeps the union within ``budget`` tokens (``w >= MIN_WINDOW`` whatever the budget).

    Positions already in ``fixed`` cost nothing, so the window walks back over them for free.
    """
    fixed = merge_ranges(fixed)
    free = budget - ranges_size(fixed)
    start = lowest = max(0, seq_len - max_window)
    for gap_start, gap_end in reversed(_gaps(fixed, lowest, seq_len)):
        if free < gap_end - gap_start:
            start = gap_end - max(free, 0)
            break
        free -= gap_end - gap_start
    start = min(start, max(0, seq_len - MIN_WINDOW))
    return merge_ranges([*fixed, (start, seq_len)])


def _gaps(fixed: Sequence[Range], lo: int, hi: int) -> List[Range]:
    """Parts of [lo, hi) outside the sorted disjoint ranges ``fixed``."""
    gaps, cursor = [], lo
    for start, end in fixed:
        if end <= cursor:
            continue
        if start >= hi:
            break
        if start > cursor:
            gaps.append((cursor, min(start, hi)))
        cursor = max(cursor, end)
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def add_within_budget(base: Sequence[Range], extras: Sequence[Range], budget: int) -> List[Range]:
    """``base`` plus each of ``extras`` in order, whole, while the union stays within ``budget``."""
    chosen = merge_ranges(base)
    for extra in extras:
        trial = merge_ranges([*chosen, extra])
        if ranges_size(trial) <= budget:
            chosen = trial
    return chosen


def mask_to_ranges(mask: torch.Tensor) -> List[Range]:
    """Ranges of the True runs of a 1-D bool mask, ascending."""
    if mask.numel() == 0:
        return []
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8).cpu(), torch.zeros(1, dtype=torch.int8)])
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


class Policy:
    """One request's working-set rule. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str]
    thought_level: ClassVar[bool] = False  # attends whole thoughts: the host tier may offload the rest
    votes: ClassVar[bool] = False  # casts ZoomR's index-key votes at refresh points

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        self.num_thoughts = num_thoughts

    def working_set(self, view: StepView) -> List[Range]:
        raise NotImplementedError

    def choose_thoughts(self, view: StepView) -> Optional[List[int]]:
        """At a refresh point, the thoughts to zoom into (None: keep the selection, or vote)."""
        return None

    def observe_positions(self, view: StepView, ranges: Sequence[Range]) -> Optional[List[Range]]:
        """Positions whose keys :meth:`observe` needs at every layer this step (None: no observing)."""
        return None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        """query ``[num_heads, head_dim]``, keys ``[n, num_kv_heads, head_dim]`` of ``positions [n]``."""


class FullPolicy(Policy):
    name = "full"

    def working_set(self, view: StepView) -> List[Range]:
        return [(0, view.seq_len)] if view.seq_len else []


class StreamingPolicy(Policy):
    """StreamingLLM: attention sinks and a recent window, the window filling the budget."""

    name = "streaming"

    def working_set(self, view: StepView) -> List[Range]:
        sinks = [(0, min(view.sink, view.seq_len))]
        if not view.budget:
            return merge_ranges([*sinks, (max(0, view.seq_len - view.window), view.seq_len)])
        return recent_fill(sinks, view.seq_len, view.budget, view.seq_len)


def _summary_spans(view: StepView) -> List[Range]:
    return [
        (view.thoughts[i].summary_start, view.thoughts[i].summary_end) for i in view.candidates
        if view.thoughts[i].summary_start is not None
    ]


def _thought_skeleton(view: StepView) -> List[Range]:
    """Sinks, the prompt and every closed thought's summary: what thought policies always keep."""
    return merge_ranges([(0, min(view.sink, view.seq_len)), (0, view.prompt_len), *_summary_spans(view)])


class SummaryOnlyPolicy(Policy):
    """Summaries and a recent window, never a thought body once it left the window."""

    name = "sumr"
    thought_level = True

    def working_set(self, view: StepView) -> List[Range]:
        return _zoomed_working_set(view, [])


def _zoomed_working_set(view: StepView, zoomed: Sequence[int]) -> List[Range]:
    """ZoomR's layout: skeleton + zoomed thoughts + window (+ the open thought when unbounded).

    With a budget: the skeleton, then the recent window up to ``view.window``, then each zoomed
    thought whole while it fits, then the window grows into what is left (never past
    ``view.window_cap``).
    """
    spans = [(view.thoughts[i].start, view.thoughts[i].span_end()) for i in zoomed]
    if not view.budget:
        return working_set_ranges(
            seq_len=view.seq_len, prompt_len=view.prompt_len, n_sink=view.sink, n_window=view.window,
            open_from=view.open_from, summary_spans=_summary_spans(view), zoomed_spans=spans,
        )
    cap = view.seq_len if view.window_cap is None else view.window_cap
    base = recent_fill(_thought_skeleton(view), view.seq_len, view.budget, min(view.window, cap))
    with_thoughts = add_within_budget(base, spans, view.budget)
    return recent_fill(with_thoughts, view.seq_len, view.budget, cap)


class ZoomRPolicy(Policy):
    """The c thoughts most voted for by every (layer, query head) over summary mean keys."""

    name = "zoomr"
    thought_level = True
    votes = True

    def working_set(self, view: StepView) -> List[Range]:
        return _zoomed_working_set(view, view.zoomed)


class OraclePolicy(ZoomRPolicy):
    """Zooms into the thoughts the current thought really reads, as the task generator states them.

    ``oracle[i]``: thought indices that thought ``i`` reads, most needed first.
    """

    name = "oracle"
    votes = False

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


class RandomPolicy(ZoomRPolicy):
    """c closed thoughts drawn at random at every refresh point (seeded per request)."""

    name = "random"
    votes = False

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.rng = random.Random(seed)

    def choose_thoughts(self, view: StepView) -> Optional[List[int]]:
        candidates = list(view.candidates)
        return self.rng.sample(candidates, min(self.num_thoughts, len(candidates)))


def current_thought(thoughts: Sequence[Thought]) -> int:
    """Index of the thought being written: the open one, or the next one after the last closed."""
    if thoughts and not thoughts[-1].final:
        return thoughts[-1].index
    return len(thoughts)


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
        self.scores = torch.zeros(0, dtype=torch.float64)  # [positions seen] accumulated attention
        self.evicted = torch.zeros(0, dtype=torch.bool)

    def working_set(self, view: StepView) -> List[Range]:
        n = view.seq_len
        if self.scores.numel() < n:
            grow = n - self.scores.numel()
            self.scores = torch.cat([self.scores, torch.zeros(grow, dtype=torch.float64)])
            self.evicted = torch.cat([self.evicted, torch.zeros(grow, dtype=torch.bool)])
        if view.budget:
            recent = max(MIN_WINDOW, min(view.window, view.budget // 2))
            protected = torch.zeros(n, dtype=torch.bool)
            protected[: min(view.sink, n)] = True
            protected[max(0, n - recent):] = True
            kept = ~self.evicted[:n]
            excess = int(kept.sum()) - view.budget
            if excess > 0:
                # Evict the lowest-scored unprotected kept tokens (ties: the older one).
                eligible = kept & ~protected
                order = torch.argsort(torch.where(eligible, self.scores[:n], torch.inf), stable=True)
                victims = order[: min(excess, int(eligible.sum()))]
                self.evicted[victims] = True
        return mask_to_ranges(~self.evicted[:n])

    def observe_positions(self, view: StepView, ranges: Sequence[Range]) -> Optional[List[Range]]:
        return list(ranges) if view.budget else None

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        logits = score_thoughts(query, keys) * scaling  # [num_heads, n]: q . k per GQA group
        weights = torch.softmax(logits.double(), dim=-1).sum(dim=0)
        self.scores.index_add_(0, positions.cpu(), weights.cpu())


class QuestPolicy(Policy):
    """Quest: pages of :data:`QUEST_PAGE_SIZE` tokens keep per-(layer, KV head) element-wise min and
    max keys, and a query bounds a page's score by ``sum_d max(q_d * min_d, q_d * max_d)``.

    Each (layer, query head) votes for its top pages (as many as the budget holds besides sinks and
    the recent window, a quarter of the budget at most ``view.window``); the most voted pages are
    attended at the next step. The paper selects per head and layer, which SGLang's one slot list
    per request cannot express.
    """

    name = "quest"

    def __init__(self, *, num_thoughts: int, seed: int = 0, oracle: Optional[Sequence[Sequence[int]]] = None) -> None:
        super().__init__(num_thoughts=num_thoughts)
        self.bounds: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (min, max) [pages, kv_heads, d]
        self.pages_bounded = 0  # complete pages whose bounds every layer has stored
        self.candidate_pages = torch.zeros(0, dtype=torch.int64)  # pages voted on this step
        self.pages_wanted = 0
        self.votes: Optional[torch.Tensor] = None  # [len(candidate_pages)] votes cast this step
        self.score_sums: Optional[torch.Tensor] = None
        self.chosen: List[int] = []  # pages attended at the next step, most voted first

    def working_set(self, view: StepView) -> List[Range]:
        if not view.budget:
            return [(0, view.seq_len)]
        if self.votes is not None:  # last step's votes take effect now
            ranked = select_thoughts(self.votes, self.score_sums, self.pages_wanted)
            self.chosen = [int(self.candidate_pages[j]) for j in ranked]
            self.votes = self.score_sums = None
        recent = max(MIN_WINDOW, min(view.window, view.budget // 4))
        base = recent_fill([(0, min(view.sink, view.seq_len))], view.seq_len, view.budget, recent)
        pages = [(p * QUEST_PAGE_SIZE, (p + 1) * QUEST_PAGE_SIZE) for p in self.chosen]
        chosen = add_within_budget(base, pages, view.budget)
        # Pages already attended anyway (sinks, window) are not voted on.
        complete = view.seq_len // QUEST_PAGE_SIZE
        covered = torch.zeros(complete, dtype=torch.bool)
        for start, end in base:
            covered[start // QUEST_PAGE_SIZE: -(-end // QUEST_PAGE_SIZE)] = True
        self.candidate_pages = torch.nonzero(~covered).flatten()
        self.pages_wanted = max(0, (view.budget - ranges_size(base)) // QUEST_PAGE_SIZE)
        return recent_fill(chosen, view.seq_len, view.budget, view.seq_len)

    def observe_positions(self, view: StepView, ranges: Sequence[Range]) -> Optional[List[Range]]:
        if not view.budget:
            return None
        # Keys of the pages completed since the last step, to extend the bounds.
        start, self.pages_bounded = self.pages_bounded, view.seq_len // QUEST_PAGE_SIZE
        return [(start * QUEST_PAGE_SIZE, self.pages_bounded * QUEST_PAGE_SIZE)]

    def observe(self, layer_id: int, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                scaling: float) -> None:
        if keys.shape[0]:
            paged = keys.float().reshape(-1, QUEST_PAGE_SIZE, *keys.shape[1:])
            new_min, new_max = paged.amin(dim=1).cpu(), paged.amax(dim=1).cpu()
            old = self.bounds.get(layer_id)
            self.bounds[layer_id] = (new_min, new_max) if old is None else (
                torch.cat([old[0], new_min]), torch.cat([old[1], new_max]))
        if layer_id not in self.bounds or self.candidate_pages.numel() == 0 or self.pages_wanted == 0:
            return
        lows, highs = self.bounds[layer_id]
        pages = self.candidate_pages
        upper = quest_upper_bound(query.cpu(), lows[pages], highs[pages])
        votes, sums = head_votes(upper, self.pages_wanted)
        if self.votes is None:
            self.votes, self.score_sums = votes, sums
        else:
            self.votes += votes
            self.score_sums += sums


def quest_upper_bound(query: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """Upper bounds [num_heads, n_pages] of ``q . k`` over each page's keys, from query
    [num_heads, head_dim] and the page's element-wise key bounds lows/highs [n_pages, num_kv_heads,
    head_dim] (GQA: consecutive query heads share a KV head)."""
    num_heads, head_dim = query.shape
    n_pages, num_kv_heads, _ = lows.shape
    q = query.float().reshape(num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    per_dim = torch.maximum(q * lows.float().movedim(1, 0)[:, None], q * highs.float().movedim(1, 0)[:, None])
    return per_dim.sum(dim=-1).reshape(num_heads, n_pages)


POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (FullPolicy, StreamingPolicy, H2OPolicy, SummaryOnlyPolicy, QuestPolicy,
                              ZoomRPolicy, OraclePolicy, RandomPolicy)
}
POLICY_NAMES = tuple(POLICIES)
