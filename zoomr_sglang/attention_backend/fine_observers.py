"""The fine levels' observations on the device: token weights and page votes, and their way back.

A step's plan names the requests whose fine levels observe it (``HostPlan.fine_lanes``: the step
after a refresh point, by default). :meth:`FineObservers.load` uploads, in one copy, where their
working sets sit in the step's KV list (host work in the size of those working sets, never of the
sequences), their rows, the pages each may vote on and how many it zooms into; the pages the
working set leaves out (the candidates) are found on the device (``candidate_pages``).

In the forward, every layer only copies the lanes' queries and log-sum-exps into fixed buffers
(:meth:`FineObservers.after_attention`: fixed shapes, so the decode step replays its CUDA graph
whether or not a request observes). After the forward, before the next step is planned (the plan
may hand the step's slots to the host tier), :meth:`FineObservers.finish` runs eagerly, for all
lanes at once, layer by layer over the kept queries and the KV the step attended:

- the attention weights, ``exp(scaling * q . k - lse)`` summed over heads, a layer's sum weighed
  by ``(layer + 1) / num_layers`` (``token_layer_weight``; one Triton launch a layer on CUDA,
  ``kernels/token_weights.py``; the torch reference on the CPU, ``algo/token_weights.py``);
- the query heads' votes for the candidate pages by Quest's bound over the pages' key bounds, which
  sit in KV slots (``page_slots.py``; ``kernels/page_votes.py``, ``algo/page_bounds.py``).

Then, with attention tensor parallelism, one all-reduce sums the ranks' heads, and each lane's most
voted pages are chosen. The next step's load copies weights and choices to pinned host memory
behind them (no wait), and the step after that hands them to the requests' policies, as the thought
votes travel (``selection.py``): a choice takes effect two steps after the step it observed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.page_bounds import candidate_pages, select_pages
from zoomr_sglang.algo.token_weights import lane_entries, token_layer_weight
from zoomr_sglang.attention_backend.host_plan import FineLane, HostPlan
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.transfers import copy_to_host, to_device
from zoomr_sglang.kernels.kv_indices import fixed_shapes
from zoomr_sglang.kernels.page_votes import accumulate_page_votes, page_vote_scratch
from zoomr_sglang.kernels.token_weights import accumulate_token_weights, runs_triton

MAX_FINE_LANES = 64  # requests observed in one step (the others keep their choice until their next refresh)
Observation = Tuple[RequestState, np.ndarray, np.ndarray, np.ndarray]  # state, working set, weights, pages


@dataclass
class _Step:
    """One observed step's device tensors (``n_lanes`` lanes, ``width`` the widest working set,
    ``max_pages`` the most pages a lane may vote on)."""

    lanes: List[FineLane]
    sizes: np.ndarray  # [n_lanes] host ints: each lane's working-set size
    lane_ids: torch.Tensor  # [n_lanes] int64: 0..n_lanes-1, the lanes' rows of the kept queries
    entries: torch.Tensor  # [n_lanes, width] int64: each lane's places in the KV list
    valid: torch.Tensor  # [n_lanes, width] bool
    token_weights: torch.Tensor  # [n_lanes, width] float32
    rows: torch.Tensor  # [n_lanes] int64 pool rows
    num_pages: torch.Tensor  # [n_lanes] int64: pages with bounds end here
    wanted: torch.Tensor  # [n_lanes] int64: pages to zoom into
    candidate: torch.Tensor  # [n_lanes, max_pages] bool
    votes: torch.Tensor  # [n_lanes, max_pages] float32
    page_weights: torch.Tensor  # [n_lanes, max_pages] float32
    scratch: torch.Tensor  # the vote kernel's keys [n_lanes, num_heads, max_pages] int32
    max_wanted: int
    chosen: Optional[torch.Tensor] = None  # [n_lanes, max_wanted] int64, once finished
    done: bool = False  # finished: the observations are computed


class FineObservers:
    """The fine levels' observations of up to ``max_lanes`` requests a step on ``device``.

    saved_query ``[num_layers, max_lanes, num_heads, head_dim]`` (the cache's dtype) and saved_lse
    ``[num_layers, max_lanes, num_heads]`` float32: each observing lane's query and log-sum-exp per
    layer, copied in the forward (graph-safe: fixed shapes, lanes padded with batch index 0);
    ``lane_index [max_lanes]`` int64: which batch rows they are."""

    def __init__(self, *, num_layers: int, num_heads: int, head_dim: int, max_lanes: int, kv_pool, page_slots, device,
                 vote_group) -> None:
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.max_lanes = max_lanes
        self.kv_pool = kv_pool
        self.page_slots = page_slots  # page_slots.PageBoundSlots: where the bounds are
        self.device = torch.device(device)
        self.vote_group = vote_group  # None: this rank holds every head
        self.fixed_shapes = fixed_shapes(self.device)
        dtype = kv_pool.get_key_buffer(0).dtype
        self.saved_query = torch.zeros(num_layers, max_lanes, num_heads, head_dim, dtype=dtype, device=self.device)
        self.saved_lse = torch.zeros(num_layers, max_lanes, num_heads, dtype=torch.float32, device=self.device)
        self.lane_index = torch.zeros(max_lanes, dtype=torch.int64, device=self.device)
        self.saving = 0  # the torch path's lanes to save this step (fixed shapes: all max_lanes)
        self.lanes_left_out = 0  # observers past max_lanes in their step, so far (they keep their choice)
        self.scaling = 1.0
        self._step: Optional[_Step] = None
        self._readback: Optional[Tuple[Optional[torch.cuda.Event], List[torch.Tensor], List[FineLane], np.ndarray]]
        self._readback = None
        self._key_rows: Optional[torch.Tensor] = None  # the gathered keys, reused by every layer and step

    def load(self, plan: HostPlan) -> None:
        """Queue the last step's observations for the host, then set up this step's lanes (host,
        outside graphs; the last step's must be :meth:`finish`-ed). Past ``max_lanes`` a step's
        observers are left out: they keep their last choice until their next refresh point."""
        self._queue_readback()
        lanes = plan.fine_lanes[: self.max_lanes]
        self.saving = len(lanes)
        self.lanes_left_out += len(plan.fine_lanes) - len(lanes)
        if self.fixed_shapes:
            self.lane_index.zero_()  # padding lanes copy batch row 0, which every graph has
        if not lanes:
            return
        batch_index = np.array([lane.batch_index for lane in lanes], dtype=np.int64)
        entries, lengths = lane_entries(plan.kv_indptr.numpy(), batch_index)
        per_lane = np.array([(lane.state.row, lane.num_pages, lane.pages_wanted) for lane in lanes],
                            dtype=np.int64)
        spans = np.concatenate([np.column_stack([np.full(len(lane.ranges), i), lane.ranges[:, 0],
                                                 lane.ranges[:, 1] - lane.ranges[:, 0]])
                                for i, lane in enumerate(lanes)]).astype(np.int64)
        parts = [batch_index, lengths, per_lane.T.reshape(-1), spans.T.reshape(-1), entries.reshape(-1)]
        packed = to_device(np.concatenate(parts), self.device)
        batch_d, lengths_d, per_lane_d, spans_d, entries_d = torch.split(packed, [len(p) for p in parts])
        self.lane_index[: len(lanes)] = batch_d
        rows, num_pages, wanted = per_lane_d.view(3, -1)
        n_lanes, max_pages = len(lanes), int(per_lane[:, 1].max())
        dev = dict(device=self.device)
        self._step = _Step(
            lanes=lanes, sizes=lengths, lane_ids=torch.arange(n_lanes, **dev), entries=entries_d.view(entries.shape),
            valid=torch.arange(entries.shape[1], **dev)[None, :] < lengths_d[:, None],
            token_weights=torch.zeros(entries.shape, dtype=torch.float32, **dev),
            rows=rows, num_pages=num_pages, wanted=wanted,
            candidate=candidate_pages(*spans_d.view(3, -1), num_pages, max_pages),
            votes=torch.zeros(n_lanes, max_pages, dtype=torch.float32, **dev),
            page_weights=torch.zeros(n_lanes, max_pages, dtype=torch.float32, **dev),
            scratch=page_vote_scratch(n_lanes, self.num_heads, max_pages, self.device),
            max_wanted=int(per_lane[:, 2].max()),
        )

    def after_attention(self, layer_id: int, query: torch.Tensor, log_normalizer: torch.Tensor,
                        scaling: float) -> None:
        """Keep layer ``layer_id``'s query ``[bs, num_heads, head_dim]`` and log-sum-exp ``[bs,
        num_heads]`` of the observing lanes (graph-safe: on the fixed-shape path every lane slot)."""
        n = self.max_lanes if self.fixed_shapes else self.saving
        if n:
            index = self.lane_index[:n]
            self.saved_query[layer_id, :n] = query.index_select(0, index)
            self.saved_lse[layer_id, :n] = log_normalizer.index_select(0, index)
            self.scaling = scaling

    def finish(self, kv_indices: Optional[torch.Tensor]) -> None:
        """The loaded step's observations, after its forward and before the next step's plan (which
        may give its slots to the host tier): every layer's token weights and page votes of every
        lane from the kept queries, the KV list ``kv_indices`` the step attended and its page bounds
        (eager, a few launches a layer, outside any graph); with attention TP one all-reduce of
        weights and votes; then each lane's pages. Idempotent."""
        step = self._step
        if step is None or step.done:
            return
        step.done = True
        n = len(step.lanes)
        for layer in range(self.num_layers):
            query, lse = self.saved_query[layer, :n], self.saved_lse[layer, :n]
            key_buffer = self.kv_pool.get_key_buffer(layer)
            key_rows = None if runs_triton(step.token_weights) else self._gather_buffer(step.entries, key_buffer)
            accumulate_token_weights(query, lse, key_buffer, kv_indices, step.lane_ids, step.entries, step.valid,
                                     step.token_weights, self.scaling, key_rows=key_rows,
                                     layer_weight=token_layer_weight(layer, self.num_layers))
            if step.votes.shape[1]:
                accumulate_page_votes(query, key_buffer, self.kv_pool.get_value_buffer(layer),
                                      self.page_slots.row_pages, step.rows, step.num_pages, step.candidate,
                                      step.wanted, step.votes, step.page_weights, max_wanted=step.max_wanted,
                                      scratch=step.scratch)
        if self.vote_group is not None:  # every rank adds its heads' part, then chooses as one
            sums = [step.token_weights, step.votes, step.page_weights]
            total = self.vote_group.all_reduce(torch.cat([t.reshape(-1) for t in sums]))
            for t, part in zip(sums, total.split([t.numel() for t in sums])):
                t.copy_(part.view_as(t))
        if step.votes.shape[1]:  # else no lane has a page with bounds (chosen: none)
            step.chosen = select_pages(step.votes, step.page_weights, step.candidate, step.wanted, step.max_wanted)

    def _gather_buffer(self, entries: torch.Tensor, key_buffer: torch.Tensor) -> torch.Tensor:
        """The torch path's buffer for the lanes' keys, kept across layers and steps (the kernel
        reads the keys in place and needs none)."""
        rows, shape = entries.numel(), (key_buffer.shape[1], key_buffer.shape[2])
        held = self._key_rows
        if held is None or held.shape[0] < rows or held.shape[1:] != shape or held.dtype != key_buffer.dtype:
            # room for working sets a quarter larger: they grow a token a step
            self._key_rows = held = key_buffer.new_empty((rows + rows // 4, *shape))
        return held[:rows]

    def take(self) -> List[Observation]:
        """What was copied at the last load: per lane ``(state, working set [n, 2], token weights
        [size], chosen pages [k])``."""
        if self._readback is None:
            return []
        event, (weights, chosen), lanes, sizes = self._readback
        self._readback = None
        if event is not None:
            event.synchronize()  # the copy sits right behind a forward the scheduler already waited for
        weights, chosen = weights.numpy(), chosen.numpy()
        return [(lane.state, lane.ranges, weights[i, :size], chosen[i][chosen[i] >= 0])
                for i, (lane, size) in enumerate(zip(lanes, sizes))]

    def _queue_readback(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if not step.done:
            raise RuntimeError("zoomr: the fine levels' observations of the last step were not finished")
        chosen = step.chosen if step.chosen is not None else torch.full((len(step.lanes), 0), -1, device=self.device,
                                                                         dtype=torch.int64)
        event, copies = copy_to_host([step.token_weights, chosen])
        self._readback = (event, copies, step.lanes, step.sizes)
