"""ZoomR's per-step decode planning, shared by the CPU (torch) and CUDA (FlashInfer) backends.

Plan/run split, as in FlashInfer: :meth:`ZoomRController.plan_decode` runs once per decode step on
the host (segmentation, applying the last vote, building every request's working set as a sparse
KV-slot list); :meth:`ZoomRController.after_attention` runs per layer on the device (adds the keys
of newly segmented tokens to their thought's index key, and casts this layer's votes at refresh
points). The backends only add the attention kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.reference import dense_attention_weights, masked_decode_reference, weighted_values
from zoomr_sglang.algo.segmentation import ThoughtSegmenter
from zoomr_sglang.algo.voting import attention_mass, head_votes, score_thoughts
from zoomr_sglang.algo.working_set import Range, ranges_size, ranges_to_positions
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.config import RequestSettings, ZoomRConfig, request_settings
from zoomr_sglang.kernels.kv_indices import flatten_ranges, ranges_to_kv_indices


# Share of output tokens assumed to be summaries before a request has shown its own.
SUMMARY_SHARE_PRIOR = 0.1


@dataclass
class DecodePlan:
    """One decode step's sparse attention layout and index work.

    kv_indptr ``[bs + 1]`` int32 on the CPU; kv_indices ``[nnz]`` int32 KV slots on the device,
    each request's slots in position order. commit_entries / commit_slots ``[m]`` int64 on the
    device: the key stored in ``commit_slots[j]`` is added to index entry ``commit_entries[j]``.
    voters: ``(batch index, state)`` of requests whose query votes in this step.
    observers: ``(batch index, state, positions [n] int64 on the CPU, slots [n] int64 on the device)``
    of requests whose policy learns from this step's queries and those positions' keys.
    states, seq_lens, ranges: per batch index, the request's state, its length and its working set
    as position ranges. self_check: compare this step's outputs with the dense reference.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    commit_entries: Optional[torch.Tensor]
    commit_slots: Optional[torch.Tensor]
    voters: List[Tuple[int, RequestState]]
    states: List[RequestState]
    seq_lens: List[int]
    ranges: List[List[Range]]
    observers: List[Tuple[int, RequestState, torch.Tensor, torch.Tensor]]
    self_check: bool = False


