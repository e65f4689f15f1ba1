"""The host half of a decode step: from SGLang's host view of the batch to a :class:`HostPlan`.

Each request's step is a pipeline: ingest (its new tokens into its segmenter: index commits,
closed thoughts, refreshes, :mod:`ingest`) -> move KV (the host tier's copies, :mod:`tiering`) ->
select (its policy's working set) -> pack (its ranges into the step's lists, :mod:`host_plan`);
then the batch's plan is packed. What the planner keeps per pool row is one record
(:mod:`request_rows`).

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
from typing import List, Optional, Sequence, Tuple

import numpy as np

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.policy_registry import policy_class
from zoomr_sglang.algo.working_set import with_tail
from zoomr_sglang.algo.fine_zoom import pages_wanted
from zoomr_sglang.attention_backend.host_plan import BatchRanges, FineLane, HostPlan, StepLists, request_block
from zoomr_sglang.attention_backend.ingest import TokenIngest
from zoomr_sglang.attention_backend.page_slots import PageBoundSlots
from zoomr_sglang.attention_backend.prompt_reasoning import PromptReasoning, prompt_reasoning
from zoomr_sglang.attention_backend.request_rows import RowRecord, RowRecords
from zoomr_sglang.attention_backend.request_state import RequestState, hash_seed
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.config import RequestSettings, ZoomRConfig, request_settings
from zoomr_sglang.tree_port import Inheritance


logger = logging.getLogger(__name__)


class StepPlanner:
    """Every running request's record (:class:`RowRecord`), fed and planned once per decode step."""

    def __init__(self, *, config: ZoomRConfig, token_texts: Sequence[str], req_to_token_pool,
                 index_keys: IndexKeyStore, max_candidates: int, page_slots: PageBoundSlots,
                 tiering: Optional[ThoughtTiering] = None) -> None:
        self.config = config
        self.token_texts = token_texts
        self.req_to_token_pool = req_to_token_pool
        self.index_keys = index_keys
        self.max_candidates = max_candidates
        self.tiering = tiering
        self.page_slots = page_slots
        self.records = RowRecords()
        self.states = self.records.states  # pool row -> RequestState of every request that has decoded
        self.index_entries_reused = 0  # index keys taken from the radix tree instead of recomputed
        self.over_bound_steps = 0  # request steps over their bound, all requests
        self.default_settings = request_settings(config, None)
        self.ingest = TokenIngest(config, token_texts, index_keys, max_candidates)
        self.fidelity_states = 0  # states measuring zoomr_fidelity (most steps have none)
        self.decode_steps = 0
        self.batch_ranges = BatchRanges()
        self.quiet_steps = True  # plan steady requests from their tickets (tests turn it off to compare)

    # -- requests -----------------------------------------------------------------------------
    def note_request(self, row: int, req, inheritance: Optional[Inheritance] = None) -> None:
        """A request took ``row`` (SGLang's row allocation): remember it and its settings (validated
        where the request entered; a bad value here falls back to the server's defaults rather
        than failing the batch) and what its radix-tree match inherits."""
        settings = self._settings_of(req)
        reasoning = (prompt_reasoning(req, self.config, self.token_texts, inheritance)
                     if policy_class(settings.policy).thought_level else None)
        generation = int(self.req_to_token_pool.req_generation[row])
        self.records.note(row, RowRecord(generation, req, settings, reasoning))
        if reasoning is not None and reasoning.inheritance is not None and self.tiering is not None:
            self.tiering.adopt(row, reasoning.inheritance.cold)

    def _settings_of(self, req) -> RequestSettings:
        try:
            return request_settings(self.config, req.sampling_params.custom_params)
        except ValueError:
            return self.default_settings

    def tree_floor(self, row: int) -> Optional[int]:
        """While the request in ``row`` runs, SGLang's radix tree may take its positions below this."""
        record = self.records.by_row.get(row)
        return None if record is None or record.reasoning is None else record.reasoning.tree_floor

    def accepts_holes(self, req) -> bool:
        """Whether ``req`` can take a prompt prefix whose cold thoughts are in the host tier only."""
        return self._tierable(req, self._settings_of(req))

    def _tierable(self, req, settings: RequestSettings) -> bool:
        """Only a policy that attends whole thoughts, not while fidelity is measured against the full
        sequence, and not with a budget covering the whole request (it attends everything)."""
        if self.tiering is None or not policy_class(settings.policy).thought_level or settings.fidelity:
            return False
        return not 0 < len(req.origin_input_ids) + req.sampling_params.max_new_tokens <= settings.budget

    def _new_state(self, row: int, seq_len: int, new_candidates: List[int]) -> RequestState:
        """The state of the request now in ``row`` (replacing a former request's); its inherited
        candidates go flat into ``new_candidates``."""
        record = self.records.by_row[row]
        if record.state is not None:
            self._drop_state(row)
        # The token decoded in a request's first decode step is its first generated token; a prompt
        # that holds reasoning is segmented from where it starts (or where the inherited part ends).
        first_position = seq_len - 1
        config, req, settings = self.config, record.req, record.settings
        reasoning = record.reasoning or PromptReasoning(first_position, first_position, first_position)
        state = RequestState(row=row, generation=record.generation, rid=req.rid, prompt_len=reasoning.reasoning_start,
                             segmenter=self.ingest.segmenter(reasoning.segment_from), settings=settings,
                             num_thoughts=config.num_thoughts, seed=hash_seed(req.rid, row, record.generation),
                             own_from=reasoning.own_from,
                             tier=self.tiering.tier_of(row) if self._tierable(req, settings) else None,
                             zoomr_bound=config.working_set_bound(reasoning.reasoning_start, 0),
                             zoom_pages=config.implicit_zoom == "pages", implicit_budget=config.implicit_budget)
        if reasoning.inheritance is not None:
            added = state.inherit(reasoning.inheritance, self.index_keys, self.max_candidates)
            for candidate in added:
                new_candidates += (row, *candidate)
            self.index_entries_reused += len(added)
        record.state = state
        self.fidelity_states += state.fidelity
        return state

    def _drop_state(self, row: int) -> None:
        """Forget the state in ``row`` (its request stays noted: its next step starts anew)."""
        state = self.records.take_state(row)
        if state is not None:
            self._release(state)

    def release_row(self, row: int) -> Optional[RequestState]:
        """The request in ``row`` left: its record goes; returns its state (None if it never decoded)."""
        record = self.records.pop(row)
        state = None if record is None else record.state
        if state is not None:
            self._release(state)
        return state

    def _release(self, state: RequestState) -> None:
        state.release(self.index_keys)
        self.page_slots.release(state.row)
        self.fidelity_states -= state.fidelity

    # -- the step -----------------------------------------------------------------------------
    def plan(self, rids: Sequence[str], seq_lens: Sequence[int], selections, observations=()) -> HostPlan:
        """Plan the decode step of requests ``rids`` at sequence lengths ``seq_lens`` (host ints);
        ``selections`` and ``observations``: the device's thought votes and fine levels'
        observations that reached the host since the last step. Per request ingest -> move KV ->
        select (a quiet step from its ticket, or a full one) -> pack, then the batch's plan."""
        for state, chosen, agreement in selections:
            if self.states.get(state.row) is state:
                state.apply_vote(chosen, agreement)
        for state, ranges, weights, pages in observations:
            if self.states.get(state.row) is state:
                state.policy.take_observation(ranges, weights, pages)
        rows, reqs, states = self.records.batch(rids)
        step = StepLists()
        blocks, tails, indptr = step.blocks, step.tails, step.indptr
        for batch_index, (row, req, seq_len) in enumerate(zip(rows, reqs, seq_lens)):
            try:
                state = states[batch_index]
                if state is None:
                    state = states[batch_index] = self._new_state(row, seq_len, step.new_candidates)
                end = len(req.origin_input_ids) + len(req.output_ids)
                if end >= seq_len:
                    end = seq_len - 1  # never the token being decoded (see the module docstring)
                # ingest -> move KV -> select: from its ticket when the step is quiet, else in full
                tail_from = -1
                if state.ticket is not None and state.fed_until + 1 == end:
                    tail_from = self._quiet_step(state, req, seq_len, end, step)
                if tail_from < 0:
                    tail_from = self._full_step(state, req, seq_len, end, batch_index, step)
                # pack (in line: every request of every step): its fixed ranges' block, then its tail
                tail, fixed_end = seq_len - tail_from, indptr[-1] + state.packed_size
                blocks.append(state.packed_block)
                if tail > 0:
                    tails += (row, tail_from, tail, fixed_end)
                else:
                    tail = 0
                indptr.append(fixed_end + tail)
                if state.record_step(state.packed_size + tail, seq_len, state.tier.offloaded if state.tiered else 0):
                    self.over_bound_steps += 1
            except Exception as error:  # one request's failure fails that request, never the batch
                self._fail(step, batch_index, req, row, seq_len, error)
        return self._pack_batch(step, rids, rows, reqs, seq_lens, states)

    def _quiet_step(self, state: RequestState, req, seq_len: int, end: int, step: StepLists) -> int:
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
        if quiet is not None and not state.tier.quiet_holds(quiet, seq_len):
            return -1
        if not self.ingest.feed_quiet(state, req, end, entry, step.commits):
            return -1
        step.votes += (state.row, state.votable, state.vote_kind, False)
        return cut if tail_from is None else tail_from

    def _full_step(self, state: RequestState, req, seq_len: int, end: int, batch_index: int,
                   step: StepLists) -> int:
        """A request step in full, stage by stage, then its ticket. Returns where its tail starts."""
        # Keys of positions fed before this step were added to the index by an earlier step (the
        # device adds every commit in the step that plans it): a thought's KV may leave the
        # device only after its keys were read.
        committed = state.fed_until
        # ingest: its new tokens (index commits, closed thoughts, refreshes), then its vote row
        host_vote = committed < end and self.ingest.feed(state, req, end, seq_len, step.commits, step.fresh,
                                                         step.new_candidates)
        step.votes += (state.row, state.votable, state.vote_kind, host_vote)
        # move KV: the host tier's copies; the selected thoughts on the device
        zoomed = self.tiering.prepare(state, seq_len, committed) if state.tiered else state.zoomed
        # select: the policy's working set, its fixed ranges packed once while they stay
        fixed, tail_from = self._select(state, seq_len, zoomed, batch_index, step)
        if state.packed_fixed is not fixed:
            state.packed_fixed = fixed
            state.packed_block, state.packed_size = request_block(state.row, fixed)
        state.ticket = self._ticket(state)
        return tail_from

    def _select(self, state: RequestState, seq_len: int, zoomed: List[int], batch_index: int,
                step: StepLists) -> Tuple[np.ndarray, int]:
        """The policy's working set ``(fixed [n, 2], tail_from)`` over ``zoomed`` (the selected
        thoughts on the device): a new view only when its inputs changed otherwise than by the
        sequence length; a bounded step's observers and, zooming fine, its page bounds."""
        config = self.config
        fine = bool(state.budget) and state.zooms_fine()
        # A bounded step always makes a view: its set depends on more than the sequence length.
        steady = (not (state.budget or state.view_stale)
                  and (zoomed is state.view_zoomed or zoomed == state.view_zoomed))
        parts = state.policy.working_set_next(seq_len) if steady else None
        if parts is None:
            # With the host tier, a bounded window may grow back to the row's last hole (before any
            # thought left the device: anywhere, as without the tier).
            window_cap = None
            if state.tiered:
                window_cap = seq_len - state.tier.last_hole_end() if state.budget else config.window
            view = state.view(seq_len, config, zoomed, window_cap)
            if fine:
                view.bounds_end = self.page_slots.bounds_end(state.row)
            if state.tiered:  # what the policy may attend beyond whole thoughts, on the device
                view.absent = self.tiering.bring_in_positions(state, state.policy.wanted_positions(view), seq_len)
            parts = state.policy.working_set_parts(view)
            state.view_stale, state.view_zoomed = False, zoomed
        if state.budget:  # only a bounded step observes (see Policy.observe_positions)
            ranges = with_tail(*parts, seq_len)
            watched = state.policy.observe_positions(view, ranges)
            if watched is not None:
                step.observers.append((batch_index, state, np.asarray(watched, dtype=np.int64).reshape(-1, 2)))
            if fine:
                state.bound_slots = num_pages = self.page_slots.bound(state.row, seq_len, view.absent, step.new_pages)
                if state.policy.observes_on_device(view):
                    step.fine_lanes.append(FineLane(batch_index, state, ranges, num_pages,
                                                    pages_wanted(view.budget)))
        return parts

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
            quiet = state.tier.quiet
            if quiet is None or quiet[0] is not state.zoomed or quiet[1] != len(state.pending_eviction):
                return None
        return (*cuts, body_limit, entry, quiet)

    def _fail(self, step: StepLists, batch_index: int, req, row: int, seq_len: int, error: Exception) -> None:
        """This step of a request whose planning raised: what it added so far goes, it attends every
        position (its last step: SGLang finishes it with the error, see ``HostPlan.failed``), votes
        for nothing, and its state is dropped (the next step it may still take, under the overlap
        scheduler, starts anew)."""
        logger.error("zoomr: planning request %r failed; it is aborted", req.rid, exc_info=error)
        step.drop(batch_index, row)
        step.votes += (row, 0, 0, 0)
        block, size = request_block(row, np.array([[0, seq_len]], dtype=np.int64))
        step.blocks.append(block)
        step.indptr.append(step.indptr[-1] + size)
        step.failed.append((req, f"zoomr could not plan request {req.rid!r}: {type(error).__name__}: {error}"))
        self._drop_state(row)

    def _pack_batch(self, step: StepLists, rids: Sequence[str], rows: List[int], reqs: list,
                    seq_lens: Sequence[int], states: List[Optional[RequestState]]) -> HostPlan:
        """The batch's plan from what its requests added; the batch's lookup is kept for the next
        step unless a request failed (its state was dropped: the next step looks the batch up again)."""
        if not step.failed:
            self.records.keep_batch(rids, rows, reqs, states)
        self.decode_steps += 1
        interval = self.config.self_check_interval
        fidelity_rows = ([i for i, state in enumerate(states) if state is not None and state.fidelity]
                         if self.fidelity_states else [])
        return step.plan(rows, seq_lens, states, self.batch_ranges,
                         interval > 0 and self.decode_steps % interval == 0, fidelity_rows)
