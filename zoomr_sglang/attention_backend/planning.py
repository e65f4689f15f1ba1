"""The host half of a decode step: from SGLang's host view of the batch to a :class:`HostPlan`.

Runs once per decode step, before the forward (``ModelRunner.forward``'s hook), and reads nothing
from the device: the batch's request ids and host sequence lengths, and each request's tokens from
SGLang's own ``Req`` (``origin_input_ids`` + ``output_ids``). Under the overlap scheduler those lag
up to one step, so the segmenter is fed every token *before* the one being decoded (position
``seq_len - 2`` and earlier) in both scheduler modes: the same tokens, the same decisions, the
same outputs with overlap on or off. The one decode step of lag is covered by the recent window.

Votes are decided on the device: a request votes at the step that decodes a refresh token (a
sentence end, a boundary, the summary end: :func:`ingest.refresh_token_mask`), with that token's own
queries, exactly when the paper does, although the host learns of the token a step later; the host
adds the refreshes only it can see (a thought closed otherwise, the refresh interval). A vote cast
at step t reaches the host through a pinned copy made at step t + 1 and takes effect at step t + 2,
once the scheduler has synchronised on step t's output anyway: no extra sync, the same step in
every mode.

Most request steps change nothing but one token: it extends the open thought's body, no refresh
is due, nothing moves, and the policy's fixed ranges stay. A full step leaves the request a
*ticket* (``RequestState.ticket``: what such a step needs) and the next step, if quiet, is planned
from it (:meth:`StepPlanner._quiet_step`): no event objects, no view, no per-request array (the
ranges are packed per request once and moved as a block, :mod:`host_plan`), and the batch's rows
and states are the last step's while no row changed. ``tests/test_quiet_steps.py`` holds quiet
steps to what full steps plan.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.policy_registry import policy_class
from zoomr_sglang.algo.working_set import with_tail
from zoomr_sglang.attention_backend.host_plan import BatchRanges, HostPlan, request_block, table
from zoomr_sglang.attention_backend.ingest import TokenIngest
from zoomr_sglang.attention_backend.prompt_reasoning import PromptReasoning, prompt_reasoning
from zoomr_sglang.attention_backend.request_state import RequestState, hash_seed
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.config import RequestSettings, ZoomRConfig, request_settings
from zoomr_sglang.tree_port import Inheritance


logger = logging.getLogger(__name__)


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
        self.ingest = TokenIngest(config, token_texts, index_keys, max_candidates)
        self.fidelity_states = 0  # states measuring zoomr_fidelity (most steps have none)
        self.rows_epoch = 0  # changes whenever a row's request or state does (see _batch)
        self._last_batch: Optional[Tuple] = None  # (rows_epoch, rids, rows, reqs, states) of the last step
        self.decode_steps = 0
        self.batch_ranges = BatchRanges()
        self.quiet_steps = True  # plan steady requests from their tickets (tests turn it off to compare)

    def note_request(self, row: int, req, inheritance: Optional[Inheritance] = None) -> None:
        """A request took ``row`` (SGLang's row allocation): remember it and its settings (validated
        where the request entered; a bad value here falls back to the server's defaults rather
        than failing the batch) and what its radix-tree match inherits."""
        settings = self._settings_of(req)
        self.rows_epoch += 1
        self.requests[row] = (int(self.req_to_token_pool.req_generation[row]), req, settings)
        self.rows_by_rid[req.rid] = row
        reasoning = (prompt_reasoning(req, self.config, self.token_texts, inheritance)
                     if policy_class(settings.policy).thought_level else None)
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

    def _tierable(self, req, settings: RequestSettings) -> bool:
        """Only a policy that attends whole thoughts, not while fidelity is measured against the full
        sequence, and not with a budget covering the whole request (it attends everything)."""
        if self.tiering is None or not policy_class(settings.policy).thought_level or settings.fidelity:
            return False
        return not 0 < len(req.origin_input_ids) + req.sampling_params.max_new_tokens <= settings.budget

    def plan(self, rids: Sequence[str], seq_lens: Sequence[int], selections) -> HostPlan:
        """Plan the decode step of requests ``rids`` at sequence lengths ``seq_lens`` (host ints);
        ``selections``: the device votes that reached the host since the last step. Per request a
        quiet step or a full one, then its tail, indptr entry and counters."""
        for state, chosen, agreement in selections:
            if self.states.get(state.row) is state:
                state.apply_vote(chosen, agreement)
        config, tiering = self.config, self.tiering
        rows, reqs, states = self._batch(rids)
        commits, fresh, new_candidates, votes, observers, failed = [], [], [], [], [], []
        blocks, tails, indptr = [], [], [0]  # a request's ranges start at its indptr entry
        for batch_index, (row, req, seq_len) in enumerate(zip(rows, reqs, seq_lens)):
            try:
                state = states[batch_index]
                if state is None:
                    state = states[batch_index] = self._new_state(row, seq_len, new_candidates)
                end = len(req.origin_input_ids) + len(req.output_ids)
                if end >= seq_len:
                    end = seq_len - 1
                tail_from = -1
                if state.ticket is not None and state.fed_until + 1 == end:
                    tail_from = self._quiet_step(state, req, seq_len, end, commits, votes)
                if tail_from < 0:
                    tail_from = self._full_step(state, req, seq_len, end, batch_index, commits, fresh, new_candidates,
                                                votes, observers)
                tail, fixed_end = seq_len - tail_from, indptr[-1] + state.packed_size
                blocks.append(state.packed_block)
                if tail > 0:
                    tails += (row, tail_from, tail, fixed_end)
                else:
                    tail = 0
                indptr.append(fixed_end + tail)
                if state.record_step(state.packed_size + tail, seq_len, tiering.offloaded.get(row, 0) if state.tiered else 0):
                    self.over_bound_steps += 1
            except Exception as error:  # one request's failure fails that request, never the batch
                # Its entries are the last ones of its row (a row is in a batch once); its index
                # entries handed out stay in ``fresh`` (zeroed; freed with its state).
                for flat, width in ((commits, 3), (new_candidates, 5), (tails, 4)):
                    flat[:] = _without_row(flat, width, row)
                observers[:] = [o for o in observers if o[0] != batch_index]
                del votes[4 * batch_index:], blocks[batch_index:], indptr[batch_index + 1:]
                self._fail(req, row, seq_len, error, votes, blocks, indptr)
                failed.append((req, f"zoomr could not plan request {req.rid!r}: {type(error).__name__}: {error}"))
        # A failed request's state was dropped: the next step looks the batch up again.
        self._last_batch = None if failed else (self.rows_epoch, list(rids), rows, reqs, states)
        self.decode_steps += 1
        interval = config.self_check_interval
        kv_indptr = np.array(indptr, dtype=np.int32)
        return HostPlan(
            rows=rows, seq_lens=list(seq_lens), states=states,
            kv_indptr=torch.from_numpy(kv_indptr), ranges=self.batch_ranges(blocks, kv_indptr, tails), commits=table(commits, 3), fresh_entries=fresh,
            new_candidates=table(new_candidates, 5), votes=table(votes, 4), observers=observers,
            self_check=interval > 0 and self.decode_steps % interval == 0,
            fidelity_rows=[i for i, state in enumerate(states) if state is not None and state.fidelity]
            if self.fidelity_states else [],
            failed=failed,
        )

    def _quiet_step(self, state: RequestState, req, seq_len: int, end: int, commits: List[int],
                    votes: List[int]) -> int:
        """The common request step, planned from its ticket (set by its last full step) when the
        step's one new token extends the open thought's body, no refresh is due, the host tier has
        nothing to do and the policy's fixed ranges stay: the token's commit and the request's vote
        row (no vote). Returns where its tail starts; -1, having changed nothing: plan it in full."""
        open_from, window, lo, hi, tail_from, body_limit, entry, quiet = state.ticket
        cut = seq_len - window
        if cut > open_from:
            cut = open_from
        if not lo < cut <= hi or end > body_limit or state.tokens_since_refresh + 1 >= self.ingest.interval:
            return -1
        if quiet is not None and not self.tiering.quiet_holds(state.row, quiet, seq_len):
            return -1
        if not self.ingest.feed_quiet(state, req, end, entry, commits):
            return -1
        votes += (state.row, state.votable, state.vote_kind, False)
        return cut if tail_from is None else tail_from

    def _full_step(self, state: RequestState, req, seq_len: int, end: int, batch_index: int, commits: List[int],
                   fresh: List[int], new_candidates: List[int], votes: List[int], observers: list) -> int:
        """A request step in full: feed its new tokens, vote row, the host tier's moves, its working
        set (packed into ``state.packed_block``), observers; then its ticket. Returns where its tail
        starts."""
        config, tiering, row = self.config, self.tiering, state.row
        # Keys of positions fed before this step were added to the index by an earlier step (the
        # device adds every commit in the step that plans it): a thought's KV may leave the
        # device only after its keys were read.
        committed = state.fed_until
        host_vote = committed < end and self.ingest.feed(state, req, end, seq_len, commits, fresh, new_candidates)
        votes += (row, state.votable, state.vote_kind, host_vote)
        zoomed = tiering.prepare(state, seq_len, committed) if state.tiered else state.zoomed
        # A bounded step always makes a view: its set depends on more than the sequence length.
        steady = (not (state.budget or state.view_stale)
                  and (zoomed is state.view_zoomed or zoomed == state.view_zoomed))
        parts = state.policy.working_set_next(seq_len) if steady else None
        if parts is None:
            view = state.view(seq_len, config, zoomed, config.window if state.tiered else None)
            parts = state.policy.working_set_parts(view)
            state.view_stale, state.view_zoomed = False, zoomed
        fixed, tail_from = parts
        if state.packed_fixed is not fixed:
            state.packed_fixed = fixed
            state.packed_block, state.packed_size = request_block(row, fixed)
        if state.budget:  # only a bounded step observes (see Policy.observe_positions)
            watched = state.policy.observe_positions(view, with_tail(fixed, tail_from, seq_len))
            if watched is not None:
                observers.append((batch_index, state, np.asarray(watched, dtype=np.int64).reshape(-1, 2)))
        state.ticket = self._ticket(state)
        return tail_from

    def _ticket(self, state: RequestState) -> Optional[tuple]:
        """What the request's quiet steps need (see ``RequestState.ticket``), if it may take them:
        no budget (a bounded set depends on more than the length), no fidelity measurement, a
        policy that promises its next ranges, a segmenter that would extend the thought whose
        body key the request holds, and (tiered) a host tier with nothing to do."""
        if state.budget or state.fidelity or not self.quiet_steps:
            return None
        cuts = state.policy.steady_cuts()
        thought, entry = state.body_entry
        quiet_thought, body_limit = state.segmenter.quiet_run()
        if cuts is None or thought < 0 or quiet_thought != thought:
            return None
        quiet = None
        if state.tiered:
            quiet = self.tiering.quiet.get(state.row)
            if quiet is None or quiet[0] is not state.zoomed or quiet[1] != len(state.pending_eviction):
                return None
        return (*cuts, body_limit, entry, quiet)

    def _fail(self, req, row: int, seq_len: int, error: Exception, votes: List[int], blocks: list,
              indptr: List[int]) -> None:
        """This step of a request whose planning raised: it attends every position (its last step:
        SGLang finishes it with the error, see ``HostPlan.failed``), votes for nothing, and its
        state is dropped (the next step it may still take, under the overlap scheduler, starts anew)."""
        logger.error("zoomr: planning request %r failed; it is aborted", req.rid, exc_info=error)
        votes += (row, 0, 0, 0)
        block, size = request_block(row, np.array([[0, seq_len]], dtype=np.int64))
        blocks.append(block)
        indptr.append(indptr[-1] + size)
        self.release_state(row)

    def _batch(self, rids: Sequence[str]) -> Tuple[List[int], list, List[Optional[RequestState]]]:
        """The batch's rows, their ``Req`` and their states (None: to be made); the last step's
        while the batch and every row's request are the same (``rows_epoch`` counts row changes)."""
        last = self._last_batch
        if last is not None and last[0] == self.rows_epoch and last[1] == rids:
            return last[2], last[3], last[4]
        rows, reqs, states = [], [], []
        for rid in rids:
            row = self.rows_by_rid.get(rid)
            if row is None:
                raise RuntimeError(f"zoomr: decode batch holds request {rid!r}, whose pool row was never noted "
                                   "(the ReqToTokenPool.alloc hook did not run for it)")
            generation, req, _ = self.requests[row]
            state = self.states.get(row)
            rows.append(row)
            reqs.append(req)
            states.append(state if state is not None and state.generation == generation else None)
        return rows, reqs, states

    @staticmethod
    def empty_plan() -> HostPlan:
        """A step with no request (a CUDA-graph capture batch is all padding)."""
        return HostPlan(rows=[], seq_lens=[], states=[], kv_indptr=torch.zeros(1, dtype=torch.int32),
                        ranges=np.zeros((0, 4), dtype=np.int64), commits=np.zeros((0, 3), dtype=np.int64), fresh_entries=[],
                        new_candidates=np.zeros((0, 5), dtype=np.int64), votes=np.zeros((0, 4), dtype=np.int64))

    # -- requests -----------------------------------------------------------------------------
    def _new_state(self, row: int, seq_len: int, new_candidates: List[int]) -> RequestState:
        """The state of the request now in ``row`` (replacing a former request's); its inherited
        candidates go flat into ``new_candidates``."""
        generation, req, settings = self.requests[row]
        if row in self.states:
            self.release_state(row)
        # The token decoded in a request's first decode step is its first generated token; a prompt
        # that holds reasoning is segmented from where it starts (or where the inherited part ends).
        first_position = seq_len - 1
        config = self.config
        reasoning = self.prompt_reasoning.get(row) or PromptReasoning(first_position, first_position, first_position)
        segmenter = self.ingest.segmenter(reasoning.segment_from)
        state = RequestState(row=row, generation=generation, rid=req.rid, prompt_len=reasoning.reasoning_start,
                             segmenter=segmenter, settings=settings, num_thoughts=config.num_thoughts,
                             seed=hash_seed(req.rid, row, generation), own_from=reasoning.own_from,
                             tiered=self._tierable(req, settings),
                             zoomr_bound=config.working_set_bound(reasoning.reasoning_start, 0))
        inheritance = reasoning.inheritance
        if inheritance is not None:
            added = state.inherit(inheritance, self.index_keys, self.max_candidates)
            for candidate in added:
                new_candidates += (row, *candidate)
            self.index_entries_reused += len(added)
        self.states[row] = state
        self.fidelity_states += state.fidelity
        return state

    def release_state(self, row: int) -> Optional[RequestState]:
        """Forget the request in ``row``; returns its state (None if it never decoded)."""
        state = self.states.pop(row, None)
        self.rows_epoch += 1
        if state is not None:
            state.release(self.index_keys)
            self.fidelity_states -= state.fidelity
        return state

    def forget_request(self, row: int) -> None:
        self.rows_epoch += 1
        self.prompt_reasoning.pop(row, None)
        noted = self.requests.pop(row, None)
        if noted is not None and self.rows_by_rid.get(noted[1].rid) == row:
            del self.rows_by_rid[noted[1].rid]


def _without_row(flat: List[int], width: int, row: int) -> List[int]:
    """``flat`` (entries of ``width`` ints, the row first) without the entries of ``row``."""
    return [v for start in range(0, len(flat), width) if flat[start] != row for v in flat[start:start + width]]
