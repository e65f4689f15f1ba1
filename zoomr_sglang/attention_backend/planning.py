"""The host half of a decode step: from SGLang's host view of the batch to a :class:`HostPlan`.

Runs once per decode step, before the forward (``ModelRunner.forward``'s hook), and reads nothing
from the device: the batch's request ids and host sequence lengths, and each request's tokens from
SGLang's own ``Req`` (``origin_input_ids`` + ``output_ids``). Under the overlap scheduler those lag
up to one step, so the segmenter is fed every token *before* the one being decoded (position
``seq_len - 2`` and earlier) in both scheduler modes: the same tokens, the same decisions, the
same outputs with overlap on or off. The one decode step of lag is covered by the recent window.

Votes are decided on the device: a request votes at the step that decodes a refresh token (a
sentence end, a boundary, the summary end: :func:`refresh_token_mask`), with that token's own
queries, exactly when the paper does, although the host learns of the token a step later; the host
adds the refreshes only it can see (a thought closed otherwise, the refresh interval). A vote cast
at step t reaches the host through a pinned copy made at step t + 1 and takes effect at step t + 2,
once the scheduler has synchronised on step t's output anyway: no extra sync, the same step in
every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.batched_votes import VOTE_KINDS
from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.policies import POLICIES
from zoomr_sglang.algo.segmentation import ThoughtSegmenter
from zoomr_sglang.algo.working_set import ranges_size
from zoomr_sglang.attention_backend.prompt_reasoning import PromptReasoning, prompt_reasoning
from zoomr_sglang.attention_backend.request_state import RequestState, hash_seed
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.config import RequestSettings, ZoomRConfig, request_settings


@dataclass
class HostPlan:
    """One decode step, planned on the host (all arrays on the CPU).

    Shapes: ``bs`` requests, ``n_ranges`` attended position ranges over the batch, ``n_commits``
    keys to add to index entries.

    kv_indptr ``[bs + 1]`` int32: request i attends ``kv_indptr[i + 1] - kv_indptr[i]`` KV tokens;
    ranges ``[n_ranges, 4]`` int64: (pool row, start, length, output offset) per range, in request
    order; commits ``[n_commits, 3]`` int64: (pool row, position, entry); fresh_entries: entries
    handed out this step (zeroed on the device before any key is added); new_candidates
    ``[m, 5]`` int64: (pool row, column, entry, summary start, summary length) appended to the rows'
    candidate tables; votes ``[bs, 4]`` int64 per request: (pool row, candidates a vote would rank,
    0 if it cannot vote; its vote kind, an index into ``VOTE_KINDS``; 1 if the host asks it to vote
    this step whatever token it decodes).
    """

    rows: List[int]
    seq_lens: List[int]
    states: List[RequestState]
    working_sets: List[np.ndarray]  # per request [n, 2] position ranges (diagnostics read them)
    kv_indptr: torch.Tensor
    ranges: np.ndarray
    commits: np.ndarray
    fresh_entries: List[int]
    new_candidates: np.ndarray
    votes: np.ndarray
    observers: List[Tuple[int, RequestState, np.ndarray]] = field(default_factory=list)
    self_check: bool = False
    fidelity_rows: List[int] = field(default_factory=list)  # batch indices measuring zoomr_fidelity

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def needs_eager(self) -> bool:
        """Per-layer Python work (baseline observers, self-checks, fidelity) cannot replay in a graph."""
        return bool(self.observers) or self.self_check or bool(self.fidelity_rows)


class StepPlanner:
    """Every running request's :class:`RequestState`, fed and planned once per decode step."""

    def __init__(self, *, config: ZoomRConfig, token_texts: Sequence[str], req_to_token_pool,
                 index_keys: IndexKeyStore, max_candidates: int,
                 tiering: Optional[ThoughtTiering] = None) -> None:
        self.config = config
        self.token_texts = token_texts
        self.req_to_token_pool = req_to_token_pool
        self.index_keys = index_keys
        self.max_candidates = max_candidates
        self.tiering = tiering
        self.states: Dict[int, RequestState] = {}  # pool row -> state
        self.requests: Dict[int, Tuple[int, object, RequestSettings]] = {}  # row -> (generation, Req, settings)
        self.rows_by_rid: Dict[str, int] = {}
        self.prompt_reasoning: Dict[int, PromptReasoning] = {}  # rows whose prompt holds reasoning
        self.index_entries_reused = 0  # index keys taken from the radix tree instead of recomputed
        self.over_bound_steps = 0  # request steps over their bound, all requests
        self.default_settings = request_settings(config, None)
        self.refresh_tokens = refresh_token_mask(token_texts, config)
        self.decode_steps = 0

    def note_request(self, row: int, req) -> None:
        """A request took ``row`` (SGLang's row allocation): remember it and its settings (validated
        where the request entered; a bad value here falls back to the server's defaults rather
        than failing the batch)."""
        settings = self._settings_of(req)
        self.requests[row] = (int(self.req_to_token_pool.req_generation[row]), req, settings)
        self.rows_by_rid[req.rid] = row
        reasoning = prompt_reasoning(req, self.config, self.token_texts) if POLICIES[settings.policy].thought_level else None
        self.prompt_reasoning.pop(row, None)
        if reasoning is not None:
            self.prompt_reasoning[row] = reasoning
            if reasoning.inheritance is not None and self.tiering is not None:
                self.tiering.adopt(row, reasoning.inheritance.cold)

    def _settings_of(self, req) -> RequestSettings:
        try:
            return request_settings(self.config, req.sampling_params.custom_params)
        except ValueError:
            return self.default_settings

    def tree_floor(self, row: int) -> Optional[int]:
        """While the request in ``row`` runs, SGLang's radix tree may take its positions below this."""
        reasoning = self.prompt_reasoning.get(row)
        return None if reasoning is None else reasoning.tree_floor

    def accepts_holes(self, req) -> bool:
        """Whether ``req`` can take a prompt prefix whose cold thoughts are in the host tier only."""
        return self._tierable(req, self._settings_of(req))

    def tiered(self, state: RequestState) -> bool:
        """Whether the host tier may move this request's KV."""
        return self._tierable(self.requests[state.row][1], state.settings)

    def _tierable(self, req, settings: RequestSettings) -> bool:
        """Only a policy that attends whole thoughts, not while fidelity is measured against the full
        sequence, and not with a budget covering the whole request (it attends everything)."""
        if self.tiering is None or not POLICIES[settings.policy].thought_level or settings.fidelity:
            return False
        return not 0 < len(req.origin_input_ids) + req.sampling_params.max_new_tokens <= settings.budget

    def plan(self, rids: Sequence[str], seq_lens: Sequence[int], selections,
             deferred_from: Optional[Dict[int, int]] = None) -> HostPlan:
        """Plan the decode step of requests ``rids`` at sequence lengths ``seq_lens`` (host ints);
        ``selections``: the device votes that reached the host since the last step;
        ``deferred_from``: per row, the lowest position whose index-key commit still waits."""
        for state, chosen, agreement in selections:
            if self.states.get(state.row) is state:
                state.apply_vote(chosen, agreement)
        rows = [self._row_of(rid) for rid in rids]
        states, commits, fresh, new_candidates, votes, committed = [], [], [], [], [], []
        for row, seq_len in zip(rows, seq_lens):
            state = self._state_for(row, seq_len, new_candidates)
            # Keys of positions fed before this step were read by an earlier forward, unless deferred:
            # a thought's KV may leave the device only after its keys were read.
            committed.append(min(state.fed_until, (deferred_from or {}).get(row, state.fed_until)))
            host_vote = False
            for position in range(state.fed_until, min(seq_len - 1, self._known_length(row))):
                token = self._token(row, position)
                events = state.segmenter.feed(token, position)
                for thought, role, positions in events.commits:
                    entry = state.entry(thought, role, self.index_keys, fresh)
                    if entry is not None:
                        commits += [(row, p, entry) for p in positions]
                added = state.close_thoughts(events.finalized, self.index_keys, self.max_candidates)
                new_candidates += [(row, *candidate) for candidate in added]
                host_vote |= state.refresh(events, bool(self.refresh_tokens[token]), self.config, seq_len)
                state.fed_until = position + 1
            states.append(state)
            votes.append((row, state.votable_candidates(self.config), VOTE_KINDS.index(state.settings.vote),
                          int(host_vote)))
        working_sets, observers = [], []
        for batch_index, (state, seq_len) in enumerate(zip(states, seq_lens)):
            tiered = self.tiered(state)
            zoomed = self.tiering.prepare(state, seq_len, committed[batch_index]) if tiered else None
            view = state.view(seq_len, self.config, zoomed, self.config.window if tiered else None)
            ranges = state.policy.working_set(view)
            offloaded = self.tiering.offloaded_tokens(state.row) if tiered else 0
            state.record_step(ranges_size(ranges), seq_len, self.config, offloaded)
            self.over_bound_steps += state.stats.attended_last > state.stats.bound_last
            working_sets.append(ranges)
            watched = state.policy.observe_positions(view, ranges)
            if watched is not None:
                observers.append((batch_index, state, np.asarray(watched, dtype=np.int64).reshape(-1, 2)))
        self.decode_steps += 1
        interval = self.config.self_check_interval
        return HostPlan(
            rows=rows, seq_lens=list(seq_lens), states=states, working_sets=working_sets,
            kv_indptr=_kv_indptr(working_sets), ranges=_pack_ranges(rows, working_sets),
            commits=np.asarray(commits, dtype=np.int64).reshape(-1, 3), fresh_entries=fresh,
            new_candidates=np.asarray(new_candidates, dtype=np.int64).reshape(-1, 5),
            votes=np.asarray(votes, dtype=np.int64).reshape(-1, 4), observers=observers,
            self_check=interval > 0 and self.decode_steps % interval == 0,
            fidelity_rows=[i for i, state in enumerate(states) if state.settings.fidelity],
        )

    @staticmethod
    def empty_plan() -> HostPlan:
        """A step with no request (a CUDA-graph capture batch is all padding)."""
        return HostPlan(rows=[], seq_lens=[], states=[], working_sets=[], kv_indptr=_kv_indptr([]),
                        ranges=_pack_ranges([], []), commits=np.zeros((0, 3), dtype=np.int64), fresh_entries=[],
                        new_candidates=np.zeros((0, 5), dtype=np.int64), votes=np.zeros((0, 4), dtype=np.int64))

    # -- requests -----------------------------------------------------------------------------
    def _row_of(self, rid: str) -> int:
        row = self.rows_by_rid.get(rid)
        if row is None:
            raise RuntimeError(f"zoomr: decode batch holds request {rid!r}, whose pool row was never noted "
                               "(the ReqToTokenPool.alloc hook did not run for it)")
        return row

    def _known_length(self, row: int) -> int:
        req = self.requests[row][1]
        return len(req.origin_input_ids) + len(req.output_ids)

    def _token(self, row: int, position: int) -> int:
        req = self.requests[row][1]
        prompt = req.origin_input_ids
        return prompt[position] if position < len(prompt) else req.output_ids[position - len(prompt)]

    def _state_for(self, row: int, seq_len: int, new_candidates: list) -> RequestState:
        generation, req, settings = self.requests[row]
        state = self.states.get(row)
        if state is not None and state.generation == generation:
            return state
        if state is not None:
            self.release_state(row)
        # The token decoded in a request's first decode step is its first generated token; a prompt
        # that holds reasoning is segmented from where it starts (or where the inherited part ends).
        first_position = seq_len - 1
        config = self.config
        reasoning = self.prompt_reasoning.get(row) or PromptReasoning(first_position, first_position, first_position)
        segmenter = ThoughtSegmenter(
            self.token_texts, boundaries=config.boundaries, summary_begin=config.summary_begin,
            summary_end=config.summary_end, sentence_ends=config.sentence_ends,
            max_thought_tokens=config.max_thought_tokens, first_position=reasoning.segment_from,
        )
        state = RequestState(row=row, generation=generation, rid=req.rid, prompt_len=reasoning.reasoning_start,
                             segmenter=segmenter, settings=settings, num_thoughts=config.num_thoughts,
                             seed=hash_seed(req.rid, row, generation), own_from=reasoning.own_from)
        inheritance = reasoning.inheritance
        if inheritance is not None:
            added = state.inherit(inheritance, self.index_keys, self.max_candidates)
            new_candidates += [(row, *candidate) for candidate in added]
            self.index_entries_reused += len(added)
        self.states[row] = state
        return state

    def release_state(self, row: int) -> Optional[RequestState]:
        """Forget the request in ``row``; returns its state (None if it never decoded)."""
        state = self.states.pop(row, None)
        if state is not None:
            state.release(self.index_keys)
        return state

    def forget_request(self, row: int) -> None:
        self.prompt_reasoning.pop(row, None)
        noted = self.requests.pop(row, None)
        if noted is not None and self.rows_by_rid.get(noted[1].rid) == row:
            del self.rows_by_rid[noted[1].rid]