class ZoomRController:
    """Owns every request's :class:`RequestState` and the index-key store of one backend."""

    def __init__(self, *, config: ZoomRConfig, token_texts: Sequence[str], req_to_token_pool,
                 token_to_kv_pool, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, tiering: Optional[ThoughtTiering] = None) -> None:
        self.config = config
        self.token_texts = token_texts
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.device = torch.device(device)
        self.index_keys = IndexKeyStore(num_layers, num_kv_heads, head_dim, self.device)
        self.states: Dict[int, RequestState] = {}  # pool row -> state
        self.finished: "OrderedDict[str, dict]" = OrderedDict()  # rid -> final counters
        self.decode_steps = 0
        self.tiering = tiering  # None: the host tier is off, all KV stays in SGLang's pool
        self.default_settings = request_settings(config, None)
        # row -> (row generation, settings) of requests admitted but not yet decoding
        self.pending_settings: Dict[int, Tuple[int, RequestSettings]] = {}

    def note_request(self, row: int, custom_params) -> None:
        """A request took ``row``: remember its settings (validated by the tokenizer manager
        already; a bad value here falls back to the server's defaults rather than failing the batch)."""
        try:
            settings = request_settings(self.config, custom_params)
        except ValueError:
            settings = self.default_settings
        self.pending_settings[row] = (int(self.req_to_token_pool.req_generation[row]), settings)

    def _tiered(self, state: RequestState) -> bool:
        """Whether the host tier may move this request's KV: only for policies that attend whole
        thoughts, and not while fidelity is measured against the full sequence."""
        return self.tiering is not None and state.policy.thought_level and not state.settings.fidelity

    # -- per step (host) ------------------------------------------------------------------------
    def plan_decode(self, forward_batch) -> DecodePlan:
        """Feed each request's new token, apply last step's votes and build the sparse KV list."""
        rows = forward_batch.req_pool_indices.tolist()
        tokens = forward_batch.input_ids.tolist()
        seq_lens_src = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        seq_lens = seq_lens_src.tolist()
        rids = forward_batch.rids or [None] * len(rows)

        commit_entries: List[int] = []
        commit_rows: List[int] = []
        commit_positions: List[int] = []
        voters: List[Tuple[int, RequestState]] = []
        states: List[RequestState] = []
        for i, (row, token, seq_len) in enumerate(zip(rows, tokens, seq_lens)):
            state = self._state_for(row, rids[i], seq_len)
            state.apply_votes(self.config.num_thoughts)  # no-op unless a vote is open
            events = state.segmenter.feed(token, seq_len - 1)
            for thought, role, positions in events.commits:
                entry = state.entry(thought, role, self.index_keys)
                commit_entries += [entry] * len(positions)
                commit_rows += [row] * len(positions)
                commit_positions += positions
            state.close_thoughts(events.finalized, self.index_keys)
            if state.refresh(events, self.config, seq_len):
                voters.append((i, state))
            states.append(state)

        # Slots of the keys to index are read before the host tier moves anything this step.
        commit_slots = commit_entries_t = None
        if commit_entries:
            commit_slots = self._slots(torch.tensor(commit_rows), torch.tensor(commit_positions)).long()
            commit_entries_t = torch.tensor(commit_entries, dtype=torch.int64).to(self.device, non_blocking=True)

        all_ranges: List[List[Range]] = []
        observers = []
        for i, (state, seq_len) in enumerate(zip(states, seq_lens)):
            tiered = self._tiered(state)
            zoomed = self.tiering.prepare(state, seq_len) if tiered else None
            ranges = state.working_set(seq_len, self.config, zoomed, self.config.window if tiered else None)
            offloaded = self.tiering.offloaded_tokens(state.row) if tiered else 0
            state.record_step(ranges_size(ranges), seq_len, self.config, offloaded)
            all_ranges.append(ranges)
            watched = state.policy.observe_positions(state.view(seq_len, self.config), ranges)
            if watched is not None:
                positions = ranges_to_positions(watched)
                slots = self._slots(torch.full_like(positions, state.row), positions).long()
                observers.append((i, state, positions, slots))
        kv_indptr, kv_indices = self._kv_indices(rows, all_ranges)
        self.decode_steps += 1
        interval = self.config.self_check_interval
        self_check = interval > 0 and self.decode_steps % interval == 0
        return DecodePlan(kv_indptr, kv_indices, commit_entries_t, commit_slots, voters, states, seq_lens,
                          all_ranges, observers, self_check)

    def _kv_indices(self, rows: List[int], all_ranges: List[List[Range]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """kv_indptr ``[bs + 1]`` int32 on the CPU and kv_indices ``[nnz]`` int32 on the device: each
        range is one contiguous copy out of its ``req_to_token`` row (Triton on CUDA, no host sync)."""
        req_to_token = self.req_to_token_pool.req_to_token
        range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges(rows, all_ranges)
        # One host-to-device copy for the four small range tensors.
        packed = torch.stack([range_rows, range_starts, range_lens, out_offsets])
        packed = packed.to(req_to_token.device, non_blocking=True)
        kv_indices = ranges_to_kv_indices(req_to_token, packed[0], packed[1], packed[2], packed[3], int(kv_indptr[-1]))
        return kv_indptr, kv_indices

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """KV slot ids of ``(row, position)`` pairs, gathered on the device from ``req_to_token``."""
        req_to_token = self.req_to_token_pool.req_to_token
        return req_to_token[rows.to(req_to_token.device, non_blocking=True),
                            positions.to(req_to_token.device, non_blocking=True)]

    def _state_for(self, row: int, rid: Optional[str], seq_len: int) -> RequestState:
        generation = int(self.req_to_token_pool.req_generation[row])
        state = self.states.get(row)
        if state is not None and state.generation == generation:
            return state
        if state is not None:
            self.release_row(row)
        # The token fed in a request's first decode step is its first generated token.
        first_position = seq_len - 1
        segmenter = ThoughtSegmenter(
            self.token_texts, boundaries=self.config.boundaries, summary_begin=self.config.summary_begin,
            summary_end=self.config.summary_end, sentence_ends=self.config.sentence_ends,
            max_thought_tokens=self.config.max_thought_tokens, first_position=first_position,
        )
        noted = self.pending_settings.pop(row, None)
        settings = noted[1] if noted is not None and noted[0] == generation else self.default_settings
        state = RequestState(row=row, generation=generation, rid=rid, prompt_len=first_position,
                             segmenter=segmenter, settings=settings, num_thoughts=self.config.num_thoughts)
        self.states[row] = state
        return state

    # -- per layer (device) ---------------------------------------------------------------------
    def after_attention(self, layer_id: int, query: torch.Tensor, plan: DecodePlan, scaling: float) -> None:
        """Index the keys committed this step and cast this layer's votes.

        Runs after the layer's KV write, so the key of the token decoded now is in the pool.
        query: ``[bs, num_heads, head_dim]``, post-RoPE like the cached keys; scaling: the softmax
        scale (H2O accumulates softmax weights).
        """
        if plan.commit_entries is not None:
            keys = self.token_to_kv_pool.get_key_buffer(layer_id)[plan.commit_slots]
            self.index_keys.add(layer_id, plan.commit_entries, keys)
        key_buffer = None
        for batch_index, state in plan.voters:
            index_keys = self.index_keys.means(layer_id, state.candidate_entries)
            scores = score_thoughts(query[batch_index].float(), index_keys)
            if state.settings.vote == "count":
                state.add_votes(*head_votes(scores, self.config.topk))
                continue
            # Mass votes: normalise by this step's softmax denominator over the working set.
            key_buffer = self.token_to_kv_pool.get_key_buffer(layer_id) if key_buffer is None else key_buffer
            lo, hi = int(plan.kv_indptr[batch_index]), int(plan.kv_indptr[batch_index + 1])
            attended_keys = key_buffer.index_select(0, plan.kv_indices[lo:hi]).float()
            attended = score_thoughts(query[batch_index].float(), attended_keys)
            counts = self.index_keys.counts[layer_id, state.candidate_entries]
            mass = attention_mass(scores, counts, torch.logsumexp(attended * scaling, dim=1), scaling)
            state.add_votes(torch.zeros(mass.shape[1], dtype=torch.int64, device=mass.device), mass.sum(dim=0))
        if plan.observers:
            key_buffer = self.token_to_kv_pool.get_key_buffer(layer_id)
            for batch_index, state, positions, slots in plan.observers:
                keys = key_buffer.index_select(0, slots).float()
                state.policy.observe(layer_id, query[batch_index].float(), keys, positions, scaling)

    def check_outputs(self, layer_id: int, query: torch.Tensor, output: torch.Tensor, scaling: float,
                      plan: DecodePlan) -> None:
        """Compare ``output`` [bs, num_heads, v_head_dim] with dense references.

        Self-check steps (``ZOOMR_SELF_CHECK_INTERVAL``): the largest error against the masked
        reference over the same working set. Requests with ``zoomr_fidelity``: the share of the
        dense (whole sequence) attention mass inside the working set, averaged over heads, and
        ``||output - dense|| / ||dense||``.
        """
        fidelity = [i for i, state in enumerate(plan.states) if state.settings.fidelity]
        if not plan.self_check and not fidelity:
            return
        keys = self.token_to_kv_pool.get_key_buffer(layer_id)
        values = self.token_to_kv_pool.get_value_buffer(layer_id)
        for i in range(len(plan.states)) if plan.self_check else fidelity:
            state, seq_len = plan.states[i], plan.seq_lens[i]
            slots = self.req_to_token_pool.req_to_token[state.row, :seq_len].long()
            keep = torch.zeros(seq_len, dtype=torch.bool, device=keys.device)
            for start, end in plan.ranges[i]:
                keep[start:end] = True
            if plan.self_check:
                expected = masked_decode_reference(query[i], keys[slots], values[slots], keep, scaling)
                error = float((output[i].double() - expected).abs().max())
                state.stats.self_checks += 1
                state.stats.self_check_max_error = max(state.stats.self_check_max_error, error)
            if state.settings.fidelity:
                weights = dense_attention_weights(query[i], keys[slots], scaling)  # [num_heads, seq_len]
                dense = weighted_values(weights, values[slots])
                mass = float(weights[:, keep].sum(dim=1).mean())
                rel_error = float((output[i].double() - dense).norm() / dense.norm().clamp_min(1e-30))
                state.stats.add_fidelity(layer_id, mass, rel_error)

    # -- admission (host tier on) ----------------------------------------------------------------
    def device_tokens_per_request(self) -> int:
        """Output tokens a request keeps on the device besides its summaries: sinks, window, the
        open region, the selection and the zoom cache, plus headroom for one round of zoom-ins."""
        config = self.config
        thoughts = 2 + 2 * config.num_thoughts + config.zoom_cache
        return config.sink + config.window + thoughts * config.max_thought_tokens

    def future_device_tokens(self, state: RequestState, remaining: int) -> int:
        """Device tokens a running request may still add: up to the per-request bound, plus its
        summaries at the share they took so far (a prior of 10% until it has written 512 tokens)."""
        written = state.stats.steps
        summary_share = state.summary_tokens / written if written >= 512 else SUMMARY_SHARE_PRIOR
        resident_output = state.stats.resident_last - state.prompt_len
        return max(0, self.device_tokens_per_request() - resident_output) + int(remaining * summary_share)

    def reservation_for_new_request(self, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.device_tokens_per_request() + int(max_new_tokens * SUMMARY_SHARE_PRIOR))

    # -- lifetime -------------------------------------------------------------------------------
    def release_row(self, row: int) -> None:
        """The request in ``row`` left the pool (finished, aborted or retracted)."""
        state = self.states.pop(row, None)
        if self.tiering is not None:
            self.tiering.release_row(row)
        if state is None:
            return
        state.release(self.index_keys)
        if state.stats.rid is not None and self.config.stats_history > 0:
            self.finished[state.stats.rid] = state.stats.as_dict()
            self.finished.move_to_end(state.stats.rid)
            while len(self.finished) > self.config.stats_history:
                self.finished.popitem(last=False)

    def release_all(self) -> None:
        for row in list(self.states):
            self.release_row(row)

    def stats(self) -> dict:
        """Counters for SGLang's server info: running and recently finished requests."""
        return {
            "running": {str(s.stats.rid): s.stats.as_dict() for s in self.states.values()},
            "finished": dict(self.finished),
            "index_entries_live": self.index_keys.num_live,
            "host_tier": None if self.tiering is None else {
                "capacity_tokens": self.tiering.host.capacity,
                "used_tokens": self.tiering.host.num_used,
                **self.tiering.counters.as_dict(),
            },
            "config": dict(self.config.__dict__),
        }
