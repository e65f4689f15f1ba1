"""The fine levels' observations on the device: token weights and page votes, and their way back.

A step's plan names the requests whose fine levels observe it (``HostPlan.fine_lanes``: the step
after a refresh point, by default). :meth:`FineObservers.load` uploads, in one copy, where their
working sets sit in the step's KV list (host work in the size of those working sets, never of the
sequences), their rows, the pages each may vote on and how many it zooms into; the pages the
working set leaves out (the candidates) are found on the device (``candidate_pages``). Every layer
then, for all of them at once:

- adds its attention weights, ``exp(scaling * q . k - lse)`` summed over heads (one Triton launch on
  CUDA, ``kernels/token_weights.py``; the torch reference on the CPU, ``algo/token_weights.py``);
- casts its query heads' votes for the candidate pages by Quest's bound over the pages' key bounds,
  which sit in KV slots (``page_slots.py``; ``kernels/page_votes.py``, ``algo/page_bounds.py``).

After the last layer, with attention tensor parallelism, one all-reduce sums the ranks' heads, and
each lane's most voted pages are chosen. The next step's load copies weights and choices to pinned
host memory behind the forward (no wait), and the step after that hands them to the requests'
policies, as the thought votes travel (``selection.py``).

The passes have the shapes of the step's observers, so such a step runs eagerly (``HostPlan.needs_eager``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.page_bounds import candidate_pages, select_pages
from zoomr_sglang.algo.token_weights import lane_entries
from zoomr_sglang.attention_backend.host_plan import FineLane, HostPlan
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.selection import copy_to_host
from zoomr_sglang.kernels.page_votes import accumulate_page_votes, page_vote_scratch
from zoomr_sglang.kernels.token_weights import accumulate_token_weights, runs_triton

Observation = Tuple[RequestState, np.ndarray, np.ndarray, np.ndarray]  # state, working set, weights, pages


@dataclass
class _Step:
    """One observed step's device tensors (``n_lanes`` lanes, ``width`` the widest working set,
    ``max_pages`` the most pages a lane may vote on)."""

    lanes: List[FineLane]
    sizes: np.ndarray  # [n_lanes] host ints: each lane's working-set size
    batch_index: torch.Tensor  # [n_lanes] int64
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
    chosen: Optional[torch.Tensor] = None  # [n_lanes, max_wanted] int64, after the last layer


class FineObservers:
    """One step's observing lanes on ``device``: their token weights and page votes."""

    def __init__(self, *, last_layer: int, num_heads: int, kv_pool, page_slots, device, vote_group) -> None:
        self.last_layer = last_layer
        self.num_heads = num_heads
        self.kv_pool = kv_pool
        self.page_slots = page_slots  # page_slots.PageBoundSlots: where the bounds are
        self.device = torch.device(device)
        self.vote_group = vote_group  # None: this rank holds every head
        self._step: Optional[_Step] = None
        self._readback: Optional[Tuple[Optional[torch.cuda.Event], List[torch.Tensor], List[FineLane], np.ndarray]]
        self._readback = None
        self._key_rows: Optional[torch.Tensor] = None  # the gathered keys, reused by every layer and step

    def load(self, plan: HostPlan) -> None:
        """Queue the last step's observations for the host, then set up this step's lanes (host,
        outside graphs; after the page slots' load, which commits the bounds the votes read)."""
        self._queue_readback()
        lanes = plan.fine_lanes
        if not lanes:
            return
        batch_index = np.array([lane.batch_index for lane in lanes], dtype=np.int64)
        entries, lengths = lane_entries(plan.kv_indptr.numpy(), batch_index)
        per_lane = np.array([(lane.state.row, lane.first_page, lane.num_pages, lane.pages_wanted) for lane in lanes],
                            dtype=np.int64)
        spans = np.concatenate([np.column_stack([np.full(len(lane.ranges), i), lane.ranges[:, 0],
                                                 lane.ranges[:, 1] - lane.ranges[:, 0]])
                                for i, lane in enumerate(lanes)]).astype(np.int64)
        parts = [batch_index, lengths, per_lane.T.reshape(-1), spans.T.reshape(-1), entries.reshape(-1)]
        packed = torch.from_numpy(np.concatenate(parts))
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        batch_d, lengths_d, per_lane_d, spans_d, entries_d = torch.split(packed, [len(p) for p in parts])
        rows, first_page, num_pages, wanted = per_lane_d.view(4, -1)
        n_lanes, max_pages = len(lanes), int(per_lane[:, 2].max())
        dev = dict(device=self.device)
        self._step = _Step(
            lanes=lanes, sizes=lengths, batch_index=batch_d, entries=entries_d.view(entries.shape),
            valid=torch.arange(entries.shape[1], **dev)[None, :] < lengths_d[:, None],
            token_weights=torch.zeros(entries.shape, dtype=torch.float32, **dev),
            rows=rows, num_pages=num_pages, wanted=wanted,
            candidate=candidate_pages(*spans_d.view(3, -1), first_page, num_pages, max_pages),
            votes=torch.zeros(n_lanes, max_pages, dtype=torch.float32, **dev),
            page_weights=torch.zeros(n_lanes, max_pages, dtype=torch.float32, **dev),
            scratch=page_vote_scratch(n_lanes, self.num_heads, max_pages, self.device),
            max_wanted=int(per_lane[:, 3].max()),
        )

    @property
    def active(self) -> bool:
        """Whether the loaded step has observing lanes."""
        return self._step is not None

    def after_attention(self, layer_id: int, query: torch.Tensor, log_normalizer: torch.Tensor,
                        kv_indices: torch.Tensor, scaling: float) -> None:
        """Add layer ``layer_id``'s token weights and page votes of every observing lane."""
        step = self._step
        if step is None:
            return
        key_buffer = self.kv_pool.get_key_buffer(layer_id)
        key_rows = None if runs_triton(step.token_weights) else self._gather_buffer(step.entries, key_buffer)
        accumulate_token_weights(query, log_normalizer, key_buffer, kv_indices, step.batch_index, step.entries,
                                 step.valid, step.token_weights, scaling, key_rows=key_rows)
        if step.votes.shape[1]:
            accumulate_page_votes(query.index_select(0, step.batch_index), key_buffer,
                                  self.kv_pool.get_value_buffer(layer_id), self.page_slots.row_pages, step.rows,
                                  step.num_pages, step.candidate, step.wanted, step.votes, step.page_weights,
                                  max_wanted=step.max_wanted, scratch=step.scratch)
        if layer_id != self.last_layer:
            return
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
        chosen = step.chosen if step.chosen is not None else torch.full((len(step.lanes), 0), -1, device=self.device,
                                                                         dtype=torch.int64)
        event, copies = copy_to_host([step.token_weights, chosen])
        self._readback = (event, copies, step.lanes, step.sizes)
