"""What the host remembers about one running request: its thoughts, index entries and selection.

Everything here is host bookkeeping, fed from SGLang's own host view of the request's tokens; the
device holds the index-key sums and the vote (``selection.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.batched_votes import VOTE_KINDS
from zoomr_sglang.algo.fine_zoom import zooms_fine
from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.policies import Policy, StepView
from zoomr_sglang.algo.policy_registry import policy_class
from zoomr_sglang.algo.segmentation import Thought, ThoughtSegmenter, TokenRole, key_role, summary_span
from zoomr_sglang.algo.working_set import step_budget
from zoomr_sglang.attention_backend.request_stats import RequestStats
from zoomr_sglang.config import RequestSettings, ZoomRConfig, least_budget

if TYPE_CHECKING:
    from zoomr_sglang.attention_backend.tier_records import RowTier


Candidate = Tuple[int, int, int, int]  # (column, index entry, summary start, summary length)


class RequestState:
    """Thought table, index entries and zoom-in selection of the request in one pool row.

    ``generation`` is the row's ``ReqToTokenPool.req_generation`` when the state was made, so a
    reused row is never mistaken for the request that held it before. ``fed_until`` is the next
    position the segmenter has not seen. ``prompt_len`` is where the reasoning starts (always
    attended before it); ``own_from`` is the request's first decode position: positions below it may
    belong to SGLang's radix tree and never leave the device through this request.
    """

    def __init__(self, *, row: int, generation: int, rid: Optional[str], prompt_len: int,
                 segmenter: ThoughtSegmenter, settings: RequestSettings, num_thoughts: int, seed: int,
                 own_from: Optional[int] = None, tier: Optional[RowTier] = None, zoomr_bound: int = 0,
                 zoom_pages: bool = False, implicit_budget: float = 0) -> None:
        """``tier``: the host tier's record of this row (``ThoughtTiering.tier_of``) if the tier may
        move this request's KV; ``zoomr_bound``: ZoomR's working-set bound of this request before
        any summary (:meth:`ZoomRConfig.working_set_bound`); each closed summary adds its tokens;
        ``zoom_pages``: the server lets zoomr zoom into pages and tokens (``implicit_zoom``);
        ``implicit_budget``: the share of the sequence it attends without a budget of its own once
        its thoughts close without summaries (``ZoomRConfig.implicit_budget``)."""
        self.row = row
        self.generation = generation
        self.settings = settings
        self.budget = settings.budget
        self.fidelity = settings.fidelity
        self.tier = tier  # read directly by every step (planning.py, tiering.py)
        self.tiered = tier is not None  # the host tier may move this request's KV
        self.vote_kind = VOTE_KINDS.index(settings.vote)
        self.policy: Policy = policy_class(settings.policy)(num_thoughts=num_thoughts, seed=seed, oracle=settings.oracle)
        self.votes = self.policy.votes
        self.zoom_pages = zoom_pages and self.policy.fine_levels
        self.implicit_budget = implicit_budget if not self.budget and self.zoom_pages else 0
        self.num_thoughts = num_thoughts
        self.prompt_len = prompt_len
        self.own_from = prompt_len if own_from is None else own_from
        self.segmenter = segmenter
        self.fed_until = segmenter.open_from()
        self.entries: Dict[Tuple[int, TokenRole], int] = {}
        self.candidates: List[int] = []  # closed thoughts with an index key, in closing order
        self.votable = 0  # candidates a vote would rank now (0: this request does not vote)
        self.zoomed: List[int] = []
        self.pending_eviction: List[int] = []  # closed thoughts the host tier has not taken yet
        self.tokens_since_refresh = 0
        self.fine_due = True  # the fine levels read the next step's queries (fine_observe "refresh")
        self.bound_slots = 0  # device slots its pages' key bounds hold (page_slots.py): resident too
        self.summary_tokens = 0
        # What a step is checked against (record_step): the budget, ZoomR's bound, or 0: the dense
        # sequence (a policy that neither votes nor has a budget attends everything).
        # A budget given as a share of the sequence sets it at every view (step_budget).
        self.step_bound = self.budget or (zoomr_bound if self.votes else 0)
        self.zoomr_bound = zoomr_bound
        self._view: Optional[StepView] = None
        # What the planner keeps from step to step (planning.py): whether the policy's inputs changed
        # otherwise than by the sequence length since its last view (a segmenter event other than a
        # quiet body token), the selection it saw, the packing of its last fixed ranges ([n, 2],
        # as [n, 4] ranges and their size) and the body key of the last quiet token (thought, entry).
        self.view_stale = True
        self.view_zoomed: Optional[List[int]] = None
        self.packed_fixed: Optional[np.ndarray] = None
        self.packed_block: Optional[np.ndarray] = None
        self.packed_size = 0
        self.body_entry: Tuple[int, int] = (-1, -1)
        # What a quiet step needs, set by a full step (StepPlanner._ticket), dropped when the
        # selection changes: (open_from, window, lo, hi, tail_from: Policy.steady_cuts; the end below
        # which a quiet token extends the open thought: ThoughtSegmenter.quiet_run; that thought's
        # body entry; the host tier's quiet record or None).
        self.ticket: Optional[tuple] = None
        self.stats = RequestStats(rid=rid, prompt_len=prompt_len, policy=settings.policy, budget=settings.budget)

    # -- index entries ------------------------------------------------------------------------
    def entry(self, thought: int, role: TokenRole, store: IndexKeyStore, fresh: List[int]) -> Optional[int]:
        """The entry of one key of a thought; a new one is appended to ``fresh`` (to be zeroed on the
        device); None when the store is full (the thought then cannot be zoomed into)."""
        key = (thought, role)
        if key not in self.entries:
            entry = store.alloc()
            if entry is None:
                return None
            self.entries[key] = entry
            fresh.append(entry)
        return self.entries[key]

    def close_thoughts(self, finalized: List[int], store: IndexKeyStore, max_candidates: int) -> List[Candidate]:
        """Make finalized thoughts vote candidates; returns their ``(column, entry, summary start,
        summary length)`` in the row's candidate table. The key a thought will not use goes back to
        the store."""
        added = []
        for index in finalized:
            thought = self.segmenter.thoughts[index]
            role = key_role(thought)
            other = TokenRole.BODY if role is TokenRole.SUMMARY else TokenRole.SUMMARY
            if (index, other) in self.entries:
                store.free([self.entries.pop((index, other))])
            self.pending_eviction.append(index)
            self._count_closed(thought)
            if (index, role) not in self.entries:
                continue  # no key (nothing committed, or the store was full): summaries only
            if len(self.candidates) >= max_candidates:
                store.free([self.entries.pop((index, role))])
                continue
            added.append((len(self.candidates), self.entries[(index, role)], *summary_span(thought)))
            self.candidates.append(index)
        self._count_votable()
        return added

    def inherit(self, inheritance, store: IndexKeyStore, max_candidates: int) -> List[Candidate]:
        """Take over the closed thoughts a radix-tree path recorded (``tree_port.Inheritance``;
        the segmenter starts at ``inheritance.resume_from``) and their index keys, loaded into new
        entries; returns their candidate-table columns as :meth:`close_thoughts` does."""
        self.segmenter.thoughts.extend(r.thought for r in inheritance.records)
        added, entries, sums, counts = [], [], [], []
        for record in inheritance.records:
            index = record.thought.index
            self._count_closed(record.thought)
            if record.key_sums is None or len(self.candidates) >= max_candidates:
                continue
            entry = store.alloc()
            if entry is None:
                break
            self.entries[(index, record.role)] = entry
            added.append((len(self.candidates), entry, *summary_span(record.thought)))
            self.candidates.append(index)
            entries.append(entry)
            sums.append(record.key_sums)
            counts.append(record.key_counts)
        if entries:
            store.load(torch.tensor(entries, dtype=torch.int64, device=store.device), torch.stack(sums, dim=1),
                       torch.stack(counts, dim=1))
        self._count_votable()
        self.stats.inherited_thoughts = len(inheritance.records)
        self.stats.inherited_keys = len(entries)
        return added

    def _count_closed(self, thought: Thought) -> None:
        self.stats.thoughts_closed += 1
        if thought.summary_start is not None:
            self.summary_tokens += thought.summary_end - thought.summary_start
            if self.votes and not self.budget:
                self.step_bound += thought.summary_end - thought.summary_start
            self.stats.summaries += 1
        if self.implicit_budget:
            self._set_implicit_budget()

    def _set_implicit_budget(self) -> None:
        """Without a budget of its own, the request attends ``implicit_budget`` of its sequence
        while its closed thoughts have no summary (pages and tokens: :meth:`zooms_fine`), and
        ZoomR's bound once one has."""
        unsummarized = self.stats.summaries == 0
        self.budget = self.stats.budget = self.implicit_budget if unsummarized else 0
        if not unsummarized:
            self.step_bound = self.zoomr_bound + self.summary_tokens

    def release(self, store: IndexKeyStore) -> None:
        store.free(self.entries.values())
        self.entries.clear()

    # -- selection ----------------------------------------------------------------------------
    def refresh(self, refresh_token: bool, text_refresh: bool, config: ZoomRConfig, seq_len: int) -> bool:
        """After the segmenter took one token: at a refresh point, let the policy choose thoughts.

        ``refresh_token``: the token is one the device itself votes at when it decodes it (a
        sentence end, a boundary or the summary end), one step before the host sees it;
        ``text_refresh``: with it the segmenter saw a sentence end or closed a thought. Returns True
        when the device must vote for this request at the coming step because of a refresh it did
        not see (a thought closed otherwise, or the refresh interval ran out).
        """
        self.tokens_since_refresh += 1
        due = refresh_token or text_refresh or self.tokens_since_refresh >= config.refresh_interval
        if not due or not self.policy.thought_level:
            return False
        self.tokens_since_refresh = 0
        self.stats.refreshes += 1
        if self.zooms_fine():
            self.fine_due = True
            return False
        if not self.policy.votes:
            chosen = self.policy.choose_thoughts(self.view(seq_len, config))
            if chosen is not None:
                self.set_zoomed(chosen)
            return False
        if len(self.candidates) <= config.num_thoughts:
            self.set_zoomed(list(self.candidates))
            return False
        return not refresh_token

    def zooms_fine(self) -> bool:
        """Whether the policy now zooms into pages and tokens, not thoughts (a budget, thoughts
        closed, none with a summary: ``ZoomRPolicy``): the request then votes for no thought and
        zooms into none, so the host tier keeps none of them on the device."""
        return zooms_fine(self.budget, self.zoom_pages, self.stats.thoughts_closed, self.stats.summaries)

    def _count_votable(self) -> None:
        self.votable = (len(self.candidates) if self.votes and len(self.candidates) > self.num_thoughts
                        and not self.zooms_fine() else 0)

    def apply_vote(self, chosen_columns: np.ndarray, agreement: float) -> None:
        """The device's choice for a vote this request cast (candidate columns, -1 for none)."""
        self.stats.votes_held += 1
        if self.zooms_fine():  # cast before the request turned to the fine levels
            return
        if self.settings.vote == "count":
            self.stats.agreement_sum += agreement
            self.stats.agreement_votes += 1
        self.set_zoomed([self.candidates[c] for c in chosen_columns.tolist() if 0 <= c < len(self.candidates)])

    def set_zoomed(self, zoomed: List[int]) -> None:
        if sorted(zoomed) != sorted(self.zoomed):
            self.stats.selection_changes += 1
            self.stats.zoom_history.append(sorted(zoomed))
            self.stats.zoom_steps.append(self.stats.steps)
        self.zoomed = zoomed
        self.ticket = None
        self.stats.zoomed = sorted(zoomed)

    # -- working set --------------------------------------------------------------------------
    def view(self, seq_len: int, config: ZoomRConfig, zoomed: Optional[List[int]] = None,
             window_cap: Optional[int] = None) -> StepView:
        """The policy's view of this step: one object per request, updated in place (a policy reads
        it during the call only); what does not change from step to step is set once."""
        view = self._view
        if view is None:
            view = self._view = StepView(
                seq_len=seq_len, prompt_len=self.prompt_len, sink=config.sink, window=config.window,
                budget=self.budget, thoughts=self.segmenter.thoughts, candidates=self.candidates,
                zoomed=self.zoomed, open_from=0, thought_sink=config.thought_sink,
                zoom_pages=self.zoom_pages,
            )
        view.seq_len, view.window_cap, view.open_from = seq_len, window_cap, self.segmenter.open_from()
        view.observe = self.fine_due or config.fine_observe == "step"
        self.fine_due = False  # this step's view reads the refresh: the levels observe at most once per refresh
        if isinstance(self.budget, float):
            if self.implicit_budget:
                # Never less than the prompt, the open thought's head and the configured window
                # (what a request attends before the levels take over): a share of a short
                # sequence would leave the window a few tokens (SmolLM2 left the full cache's text
                # at ~240 tokens of 1,024). Never more than ZoomR's own bound: the same working
                # set's size as whole thoughts would take at long contexts, spent on pages and tokens.
                least = max(config.sink, self.prompt_len) + config.thought_sink + config.window
                budget = min(step_budget(self.budget, seq_len, least), max(least, self.zoomr_bound))
            else:
                budget = step_budget(self.budget, seq_len, least_budget(config))
            view.budget = self.step_bound = budget
        else:
            view.budget = self.budget
        view.zoomed = self.zoomed if zoomed is None else zoomed
        return view

    def record_step(self, attended: int, seq_len: int, offloaded: int = 0) -> bool:
        """Count one decode step; returns whether it attended more than its bound. (Runs for every
        request at every step: plain stores, no call.)"""
        stats = self.stats
        resident = seq_len - offloaded + self.bound_slots
        bound = self.step_bound or seq_len
        stats.steps += 1
        stats.resident_last, stats.offloaded_last, stats.attended_last, stats.dense_last, stats.bound_last = (
            resident, offloaded, attended, seq_len, bound)
        if resident > stats.resident_max:
            stats.resident_max = resident
        if attended > stats.attended_max:
            stats.attended_max = attended
        stats.attended_total += attended
        stats.dense_total += seq_len
        if attended > bound:  # with a budget: the skeleton alone exceeded it
            stats.over_bound_steps += 1
            return True
        return False

def hash_seed(rid: Optional[str], row: int, generation: int) -> int:
    """A per-request seed that does not depend on Python's salted str hash."""
    text = f"{rid}:{row}:{generation}" if rid is None else str(rid)
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % (2 ** 31)
