"""The fine levels' token weights on the device, and their way back to the host.

A step's plan names the requests whose token level observes it (``HostPlan.token_lanes``: the step
after a refresh point, by default). :meth:`TokenObservers.load` places their working sets in the
step's KV list (host work in the size of those working sets, never of the sequences) and uploads
that in one copy; every layer then adds its attention weights in one batched pass (one Triton
launch on CUDA, ``kernels/token_weights.py``; the torch reference on the CPU,
:func:`zoomr_sglang.algo.token_weights.accumulate_token_weights`); after the last layer, with
attention tensor parallelism, one all-reduce sums the ranks' heads. The next step's load copies the
weights to pinned host memory behind the forward (no wait), and the step after that hands them to
the requests' policies, as the thought votes travel (``selection.py``).

The pass has the shapes of the step's observers, so such a step runs eagerly (``HostPlan.needs_eager``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from zoomr_sglang.algo.token_weights import lane_entries
from zoomr_sglang.attention_backend.host_plan import HostPlan
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.selection import copy_to_host
from zoomr_sglang.kernels.token_weights import accumulate_token_weights, runs_triton

Lanes = List[Tuple[RequestState, np.ndarray, int]]  # per observing request: state, working set [n, 2], its size


class TokenObservers:
    """One step's observing lanes and their ``[n_lanes, width]`` float32 weights on ``device``."""

    def __init__(self, *, last_layer: int, device, vote_group) -> None:
        self.last_layer = last_layer
        self.device = torch.device(device)
        self.vote_group = vote_group  # None: this rank holds every head
        self._step: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Lanes]] = None
        self._readback: Optional[Tuple[Optional[torch.cuda.Event], torch.Tensor, Lanes]] = None
        self._key_rows: Optional[torch.Tensor] = None  # the gathered keys, reused by every layer and step

    def load(self, plan: HostPlan) -> None:
        """Queue the last step's weights for the host, then set up this step's lanes (host, outside graphs)."""
        self._queue_readback()
        if not plan.token_lanes:
            return
        lanes = np.array([batch_index for batch_index, _, _ in plan.token_lanes], dtype=np.int64)
        entries, lengths = lane_entries(plan.kv_indptr.numpy(), lanes)
        packed = torch.from_numpy(np.concatenate([lanes, lengths, entries.reshape(-1)]))
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        lanes_d, lengths_d, entries_d = torch.split(packed, [len(lanes), len(lanes), entries.size])
        entries_d = entries_d.view(entries.shape)
        valid = torch.arange(entries.shape[1], device=self.device)[None, :] < lengths_d[:, None]
        weights = torch.zeros(entries.shape, dtype=torch.float32, device=self.device)
        observed = [(state, ranges, int(size)) for (_, state, ranges), size in zip(plan.token_lanes, lengths)]
        self._step = (lanes_d, entries_d, valid, weights, observed)

    @property
    def active(self) -> bool:
        """Whether the loaded step has observing lanes."""
        return self._step is not None

    def after_attention(self, layer_id: int, query: torch.Tensor, log_normalizer: torch.Tensor,
                        key_buffer: torch.Tensor, kv_indices: torch.Tensor, scaling: float) -> None:
        """Add layer ``layer_id``'s weights of every observing lane (see ``accumulate_token_weights``)."""
        if self._step is None:
            return
        lanes, entries, valid, weights, _ = self._step
        key_rows = None if runs_triton(weights) else self._gather_buffer(entries, key_buffer)
        accumulate_token_weights(query, log_normalizer, key_buffer, kv_indices, lanes, entries, valid, weights,
                                 scaling, key_rows=key_rows)
        if layer_id == self.last_layer and self.vote_group is not None:
            weights.copy_(self.vote_group.all_reduce(weights))

    def _gather_buffer(self, entries: torch.Tensor, key_buffer: torch.Tensor) -> torch.Tensor:
        """The torch path's buffer for the lanes' keys, kept across layers and steps (the kernel
        reads the keys in place and needs none)."""
        rows, shape = entries.numel(), (key_buffer.shape[1], key_buffer.shape[2])
        held = self._key_rows
        if held is None or held.shape[0] < rows or held.shape[1:] != shape or held.dtype != key_buffer.dtype:
            # room for working sets a quarter larger: they grow a token a step
            self._key_rows = held = key_buffer.new_empty((rows + rows // 4, *shape))
        return held[:rows]

    def take(self) -> List[Tuple[RequestState, np.ndarray, np.ndarray]]:
        """The weights copied at the last load: per lane ``(state, working set [n, 2], weights [size])``."""
        if self._readback is None:
            return []
        event, weights, observed = self._readback
        self._readback = None
        if event is not None:
            event.synchronize()  # the copy sits right behind a forward the scheduler already waited for
        values = weights.numpy()
        return [(state, ranges, values[lane, :size]) for lane, (state, ranges, size) in enumerate(observed)]

    def _queue_readback(self) -> None:
        if self._step is None:
            return
        weights, observed = self._step[3], self._step[4]
        self._step = None
        event, (copy,) = copy_to_host([weights])
        self._readback = (event, copy, observed)