def refresh_token_mask(token_texts: Sequence[str], config: ZoomRConfig) -> np.ndarray:
    """``[vocab]`` bool: tokens a request refreshes its selection at the moment it decodes them (text
    holding a sentence end, a thought boundary or the summary end marker)."""
    markers = (*config.sentence_ends, *config.boundaries, config.summary_end)
    return np.fromiter((any(m in text for m in markers) for text in token_texts), dtype=bool, count=len(token_texts))


def _kv_indptr(working_sets: Sequence[np.ndarray]) -> torch.Tensor:
    sizes = np.fromiter((int((w[:, 1] - w[:, 0]).sum()) for w in working_sets), dtype=np.int64,
                        count=len(working_sets))
    return torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))


def _pack_ranges(rows: Sequence[int], working_sets: Sequence[np.ndarray]) -> np.ndarray:
    """``[n_ranges, 4]`` (row, start, length, output offset): each request's ranges laid out after
    the previous request's."""
    if not working_sets:
        return np.zeros((0, 4), dtype=np.int64)
    spans = np.concatenate(working_sets)
    lengths = spans[:, 1] - spans[:, 0]
    range_rows = np.repeat(np.asarray(rows, dtype=np.int64), [len(w) for w in working_sets])
    offsets = np.cumsum(lengths) - lengths
    return np.stack([range_rows, spans[:, 0], lengths, offsets], axis=1)
