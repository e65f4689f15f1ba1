"""What the host remembers about one running request: its thoughts, index entries and selection.

Everything here is host bookkeeping, fed from SGLang's own host view of the request's tokens; the
device holds the index-key sums and the vote (``selection.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.policies import POLICIES, Policy, StepView
from zoomr_sglang.algo.segmentation import SegmentEvents, Thought, ThoughtSegmenter, TokenRole, key_role, summary_span
from zoomr_sglang.config import RequestSettings, ZoomRConfig


Candidate = Tuple[int, int, int, int]  # (column, index entry, summary start, summary length)


@dataclass
class RequestStats:
    """Counters of one request, readable through SGLang's server info (``internal_states``)."""

    rid: Optional[str]
    prompt_len: int
    policy: str = "zoomr"
    budget: int = 0
    steps: int = 0
    attended_last: int = 0
    attended_max: int = 0
    attended_total: int = 0
    dense_last: int = 0
    dense_total: int = 0
    bound_last: int = 0
    over_bound_steps: int = 0  # steps over the bound: ZoomR's (must stay 0) or the budget's
    refreshes: int = 0
    votes_held: int = 0
    selection_changes: int = 0
    thoughts_closed: int = 0
    summaries: int = 0
    agreement_sum: float = 0.0  # count votes only: share of votes that landed in the chosen thoughts
    agreement_votes: int = 0
    inherited_thoughts: int = 0  # closed thoughts taken over from the radix tree (zoomr tree)
    inherited_keys: int = 0  # of those, with an index key (entries reused, not recomputed)
    resident_last: int = 0  # device-resident KV tokens of the request at its last step
    resident_max: int = 0
    offloaded_last: int = 0  # its tokens whose device slots were given back (in the host tier only)
    self_checks: int = 0  # (step, layer) outputs compared with the dense masked reference
    self_check_max_error: float = 0.0
    zoomed: List[int] = field(default_factory=list)
    zoom_history: List[List[int]] = field(default_factory=list)  # each distinct selection, in order
    zoom_steps: List[int] = field(default_factory=list)  # the decode step each of them took effect at
    # zoomr_fidelity: per layer, sums over steps of the share of dense attention probability mass
    # inside the working set and of the relative error of the output against dense attention.
    fidelity_steps: int = 0
    fidelity_mass_sum: List[float] = field(default_factory=list)
    fidelity_error_sum: List[float] = field(default_factory=list)
    fidelity_step_mass: List[float] = field(default_factory=list)  # per decode step, summed over layers
    # Per decode step, the least mass any (layer, query head) kept: low when one head's target is gone.
    fidelity_step_min_head: List[float] = field(default_factory=list)

    def add_fidelity(self, layer_id: int, mass: float, rel_error: float, min_head_mass: float) -> None:
        while len(self.fidelity_mass_sum) <= layer_id:
            self.fidelity_mass_sum.append(0.0)
            self.fidelity_error_sum.append(0.0)
        self.fidelity_mass_sum[layer_id] += mass
        self.fidelity_error_sum[layer_id] += rel_error
        self.fidelity_steps += layer_id == 0
        if layer_id == 0:
            self.fidelity_step_mass.append(0.0)
            self.fidelity_step_min_head.append(1.0)
        self.fidelity_step_mass[-1] += mass
        self.fidelity_step_min_head[-1] = min(self.fidelity_step_min_head[-1], min_head_mass)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["agreement_mean"] = self.agreement_sum / self.agreement_votes if self.agreement_votes else None
        out["resident_fraction"] = self.attended_total / self.dense_total if self.dense_total else None
        if self.fidelity_steps:
            out["fidelity"] = {
                "steps": self.fidelity_steps,
                "mass": [m / self.fidelity_steps for m in self.fidelity_mass_sum],
                "rel_error": [e / self.fidelity_steps for e in self.fidelity_error_sum],
                "step_mass": [m / len(self.fidelity_mass_sum) for m in self.fidelity_step_mass],  # mean over layers
                "step_min_head_mass": list(self.fidelity_step_min_head),
            }
        return out


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
                 own_from: Optional[int] = None) -> None:
        self.row = row
        self.generation = generation
        self.settings = settings
        self.policy: Policy = POLICIES[settings.policy](num_thoughts=num_thoughts, seed=seed, oracle=settings.oracle)
        self.prompt_len = prompt_len
        self.own_from = prompt_len if own_from is None else own_from
        self.segmenter = segmenter
        self.fed_until = segmenter.open_from()
        self.entries: Dict[Tuple[int, TokenRole], int] = {}
        self.candidates: List[int] = []  # closed thoughts with an index key, in closing order
        self.zoomed: List[int] = []
        self.pending_eviction: List[int] = []  # closed thoughts the host tier has not taken yet
        self.tokens_since_refresh = 0
        self.summary_tokens = 0
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
        return added

    def inherit(self, inheritance, store: IndexKeyStore, max_candidates: int) -> List[Candidate]:
        """Take over the closed thoughts a radix-tree path recorded (``radix_ext.notes.Inheritance``;
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
        self.stats.inherited_thoughts = len(inheritance.records)
        self.stats.inherited_keys = len(entries)
        return added

    def _count_closed(self, thought: Thought) -> None:
        self.stats.thoughts_closed += 1
        if thought.summary_start is not None:
            self.summary_tokens += thought.summary_end - thought.summary_start
            self.stats.summaries += 1

    def release(self, store: IndexKeyStore) -> None:
        store.free(self.entries.values())
        self.entries.clear()

    # -- selection ----------------------------------------------------------------------------
    def refresh(self, events: SegmentEvents, refresh_token: bool, config: ZoomRConfig, seq_len: int) -> bool:
        """After the segmenter took one token: at a refresh point, let the policy choose thoughts.

        ``refresh_token``: the token is one the device itself votes at when it decodes it (a
        sentence end, a boundary or the summary end), one step before the host sees it. Returns True
        when the device must vote for this request at the coming step because of a refresh it did
        not see (a thought closed otherwise, or the refresh interval ran out).
        """
        self.tokens_since_refresh += 1
        due = refresh_token or events.sentence_end or events.finalized or self.tokens_since_refresh >= config.refresh_interval
        if not due or not self.policy.thought_level:
            return False
        self.tokens_since_refresh = 0
        self.stats.refreshes += 1
        if not self.policy.votes:
            chosen = self.policy.choose_thoughts(self.view(seq_len, config))
            if chosen is not None:
                self.set_zoomed(chosen)
            return False
        if len(self.candidates) <= config.num_thoughts:
            self.set_zoomed(list(self.candidates))
            return False
        return not refresh_token

    def votable_candidates(self, config: ZoomRConfig) -> int:
        """Candidates a vote this step would rank (0: this request does not vote)."""
        return len(self.candidates) if self.policy.votes and len(self.candidates) > config.num_thoughts else 0

    def apply_vote(self, chosen_columns: np.ndarray, agreement: float) -> None:
        """The device's choice for a vote this request cast (candidate columns, -1 for none)."""
        self.stats.votes_held += 1
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
        self.stats.zoomed = sorted(zoomed)

    # -- working set --------------------------------------------------------------------------
    def view(self, seq_len: int, config: ZoomRConfig, zoomed: Optional[List[int]] = None,
             window_cap: Optional[int] = None) -> StepView:
        return StepView(
            seq_len=seq_len, prompt_len=self.prompt_len, sink=config.sink, window=config.window,
            budget=self.settings.budget, thoughts=self.segmenter.thoughts, candidates=self.candidates,
            zoomed=self.zoomed if zoomed is None else zoomed, open_from=self.segmenter.open_from(),
            window_cap=window_cap, thought_sink=config.thought_sink, zoom_pages=config.implicit_zoom == "pages",
        )

    def record_step(self, attended: int, seq_len: int, config: ZoomRConfig, offloaded: int = 0) -> None:
        stats = self.stats
        stats.resident_last = seq_len - offloaded
        stats.resident_max = max(stats.resident_max, stats.resident_last)
        stats.offloaded_last = offloaded
        if self.settings.budget:
            bound = self.settings.budget
        elif self.policy.votes:
            bound = config.working_set_bound(self.prompt_len, self.summary_tokens)
        else:
            bound = seq_len
        stats.steps += 1
        stats.attended_last, stats.dense_last, stats.bound_last = attended, seq_len, bound
        stats.attended_max = max(stats.attended_max, attended)
        stats.attended_total += attended
        stats.dense_total += seq_len
        stats.over_bound_steps += attended > bound  # with a budget: the skeleton alone exceeded it


def hash_seed(rid: Optional[str], row: int, generation: int) -> int:
    """A per-request seed that does not depend on Python's salted str hash."""
    text = f"{rid}:{row}:{generation}" if rid is None else str(rid)
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % (2 ** 31)
