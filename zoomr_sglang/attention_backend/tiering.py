"""Moving closed thoughts' KV between SGLang's device pool and the host tier ("row holes").

A cold thought's body positions ``[start, end)`` (page-aligned inward, above the prompt and the
sinks) are copied to the host tier, their device slots are given back to SGLang's allocator and
``req_to_token[row, start:end]`` is set to the padding slot 0: a *hole*. Zooming in allocates fresh
slots, copies the KV back and writes the new slots into the row; the host copy is kept, so a
thought that leaves the selection again is dropped from the device without a second copy. Up to
``ZOOMR_ZOOM_CACHE`` such recently zoomed thoughts stay on the device beyond the selection, which
avoids copy ping-pong.

Holes are never attended (a thought is evicted only when it is closed, not selected and out of the
recent window). SGLang's release path must skip them: the plug-in's radix-cache hooks cap the tree
insert at the first hole and subtract holes from the ranges freed (see docs/host-tier.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from zoomr_sglang.attention_backend.host_tier import HostKVTier, Transfer
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.config import ZoomRConfig


@dataclass
class ColdThought:
    start: int  # hole positions [start, end) of the row, page-aligned
    end: int
    host_slots: torch.Tensor  # [end - start] int64 host-tier slots
    on_device: bool = False  # zoomed in: the row points at live device slots again
    last_used: int = 0  # step of the last use while on the device (zoom cache order)
    owns_host: int = -1  # host slots [0, owns_host) are the row's to free (-1: all; the radix tree owns the rest)


@dataclass
class InFlight:
    """A thought whose copy to the host tier may still be running; its slots stay allocated."""

    index: int
    start: int
    end: int
    host_slots: torch.Tensor
    transfer: Transfer


@dataclass
class TieringCounters:
    evicted_tokens: int = 0  # device slots given back to SGLang's allocator
    zoomed_in_tokens: int = 0  # tokens copied back from the host tier
    dropped_tokens: int = 0  # zoomed-in tokens dropped again without a copy (host copy kept)
    host_full: int = 0  # thoughts that stayed resident because the host tier was full
    zoom_in_failures: int = 0  # zoom-ins the device pool could not serve (thought skipped that step)
    copy_failures: int = 0  # copies out or in that raised: that thought stays (or stays off) the device

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ThoughtTiering:
    """Owns the holes of every row and the host tier they live in."""

    def __init__(self, *, config: ZoomRConfig, host_tier: HostKVTier, allocator, req_to_token_pool,
                 kv_pool, page_size: int) -> None:
        self.config = config
        self.host = host_tier
        self.allocator = allocator
        self.req_to_token = req_to_token_pool.req_to_token
        self.kv_pool = kv_pool
        self.page_size = page_size
        self.cold: Dict[int, Dict[int, ColdThought]] = {}  # row -> thought index -> cold thought
        self.in_flight: Dict[int, List[InFlight]] = {}  # row -> copies out not yet known finished
        self.counters = TieringCounters()
        self.freed_since_admission = 0  # read and reset by the admission hook
        self.adopted_rows: set = set()  # rows holding holes inherited from the radix tree
        self.step = 0

    # -- per step ------------------------------------------------------------------------------
    def prepare(self, state: RequestState, seq_len: int, committed_until: int) -> List[int]:
        """Bring the selected thoughts onto the device and move cold ones off (only thoughts whose
        body ends by ``committed_until``: their index keys were read from the device).

        Returns the selected thoughts that are on the device (a failed zoom-in is skipped).
        """
        self.step += 1
        cold = self.cold.setdefault(state.row, {})
        self._finish_copies(state, cold)
        available = []
        for index in state.zoomed:
            thought = cold.get(index)
            if thought is not None and not thought.on_device and not self._zoom_in(state.row, thought):
                continue
            if thought is not None:
                thought.last_used = self.step
            available.append(index)
        self._evict_closed(state, seq_len, committed_until, cold)
        self._trim_zoom_cache(state, cold)
        return available

    def _zoom_in(self, row: int, thought: ColdThought) -> bool:
        n = thought.end - thought.start
        slots = self.allocator.alloc(n)
        if slots is None:
            self.counters.zoom_in_failures += 1
            return False
        try:
            self.host.load(self.kv_pool, thought.host_slots, slots)
        except Exception:  # this request's thought stays off the device; nothing else is touched
            self.allocator.free(slots)
            self.counters.copy_failures += 1
            return False
        self.req_to_token[row, thought.start:thought.end] = slots.to(self.req_to_token.dtype)
        thought.on_device = True
        self.counters.zoomed_in_tokens += n
        return True

    def _evict_closed(self, state: RequestState, seq_len: int, committed_until: int,
                      cold: Dict[int, ColdThought]) -> None:
        """Evict closed thoughts that left the window, had their keys read and are not selected;
        the rest wait."""
        window_start = seq_len - self.config.window
        # Only generated tokens move: SGLang's prefix cache may own the prompt's slots
        # (``cache_protected_len``), never a running request's decode tokens.
        floor = max(state.own_from, self.config.sink)
        waiting = []
        for index in state.pending_eviction:
            if index in state.zoomed:
                waiting.append(index)
                continue
            thought = state.segmenter.thoughts[index]
            start = -(-max(thought.start, floor) // self.page_size) * self.page_size
            end = thought.body_end // self.page_size * self.page_size
            if end <= start:
                continue  # too short to free a whole page: stays resident
            if end > window_start or thought.body_end > committed_until:
                waiting.append(index)
                continue
            host_slots = self.host.alloc(end - start)
            if host_slots is None:
                self.counters.host_full += 1
                continue
            try:
                transfer = self.host.store(self.kv_pool, self.req_to_token[state.row, start:end].long(), host_slots)
            except Exception:  # this thought stays resident; its device slots were never touched
                self.host.free(host_slots)
                self.counters.copy_failures += 1
                continue
            self.in_flight.setdefault(state.row, []).append(InFlight(index, start, end, host_slots, transfer))
        state.pending_eviction = waiting
        self._finish_copies(state, cold)

    def _finish_copies(self, state: RequestState, cold: Dict[int, ColdThought]) -> None:
        """Free the device slots of thoughts whose copy out has finished (a thought selected in the
        meantime keeps its slots and becomes a zoomed-in cold thought)."""
        still_running = []
        for copy in self.in_flight.get(state.row, []):
            if not copy.transfer.done():
                still_running.append(copy)
                continue
            thought = ColdThought(copy.start, copy.end, copy.host_slots, on_device=copy.index in state.zoomed,
                                  last_used=self.step)
            if not thought.on_device:
                self._free_device(state.row, copy.start, copy.end)
                self.counters.evicted_tokens += copy.end - copy.start
            cold[copy.index] = thought
        self.in_flight[state.row] = still_running

    def _trim_zoom_cache(self, state: RequestState, cold: Dict[int, ColdThought]) -> None:
        """Keep at most ``zoom_cache`` unselected zoomed-in thoughts on the device (least recent go)."""
        extra = sorted(
            (t.last_used, index) for index, t in cold.items() if t.on_device and index not in state.zoomed
        )
        for _, index in extra[: max(0, len(extra) - self.config.zoom_cache)]:
            thought = cold[index]
            self._free_device(state.row, thought.start, thought.end)
            thought.on_device = False
            self.counters.dropped_tokens += thought.end - thought.start

    def _free_device(self, row: int, start: int, end: int) -> None:
        self.allocator.free(self.req_to_token[row, start:end].long())
        self.req_to_token[row, start:end] = 0  # the padding slot: a stray read never hits live KV
        self.freed_since_admission += end - start

    # -- what SGLang's hooks ask -----------------------------------------------------------------
    def holes(self, row: int) -> List[Tuple[int, int]]:
        """Row positions whose device slots are given back, ascending."""
        return sorted((t.start, t.end) for t in self.cold.get(row, {}).values() if not t.on_device)

    def uncounted_device_tokens(self, row: int, protected_len: int) -> int:
        """Device slots the row holds minus what SGLang counts as its own (positions from its
        tree-owned prefix ``protected_len`` on): inherited thoughts zoomed into (below that
        prefix) add, its own holes (above it) subtract."""
        adjust = 0
        for t in self.cold.get(row, {}).values():
            if t.owns_host == 0 and t.on_device:
                adjust += t.end - t.start
            elif not t.on_device and t.start >= protected_len:
                adjust -= t.end - t.start
        return adjust

    def offloaded_tokens(self, row: int) -> int:
        """Tokens of the row that are in the host tier only (their device slots given back)."""
        return sum(t.end - t.start for t in self.cold.get(row, {}).values() if not t.on_device)

    def zoom_headroom(self, row: int) -> int:
        """Device slots the next step's zoom-ins of this row may need (at most c cold thoughts)."""
        sizes = sorted((t.end - t.start for t in self.cold.get(row, {}).values() if not t.on_device), reverse=True)
        return sum(sizes[: self.config.num_thoughts])

    def drain_row(self, row: int) -> None:
        """Wait for the row's copies out before SGLang frees its slots; those thoughts keep their
        device slots (SGLang frees them with the row) and their host copies (freed on release)."""
        cold = self.cold.setdefault(row, {})
        for copy in self.in_flight.pop(row, []):
            copy.transfer.wait()
            cold[copy.index] = ColdThought(copy.start, copy.end, copy.host_slots, on_device=True)

    def release_row(self, row: int) -> None:
        """Free the host copies of a row SGLang has released (its device slots are SGLang's to free,
        except those of inherited thoughts it zoomed into: the tree owns those positions)."""
        self.drain_row(row)
        self.adopted_rows.discard(row)
        for thought in self.cold.pop(row, {}).values():
            if thought.owns_host == 0 and thought.on_device:
                self._free_device(row, thought.start, thought.end)
            owned = thought.host_slots if thought.owns_host < 0 else thought.host_slots[: thought.owns_host]
            if owned.numel():
                self.host.free(owned)

    # -- the zoomr radix tree -------------------------------------------------------------------
    def adopt(self, row: int, cold: List[Tuple[int, int, int, torch.Tensor]]) -> None:
        """Holes a new request inherits from the radix tree: ``(thought, start, end, host slots)``;
        the tree keeps their host slots."""
        self.cold[row] = {index: ColdThought(start, end, slots, owns_host=0) for index, start, end, slots in cold}
        if cold:
            self.adopted_rows.add(row)

    def hand_to_tree(self, row: int, from_position: int) -> List[Tuple[int, int, torch.Tensor]]:
        """The row's own holes at or after ``from_position``, ``(start, end, host slots)``: their host
        slots pass to the radix tree (the row keeps those below ``from_position``)."""
        handed = []
        for thought in self.cold.get(row, {}).values():
            if thought.on_device or thought.owns_host >= 0 or thought.end <= from_position:
                continue
            keep = max(from_position - thought.start, 0)
            handed.append((thought.start + keep, thought.end, thought.host_slots[keep:]))
            thought.owns_host = keep
        return handed
