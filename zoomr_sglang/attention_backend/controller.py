"""ZoomR's part of one attention backend, by role.

- planning (``planning.py``, host, once per step before the forward): segmentation from SGLang's
  host view of the tokens, policies, the host tier's moves, the working sets as packed ranges;
- selection (``selection.py``, device): the step's upload and sparse KV list, then per layer the
  index keys and the votes, graph-safe;
- diagnostics (``diagnostics.py``): self-checks and fidelity against dense references;
- admission (``admission.py``): the device footprint SGLang's scheduler charges a request.

The backends (torch on CPU, FlashInfer on CUDA) call :meth:`ZoomRController.load` from their
metadata hooks and :meth:`ZoomRController.after_attention` from ``forward_decode``; the plug-in's
hook on ``ModelRunner.forward`` calls :meth:`ZoomRController.begin_decode` first.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.segmentation import key_role
from zoomr_sglang.attention_backend.diagnostics import check_outputs
from zoomr_sglang.attention_backend.fine_observers import MAX_FINE_LANES, FineObservers
from zoomr_sglang.attention_backend.host_plan import HostPlan
from zoomr_sglang.attention_backend.planning import StepPlanner
from zoomr_sglang.attention_backend.selection import DeviceSelection
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.attention_backend.page_slots import PageBoundSlots
from zoomr_sglang.config import ZoomRConfig
from zoomr_sglang.tree_port import HostRun, Inheritance, ThoughtRecord


class ZoomRController:
    """The planner, the device selection and every request's counters of one backend."""

    def __init__(self, *, config: ZoomRConfig, token_texts: Sequence[str], req_to_token_pool, token_to_kv_pool,
                 num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 index_capacity: int, max_voters: int, allocator, page_size: int = 1,
                 tiering: Optional[ThoughtTiering] = None) -> None:
        self.config = config
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.tiering = tiering  # None: the host tier is off, all KV stays in SGLang's pool
        self.prefill_handles_holes = True  # False when SGLang routes prefill to another backend
        self.index_keys = IndexKeyStore(num_layers, num_kv_heads, head_dim, device, capacity=index_capacity)
        self.page_slots = PageBoundSlots(req_to_token=req_to_token_pool.req_to_token, kv_pool=token_to_kv_pool,
                                         allocator=allocator, num_layers=num_layers, page_size=page_size)
        self.planner = StepPlanner(config=config, token_texts=token_texts, req_to_token_pool=req_to_token_pool,
                                   index_keys=self.index_keys, max_candidates=config.max_candidates,
                                   page_slots=self.page_slots, tiering=tiering)
        self.selection = DeviceSelection(config=config, index_keys=self.index_keys, req_to_token_pool=req_to_token_pool,
                                         kv_pool=token_to_kv_pool, num_layers=num_layers, num_heads=num_heads,
                                         max_voters=max_voters, max_candidates=config.max_candidates,
                                         refresh_tokens=self.planner.ingest.refresh_tokens, device=device)
        self.fine_observers = FineObservers(
            num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, kv_pool=token_to_kv_pool,
            max_lanes=MAX_FINE_LANES if config.implicit_zoom == "pages" else 0, page_slots=self.page_slots,
            device=device, vote_group=self.selection.vote_group)
        self.kv_indices: Optional[torch.Tensor] = None  # the loaded step's KV list (the token weights read it)
        self.finished: "OrderedDict[str, dict]" = OrderedDict()  # rid -> final counters
        self.inheritances: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Req -> tree_port.Inheritance
        self.next_plan: Optional[HostPlan] = None  # planned, not yet loaded
        self.step: Optional[HostPlan] = None  # loaded: the step the forward is running
        self.observed: List[Tuple[torch.Tensor, torch.Tensor]] = []  # per observer: positions, slots

    # -- scheduler side (host) --------------------------------------------------------------------
    def note_request(self, row: int, req) -> None:
        self.planner.note_request(row, req, self.inheritances.pop(req, None) if self.inheritances else None)

    def begin_decode(self, rids: Sequence[str], seq_lens: Sequence[int]) -> None:
        """Finish the last decode step (before this plan may move its KV), then plan the coming
        decode step (SGLang's host view; no device reads)."""
        self.finish_step()
        self.next_plan = self.planner.plan(rids, seq_lens, self.selection.take_selections(),
                                           self.fine_observers.take())

    def finish_step(self) -> None:
        """The last decode step's work after its forward: the fine levels' passes, queued on the
        device behind it (``FineObservers.finish``; nothing unless a request observed it)."""
        self.fine_observers.finish(self.kv_indices)

    def needs_eager(self) -> bool:
        """Whether the coming step has per-layer host work that a CUDA graph cannot replay."""
        return self.next_plan is not None and self.next_plan.needs_eager

    # -- backend side ------------------------------------------------------------------------------
    def load(self, batch_size: int, input_ids: torch.Tensor, padded_bs: Optional[int] = None,
             kv_indices_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Upload the planned step of ``batch_size`` requests decoding ``input_ids``; see
        :meth:`DeviceSelection.load`."""
        plan, self.next_plan = self.next_plan, None
        if plan is None or plan.batch_size != batch_size:
            raise RuntimeError(
                f"zoomr: no host plan for this decode batch of {batch_size} requests "
                f"(planned: {None if plan is None else plan.batch_size}); the ModelRunner.forward hook "
                "must run before the attention metadata is built")
        self.step = plan
        self.observed = self.selection.observed_positions(plan) if plan.observers else []
        self.finish_step()  # done by begin_decode, unless a caller skipped it
        self.page_slots.load(plan.new_pages, padded_bs or batch_size)
        self.fine_observers.load(plan)
        kv_indptr, self.kv_indices = self.selection.load(plan, input_ids, padded_bs or batch_size, kv_indices_out)
        return kv_indptr, self.kv_indices

    def plan_capture(self, batch_size: int) -> None:
        """A CUDA-graph capture batch: no request, ``batch_size`` padding lanes (see ``load``)."""
        self.next_plan = HostPlan.empty()

    def after_attention(self, layer_id: int, query: torch.Tensor, log_normalizer: torch.Tensor, scaling: float) -> None:
        """Per layer, after its KV write: index keys, thought votes, page bounds and the fine levels'
        queries (graph-safe), then the host observers (eager steps only)."""
        self.selection.after_attention(layer_id, query, log_normalizer, scaling)
        self.page_slots.after_attention(layer_id)
        self.fine_observers.after_attention(layer_id, query, log_normalizer, scaling)
        if self.observed:
            key_buffer = self.token_to_kv_pool.get_key_buffer(layer_id)
            for (batch_index, state, _), (positions, slots) in zip(self.step.observers, self.observed):
                state.policy.observe(layer_id, query[batch_index].float(), key_buffer.index_select(0, slots).float(),
                                     positions, scaling)

    def check_outputs(self, layer_id: int, query: torch.Tensor, output: torch.Tensor, scaling: float) -> None:
        if self.step is not None:
            check_outputs(self.step, layer_id, query, output, scaling, self.token_to_kv_pool,
                          self.req_to_token_pool.req_to_token)

    # -- lifetime ----------------------------------------------------------------------------------
    def release_row(self, row: int) -> None:
        """The request in ``row`` left the pool (finished, aborted or retracted)."""
        if self.tiering is not None:
            self.tiering.release_row(row)
        state = self.planner.release_row(row)
        if state is None or state.stats.rid is None or self.config.stats_history == 0:
            return
        self.finished[state.stats.rid] = state.stats.as_dict()
        self.finished.move_to_end(state.stats.rid)
        while len(self.finished) > self.config.stats_history:
            self.finished.popitem(last=False)

    def uncounted_device_tokens(self, row: int, protected_len: int) -> int:
        """Device slots the row holds that SGLang does not count as the request's: the host tier's
        (``ThoughtTiering.uncounted_device_tokens``) and its page bounds' (SGLang's busy check)."""
        tier = 0 if self.tiering is None else self.tiering.uncounted_device_tokens(row, protected_len)
        return tier + self.page_slots.device_tokens(row)

    def device_headroom(self, row: int) -> int:
        """Slots the row's next step may take beyond its token: zoom-ins and a page's bounds
        (SGLang's decode memory check)."""
        return (0 if self.tiering is None else self.tiering.zoom_headroom(row)) + self.page_slots.headroom(row)

    # -- the zoomr radix tree (radix_ext): tree_port.TreePort ----------------------------------------
    def accepts_holes(self, req) -> bool:
        """Whether ``req`` may inherit a prefix whose cold thoughts are in the host tier only: its
        prefill must be zoomr's (it attends around them; another backend's would read the holes)."""
        return self.prefill_handles_holes and self.planner.accepts_holes(req)

    def checkpoint_limit(self, req, up_to: int, *, holes_allowed: bool, leaving: bool) -> int:
        """How far a radix tree may insert ``req`` now (``up_to`` asked): unless it is ``leaving``
        its row, never above its pasted reasoning (the host tier may still move that), and for a
        tree that cannot hold host-tier parts never past its first hole. A tree that holds them
        reads the row's holes as holes: positions brought back into them go first."""
        row = req.kv.req_pool_idx
        if row is None:
            return up_to
        floor = self.planner.tree_floor(row)
        if floor is not None and not leaving:
            up_to = min(up_to, floor)
        if holes_allowed and self.tiering is not None:  # the tree reads the row next: holes as holes
            self.tiering.whole_holes(row)
        holes = [] if holes_allowed or self.tiering is None else self.tiering.holes(row)
        return min(up_to, holes[0][0]) if holes else up_to

    def export_to_tree(self, row: int, new_from: int, end: int) -> Tuple[List[ThoughtRecord], List[HostRun]]:
        """What the radix tree keeps of the request in ``row`` as it inserts positions
        ``[new_from, end)`` for the first time: ``(records, holes)``, the closed thoughts whose span
        ends in that range (``ThoughtRecord``, with a snapshot of their index keys) and the row's
        holes there (``(start, end, host slots)``, whose host slots pass to the tree)."""
        state = self.planner.states.get(row)
        holes = self.tiering.hand_to_tree(row, new_from) if self.tiering is not None else []
        if state is None:
            return [], holes
        closed = [t for t in state.segmenter.thoughts if t.final and new_from < t.span_end() <= end]
        keyed = [(t, state.entries.get((t.index, key_role(t)))) for t in closed]
        entries = [e for _, e in keyed if e is not None]
        sums = counts = None
        if entries:  # one gather on the device, no host read
            index = torch.tensor(entries, dtype=torch.int64, device=self.index_keys.device)
            sums = self.index_keys.sums.index_select(1, index)
            counts = self.index_keys.counts.index_select(1, index)
        records, column = [], 0
        for thought, entry in keyed:
            record = ThoughtRecord(thought=thought, reasoning_start=state.prompt_len, role=key_role(thought))
            if entry is not None:
                record.key_sums, record.key_counts = sums[:, column], counts[:, column]
                column += 1
            records.append(record)
        return records, holes

    def hand_inheritance(self, req, inheritance: Optional[Inheritance]) -> None:
        """What ``req``'s latest match inherits; the planner takes it when the request gets its pool
        row (``note_request``), if that match is the one it was scheduled with. Kept by the ``Req``
        weakly: a request aborted while it waits leaves nothing behind."""
        if inheritance is None:
            self.inheritances.pop(req, None)
        else:
            self.inheritances[req] = inheritance

    def free_host_slots(self, host_slots: torch.Tensor) -> None:
        self.tiering.host.free(host_slots)

    def release_all(self) -> None:
        for row in list(self.planner.records.by_row):
            self.release_row(row)

    def metric_values(self) -> dict:
        """The aggregate counters ``zoomr_sglang.metrics`` exports to Prometheus."""
        counters = self.tiering.counters if self.tiering is not None else None
        moved = 0 if counters is None else counters.evicted_tokens + counters.zoomed_in_tokens
        return {
            "sglang:zoomr_resident_tokens": sum(s.stats.resident_last for s in self.planner.states.values()),
            "sglang:zoomr_host_tier_tokens": 0 if self.tiering is None else self.tiering.host.num_used,
            "sglang:zoomr_evicted_tokens": 0 if counters is None else counters.evicted_tokens,
            "sglang:zoomr_zoomed_in_tokens": 0 if counters is None else counters.zoomed_in_tokens,
            "sglang:zoomr_copied_bytes": 0 if counters is None else moved * self.tiering.host.token_bytes,
            "sglang:zoomr_host_tier_full": 0 if counters is None else counters.host_full,
            "sglang:zoomr_zoom_in_failures": 0 if counters is None else counters.zoom_in_failures,
            "sglang:zoomr_copy_failures": 0 if counters is None else counters.copy_failures,
            "sglang:zoomr_over_bound_steps": self.planner.over_bound_steps,
            "sglang:zoomr_index_entries_reused": self.planner.index_entries_reused,
        }

    def stats(self) -> dict:
        """Counters for SGLang's server info: running and recently finished requests."""
        return {
            "running": {str(s.stats.rid): s.stats.as_dict() for s in self.planner.states.values()},
            "finished": dict(self.finished),
            "index_entries_live": self.index_keys.num_live,
            "index_entries_reused": self.planner.index_entries_reused,
            "over_bound_steps": self.planner.over_bound_steps,
            "index_full": self.index_keys.exhausted,
            "commits_bulk": self.selection.commits_bulk,
            "page_bounds": {"slots": sum(self.page_slots.device_tokens(row) for row in self.page_slots.rows),
                            "commits_bulk": self.page_slots.commits_bulk,
                            "alloc_failures": self.page_slots.alloc_failures},
            "fine_lanes_left_out": self.fine_observers.lanes_left_out,
            "host_tier": None if self.tiering is None else {
                "capacity_tokens": self.tiering.host.capacity,
                "used_tokens": self.tiering.host.num_used,
                **self.tiering.counters.as_dict(),
            },
            "config": dict(self.config.__dict__),
        }

