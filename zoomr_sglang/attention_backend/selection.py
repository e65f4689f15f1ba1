"""The device half of a decode step: what the attention reads, the index keys and the vote.

Per step (:meth:`DeviceSelection.load`, outside any CUDA graph): one host-to-device copy of the
step's plan, then the sparse KV-slot list (``kv_indices``, one Triton launch), new index entries
zeroed, new candidates written into the per-row candidate table, the commit table filled, and the
voters chosen on the device: every request decoding a refresh token now (the step's input ids
against a per-vocabulary mask) or asked by the host, packed into voter slots. Per layer
(:meth:`DeviceSelection.after_attention`, inside the graph): one launch adds this step's keys to
their entries and one casts every voter's votes; after the last layer each voter's top-c lands in
a fixed buffer, which the next step copies to pinned host memory.

With attention tensor parallelism each rank holds some of the heads, so each rank's votes are a
part of the vote. After the last layer one all-reduce over SGLang's attention TP group sums the
parts (``votes`` and ``weights`` together, on the device, in the captured graph on CUDA, over gloo
on CPU), so every rank chooses the thoughts one rank holding every head would choose.

On CUDA (and under ``TRITON_INTERPRET=1``) every per-layer call works on fixed-size buffers whose
unused slots the kernels skip, so the same calls can be captured once and replayed. The torch path
(CPU) slices the buffers to the step's counts instead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.batched_votes import VOTE_KINDS, SummaryKeys, select_top
from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.attention_backend.host_plan import HostPlan
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.transfers import copy_to_host, to_device
from zoomr_sglang.config import ZoomRConfig
from zoomr_sglang.kernels.kv_indices import fixed_shapes, ranges_to_kv_indices
from zoomr_sglang.kernels.thought_index import accumulate_votes, commit_keys, vote_scratch

COMMITS_PER_REQUEST = 16  # commit slots per request of the batch; a step's excess waits for the next step


class DeviceSelection:
    """Fixed device buffers for ``max_voters`` voting requests of at most ``max_candidates``
    thoughts each, and the per-row candidate table ``[rows, max_candidates]`` int32."""

    def __init__(self, *, config: ZoomRConfig, index_keys: IndexKeyStore, req_to_token_pool, kv_pool,
                 num_layers: int, num_heads: int, max_voters: int, max_candidates: int, refresh_tokens: np.ndarray,
                 device) -> None:
        self.config = config
        self.index_keys = index_keys
        self.req_to_token = req_to_token_pool.req_to_token
        self.kv_pool = kv_pool
        self.last_layer = num_layers - 1
        outside = [layer for layer in config.vote_layers if layer >= num_layers]
        if outside:
            raise ValueError(f"ZOOMR_VOTE_LAYERS={list(config.vote_layers)} names layer {outside[0]}; allowed: layers"
                             f" 0..{num_layers - 1} of this model (empty: every layer)")
        self.voting_layers = frozenset(config.vote_layers or range(num_layers))
        self.device = torch.device(device)
        self.fixed_shapes = fixed_shapes(self.device)
        dev = dict(device=self.device)
        self.refresh_mask = torch.from_numpy(refresh_tokens).to(self.device)
        self.max_voters = max_voters
        self.row_candidates = torch.zeros(self.req_to_token.shape[0], max_candidates, dtype=torch.int32, **dev)
        # Per row and candidate, its summary content's first position and length (mass votes read its keys).
        self.row_summaries = torch.zeros(self.req_to_token.shape[0], max_candidates, 2, dtype=torch.int32, **dev)
        # Summary tokens a mass vote scores per candidate: a captured graph keeps the configured cap;
        # elsewhere the longest summary any candidate had so far (under the cap) bounds the work.
        self.summary_width = config.vote_summary_tokens if self.device.type == "cuda" else 1
        self.max_commits = COMMITS_PER_REQUEST * max_voters
        self.commit_slots = torch.zeros(self.max_commits, dtype=torch.int64, **dev)
        self.commit_entries = torch.full((self.max_commits,), index_keys.scratch, dtype=torch.int64, **dev)
        self.num_commits = torch.zeros(1, dtype=torch.int64, **dev)
        self.voter_table = torch.zeros(4, max_voters, dtype=torch.int64, **dev)  # row, batch index, candidates, kind
        self.votes = torch.zeros(max_voters, max_candidates, dtype=torch.float32, **dev)
        self.weights = torch.zeros_like(self.votes)
        self.vote_group = attention_tp_group()  # None: this rank holds every head
        self.scratch = vote_scratch(max_voters, num_heads, max_candidates, self.device)
        self.chosen = torch.full((max_voters, config.num_thoughts), -1, dtype=torch.int64, **dev)
        self.agreement = torch.ones(max_voters, dtype=torch.float32, **dev)
        self.commits_bulk = 0  # commits past a step's slots, added before its forward (see load)
        self._last_states: Optional[List[RequestState]] = None  # the last loaded step's requests
        self._readback: Optional[Tuple[Optional[torch.cuda.Event], List[torch.Tensor], List[RequestState]]] = None
        # The torch path's sizes of this step's work: commits, voters, widest candidate list.
        self.active_commits = self.active_voters = self.active_width = 0
        self.active_kinds = (True,) * len(VOTE_KINDS)  # per vote kind, whether this step has such voters
        self.slots = (self.max_commits, max_voters)  # commit and voter slots of this step's launches

    # -- per step (host, outside graphs) --------------------------------------------------------
    def take_selections(self) -> List[Tuple[RequestState, np.ndarray, float]]:
        """Votes copied to the host at the previous load: ``(state, chosen columns [c], agreement)``."""
        if self._readback is None:
            return []
        event, (voters, chosen, agreement), states = self._readback
        self._readback = None
        if event is not None:
            event.synchronize()  # the copy sits right behind a forward the scheduler already waited for
        batch_index, candidates = voters.numpy()
        chosen, agreement = chosen.numpy(), agreement.numpy()
        return [(states[batch_index[v]], chosen[v], float(agreement[v])) for v in np.flatnonzero(candidates > 0)]

    def load(self, plan: HostPlan, input_ids: torch.Tensor, padded_bs: int,
             kv_indices_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Upload ``plan`` and build the step's sparse KV list for ``padded_bs`` requests (CUDA-graph
        padding attends one padding slot each). ``input_ids`` ``[>= bs]``: the tokens this step
        decodes, on the device. Returns ``kv_indptr [padded_bs + 1]`` int32 on the host and
        ``kv_indices`` int32 on the device (written into ``kv_indices_out`` if given)."""
        self._queue_readback()
        # A graph captured for ``padded_bs`` requests launches the per-layer kernels over this many slots.
        self.slots = (min(self.max_commits, COMMITS_PER_REQUEST * padded_bs), min(self.max_voters, padded_bs))
        commits = plan.commits
        padding = padded_bs - plan.batch_size
        ranges = plan.ranges
        if padding:
            ranges = np.concatenate([ranges, _padding_ranges(padding, int(plan.kv_indptr[-1]))])
        # Ranges go column by column: the KV-index kernel reads each field as a contiguous array.
        parts = [ranges.T.reshape(-1), commits.reshape(-1), plan.new_candidates.reshape(-1),
                 np.asarray(plan.fresh_entries, dtype=np.int64), plan.votes.reshape(-1)]
        packed = to_device(np.concatenate(parts), self.device)
        ranges_d, commits_d, candidates_d, fresh_d, votes_d = torch.split(packed, [len(p) for p in parts])
        ranges_d, commits_d = ranges_d.view(4, -1), commits_d.view(-1, 3)
        candidates_d, votes_d = candidates_d.view(-1, 5), votes_d.view(-1, 4)
        if len(fresh_d):
            self.index_keys.zero(fresh_d)
        if len(candidates_d):
            self.row_candidates[candidates_d[:, 0], candidates_d[:, 1]] = candidates_d[:, 2].to(torch.int32)
            self.row_summaries[candidates_d[:, 0], candidates_d[:, 1]] = candidates_d[:, 3:].to(torch.int32)
            widest = min(self.config.vote_summary_tokens, int(plan.new_candidates[:, 4].max()))
            self.summary_width = max(self.summary_width, widest)
        # Every committed position was written by an earlier forward, so a step's commits past its
        # slots (a prompt's pasted reasoning, a retracted request's output) are added now, per layer
        # and outside any graph, rather than queued behind the rows that come next.
        bulk, commits_d = commits_d[self.slots[0]:], commits_d[: self.slots[0]]
        if len(bulk):
            self._commit_now(bulk)
        n_commits = len(commits_d)
        if n_commits:
            self.commit_slots[:n_commits] = self.req_to_token[commits_d[:, 0], commits_d[:, 1]].long()
            self.commit_entries[:n_commits] = commits_d[:, 2]
        self.num_commits.fill_(n_commits)
        # Who may vote is known on the host (candidates > c); who does vote, only on the device.
        may_vote = plan.votes[:, 1] > 0
        self._last_states = plan.states if may_vote.any() else None
        if self._last_states is None:
            self.voter_table[2].zero_()
            voting = torch.zeros(plan.batch_size, dtype=torch.bool)
        else:
            voting = self._choose_voters(votes_d, input_ids[: plan.batch_size])
        if not self.fixed_shapes:  # the torch path sizes its work on the host (CPU: reading is free)
            self.active_commits, self.active_voters = n_commits, int(voting.sum())
            self.active_width = int(plan.votes[:, 1].max()) if may_vote.any() else 0
            self.active_kinds = tuple(torch.bincount(votes_d[:, 2][voting], minlength=len(VOTE_KINDS)).gt(0).tolist())
            if not self.active_voters:
                self._last_states = None
            self.votes[: self.active_voters, : self.active_width].zero_()
            self.weights[: self.active_voters, : self.active_width].zero_()
        elif self._last_states is not None:
            self.votes.zero_()
            self.weights.zero_()
        kv_indptr = plan.kv_indptr
        if padding:
            kv_indptr = torch.cat([kv_indptr, kv_indptr[-1] + torch.arange(1, padding + 1, dtype=torch.int32)])
        kv_indices = ranges_to_kv_indices(self.req_to_token, *ranges_d, int(kv_indptr[-1]), out=kv_indices_out)
        return kv_indptr, kv_indices

    def _commit_now(self, commits: torch.Tensor) -> None:
        """Add the keys of ``commits`` ``[n, 3]`` (row, position, entry; on the device) in every layer."""
        slots = self.req_to_token[commits[:, 0], commits[:, 1]].long()
        entries = commits[:, 2].contiguous()  # once, not per layer
        count = torch.full((1,), len(commits), dtype=torch.int64, device=self.device)
        for layer in range(self.last_layer + 1):
            commit_keys(self.index_keys.sums[layer], self.index_keys.counts[layer], self.kv_pool.get_key_buffer(layer),
                        slots, entries, count)
        self.commits_bulk += len(commits)

    def _choose_voters(self, votes: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Pack the requests that vote now into voter slots, in batch order (device only; past
        ``max_voters`` a step's voters are dropped). Returns the ``[bs]`` bool mask of voters."""
        # Ids past the tokenizer read the mask's last entry (False): see ``refresh_token_mask``.
        refresh = self.refresh_mask[input_ids.clamp(0, self.refresh_mask.shape[0] - 1)]
        voting = (refresh | (votes[:, 3] > 0)) & (votes[:, 1] > 0)
        slot = torch.cumsum(voting.long(), 0) - 1
        target = torch.where(voting & (slot < self.max_voters), slot, self.max_voters)
        table = torch.zeros(4, self.max_voters + 1, dtype=torch.int64, device=self.device)
        batch_index = torch.arange(len(votes), device=self.device)
        table[:, target] = torch.stack([votes[:, 0], batch_index, votes[:, 1], votes[:, 2]])
        self.voter_table.copy_(table[:, : self.max_voters])
        return voting

    def observed_positions(self, plan: HostPlan) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Each observer's positions (CPU) and their KV slots (device); eager steps only."""
        observed = []
        for _, state, spans in plan.observers:
            positions = torch.from_numpy(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans.tolist()]
                                                        + [np.zeros(0, dtype=np.int64)]))
            observed.append((positions, self.req_to_token[state.row, positions.to(self.device)].long()))
        return observed

    def _queue_readback(self) -> None:
        """Copy the last step's voters and choices to pinned host memory behind its forward (no wait)."""
        if self._last_states is None:
            return
        event, copies = copy_to_host([self.voter_table[1:3], self.chosen, self.agreement])
        self._readback = (event, copies, self._last_states)
        self._last_states = None

    # -- per layer (device, graph-safe) --------------------------------------------------------
    def after_attention(self, layer_id: int, query: torch.Tensor, log_normalizer: torch.Tensor,
                        scaling: float) -> None:
        """Add this step's keys of layer ``layer_id`` to their entries and cast its votes.

        Runs after the layer's KV write. query ``[bs, num_heads, head_dim]`` (post-RoPE like the
        cached keys); log_normalizer ``[bs, num_heads]`` float32: natural log of each head's softmax
        denominator over this step's working set (read only for mass votes).
        """
        sums, counts = self.index_keys.sums[layer_id], self.index_keys.counts[layer_id]
        key_buffer = self.kv_pool.get_key_buffer(layer_id)
        # Fixed shapes: the step's slots (fixed per captured batch size; the kernels skip unused ones
        # on the device) and every candidate column. The torch path: exactly this step's work.
        n_commits, n_voters, widest = (*self.slots, None) if self.fixed_shapes else (
            self.active_commits, self.active_voters, self.active_width)
        commit_keys(sums, counts, key_buffer, self.commit_slots[:n_commits], self.commit_entries[:n_commits],
                    self.num_commits)
        if n_voters == 0:
            return
        voter_rows, voter_batch, num_candidates, vote_kind = self.voter_table[:, :n_voters]
        votes, weights = self.votes[:n_voters, :widest], self.weights[:n_voters, :widest]
        if layer_id in self.voting_layers:
            summary = SummaryKeys(self.row_summaries, self.req_to_token, key_buffer, self.summary_width)
            accumulate_votes(query, log_normalizer, sums, counts, self.row_candidates, voter_rows, voter_batch,
                             num_candidates, vote_kind, votes, weights, scaling=scaling, topk=self.config.topk,
                             summary=summary, scratch=self.scratch, kinds=self.active_kinds)
        if layer_id == self.last_layer:
            if self.vote_group is not None:
                summed = self.vote_group.all_reduce(torch.stack([votes, weights]))
                votes.copy_(summed[0])
                weights.copy_(summed[1])
            chosen, agreement = select_top(votes, weights, num_candidates, self.config.num_thoughts)
            self.chosen[: chosen.shape[0]] = chosen
            self.agreement[: agreement.shape[0]] = agreement


def attention_tp_group():
    """SGLang's attention tensor-parallel group (a ``GroupCoordinator``) when it has more than one
    rank; None with one rank or outside an SGLang worker (no process group: unit tests)."""
    if not torch.distributed.is_initialized():
        return None
    from sglang.srt.distributed.parallel_state import get_attn_tp_group

    group = get_attn_tp_group()
    return group if group.world_size > 1 else None


def _padding_ranges(padding: int, offset: int) -> np.ndarray:
    """CUDA-graph padding requests attend one slot each: row 0 (SGLang's padding row), position 0."""
    lanes = np.arange(padding, dtype=np.int64)
    return np.stack([np.zeros_like(lanes), np.zeros_like(lanes), np.ones_like(lanes), offset + lanes], axis=1)
