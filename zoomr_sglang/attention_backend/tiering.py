"""Moving closed thoughts' KV between SGLang's device pool and the host tier ("row holes").

A cold thought's body positions ``[start, end)`` (page-aligned inward, above the prompt and the
sinks) are copied to the host tier, their device slots are given back to SGLang's allocator and
``req_to_token[row, start:end]`` is set to the padding slot 0: a *hole*. Zooming in allocates fresh
slots, copies the KV back and writes the new slots into the row; the host copy is kept, so a
thought that leaves the selection again is dropped from the device without a second copy. Up to
``zoom_cache`` (a ``ZOOMR_CONFIG`` key) such recently zoomed thoughts stay on the device beyond the selection, which
avoids copy ping-pong.

Copies are asynchronous on CUDA (``host_tier.py``) and ``prepare`` never waits for one: a copy out
frees its device slots, and a copy in enters the row (and the working set), at the first step that
finds it done. On CPU both are done at once, so a thought moves within the step. With tensor
parallelism "done" is a poll every rank agrees on (``host_tier.py``, ``TP_COPY_POLLS``), so every
rank frees and takes device slots at the same step and SGLang's replicated schedulers stay alike.

Holes are never attended (a thought is evicted only when it is closed, not selected and out of the
recent window). A request in zoomr's fine levels selects no thought; single positions of its holes
come back instead (``tier_positions.py``). SGLang's release path must skip them: the plug-in's radix-cache hooks cap the tree
insert at the first hole and subtract holes from the ranges freed (see docs/host-tier.md).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from zoomr_sglang.attention_backend.host_tier import HostKVTier
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.attention_backend.tier_positions import bring_in_positions, drop_positions, position_device_tokens
from zoomr_sglang.attention_backend.tier_records import ColdThought, CopyIn, InFlight, RowTier, TieringCounters
from zoomr_sglang.config import ZoomRConfig


NEVER = 1 << 62  # a sequence length no request reaches


class ThoughtTiering:
    """Owns the holes of every row and the host tier they live in: per row one :class:`RowTier`
    (cold thoughts, copies under way, resident zoom-ins, tokens offloaded, cached prepare results),
    made when the planner makes a tiered request's state (``tier_of``) or the row adopts holes,
    popped at release. The request's state holds the record (``RequestState.tier``): a step reads
    it directly, with no lookup by row.
    """

    def __init__(self, *, config: ZoomRConfig, host_tier: HostKVTier, allocator, req_to_token_pool,
                 kv_pool, page_size: int) -> None:
        self.config = config
        self.host = host_tier
        self.allocator = allocator
        self.req_to_token = req_to_token_pool.req_to_token
        self.kv_pool = kv_pool
        self.page_size = page_size
        self.rows: Dict[int, RowTier] = {}
        self.counters = TieringCounters()
        self.freed_since_admission = 0  # read and reset by the admission hook
        self.adopted_rows: set = set()  # rows holding holes inherited from the radix tree
        self.step = 0  # counts full prepares: a thought's last_used orders the zoom cache

    def tier_of(self, row: int) -> RowTier:
        """The row's record, made if it has none."""
        tier = self.rows.get(row)
        if tier is None:
            tier = self.rows[row] = RowTier()
        return tier

    # -- per step ------------------------------------------------------------------------------
    def prepare(self, state: RequestState, seq_len: int, committed_until: int) -> List[int]:
        """Start zoom-ins of the selected cold thoughts, finish the copies that are done and move
        cold thoughts off (only those whose body ends by ``committed_until``: their index keys were
        read from the device). Never waits for a copy.

        Returns the selected thoughts that are on the device (one whose zoom-in is still running,
        or failed, is left out for this step).
        """
        self.step += 1
        tier = state.tier
        quiet = tier.quiet
        if (quiet is not None and quiet[0] is state.zoomed and seq_len < quiet[2]
                and len(state.pending_eviction) == quiet[1]):
            return quiet[3]
        if tier.in_flight or tier.copying_in:
            self._finish_copies(state, tier)
        settled = tier.settled
        if not tier.cold:  # the selection itself (never changed in place: a vote sets a new list)
            available, selected_resident = state.zoomed, 0
        elif settled is not None and settled[0] is state.zoomed:
            available, selected_resident = settled[1], settled[2]
        else:
            available, selected_resident = self._bring_in(state, tier)
        if state.pending_eviction and not tier.waits_for_window(len(state.pending_eviction), state.zoomed, seq_len):
            self._evict_closed(state, tier, seq_len, committed_until)
        if len(tier.resident) - selected_resident > self.config.zoom_cache:
            self._trim_zoom_cache(state, tier)
        elif not tier.in_flight and not tier.copying_in:
            if not state.pending_eviction:
                tier.quiet = (state.zoomed, 0, NEVER, available)
            elif tier.waits_for_window(len(state.pending_eviction), state.zoomed, seq_len):
                tier.quiet = (state.zoomed, len(state.pending_eviction), tier.evict_after[0], available)
        return available

    def _bring_in(self, state: RequestState, tier: RowTier) -> Tuple[List[int], int]:
        """The selected thoughts on the device (zoom-ins started or finished on the way) and how
        many of them are cold. A thought's ``last_used`` (the zoom cache's order) is the step at
        which it left the last selection that held it: stamped when the selection changes."""
        cold = tier.cold
        if tier.settled is not None:
            for index in tier.settled[0]:
                thought = cold.get(index)
                if thought is not None and index not in state.zoomed:
                    thought.last_used = self.step
        available, selected_resident = [], 0
        for index in state.zoomed:
            thought = cold.get(index)
            if thought is not None:
                if not thought.on_device and not self._zoom_in(tier, state.row, index, thought):
                    continue
                thought.last_used = self.step
                selected_resident += 1
            available.append(index)
        if len(available) == len(state.zoomed) and not tier.copying_in:
            tier.settled = (state.zoomed, available, selected_resident)
        return available, selected_resident

    def _zoom_in(self, tier: RowTier, row: int, index: int, thought: ColdThought) -> bool:
        """Start the thought's copy in unless it is under way; True once it is on the device."""
        if thought.copy_in is None:
            slots = self.allocator.alloc(thought.end - thought.start)
            if slots is None:
                self.counters.zoom_in_failures += 1
                return False
            try:
                transfer = self.host.load(self.kv_pool, thought.host_slots, slots)
            except Exception:  # this request's thought stays off the device; nothing else is touched
                self._give_back(slots, thought.start)
                self.counters.copy_failures += 1
                return False
            thought.copy_in = CopyIn(slots, transfer)
            tier.copying_in.add(index)
        if not thought.copy_in.transfer.done():
            return False
        tier.copying_in.discard(index)
        self._complete_copy_in(tier, row, index, thought)
        return True

    def bring_in_positions(self, state: RequestState, wanted, seq_len: int):
        """The fine levels' positions on the device (``tier_positions.bring_in_positions``)."""
        return bring_in_positions(self, state, wanted, seq_len)

    def _complete_copy_in(self, tier: RowTier, row: int, index: int, thought: ColdThought) -> None:
        drop_positions(self, row, tier, thought.start, thought.end)  # the whole thought replaces them
        self.req_to_token[row, thought.start:thought.end] = thought.copy_in.device_slots.to(self.req_to_token.dtype)
        thought.copy_in = None
        thought.last_used = self.step
        tier.set_on_device(index, thought, True)
        self.counters.zoomed_in_tokens += thought.end - thought.start

    def _evict_closed(self, state: RequestState, tier: RowTier, seq_len: int, committed_until: int) -> None:
        """Start the copies out of closed thoughts that left the window, had their keys read and
        are not selected; the rest wait."""
        window_start = seq_len - self.config.window
        # Only generated tokens move: SGLang's prefix cache may own the prompt's slots
        # (``cache_protected_len``), never a running request's decode tokens.
        floor = max(state.own_from, self.config.sink)
        waiting, window_passes = [], None  # the first length at which a waiting thought may leave
        for index in state.pending_eviction:
            thought = state.segmenter.thoughts[index]
            start = -(-max(thought.start, floor) // self.page_size) * self.page_size
            end = thought.body_end // self.page_size * self.page_size
            if end <= start:
                continue  # too short to free a whole page: stays resident
            selected = index in state.zoomed
            if selected or end > window_start or thought.body_end > committed_until:
                waiting.append(index)
                if selected:
                    passes = NEVER  # while this selection holds (a new one checks again)
                else:
                    passes = end + self.config.window if thought.body_end <= committed_until else 0
                window_passes = passes if window_passes is None else min(window_passes, passes)
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
            tier.in_flight.append(InFlight(index, start, end, host_slots, transfer))
        state.pending_eviction = waiting
        tier.evict_after = (window_passes, len(waiting), state.zoomed) if window_passes else None
        if tier.in_flight:
            self._finish_copies(state, tier)

    def _finish_copies(self, state: RequestState, tier: RowTier) -> None:
        """Complete the copies that are done (polled, never waited for): a copy out frees the
        thought's device slots (a thought selected in the meantime keeps them and becomes a
        zoomed-in cold thought); a copy in puts its slots into the row."""
        row, still_running = state.row, []
        for copy in tier.in_flight:
            if not copy.transfer.done():
                still_running.append(copy)
                continue
            on_device = copy.index in state.zoomed
            if not on_device:
                self._free_device(row, copy.start, copy.end)
                self.counters.evicted_tokens += copy.end - copy.start
            tier.add_cold(copy.index, ColdThought(copy.start, copy.end, copy.host_slots, on_device=on_device,
                                                  last_used=self.step))
        tier.in_flight = still_running
        for index in list(tier.copying_in):
            thought = tier.cold[index]
            if thought.copy_in.transfer.done():
                tier.copying_in.discard(index)
                self._complete_copy_in(tier, row, index, thought)

    def _trim_zoom_cache(self, state: RequestState, tier: RowTier) -> None:
        """Keep at most ``zoom_cache`` unselected zoomed-in thoughts on the device (least recent go)."""
        cold = tier.cold
        extra = sorted((cold[index].last_used, index) for index in tier.resident if index not in state.zoomed)
        for _, index in extra[: max(0, len(extra) - self.config.zoom_cache)]:
            thought = cold[index]
            self._free_device(state.row, thought.start, thought.end)
            tier.set_on_device(index, thought, False)
            self.counters.dropped_tokens += thought.end - thought.start

    def _free_device(self, row: int, start: int, end: int) -> None:
        self._give_back(self.req_to_token[row, start:end].long(), start)
        self.req_to_token[row, start:end] = 0  # the padding slot: a stray read never hits live KV
        self.freed_since_admission += end - start

    def _give_back(self, slots: torch.Tensor, start: int) -> None:
        """Free whole pages of device slots (a row range from the page-aligned ``start``). Paged:
        ``free_segment``, which, unlike ``free``, needs no ``torch.unique`` (a host sync on CUDA)."""
        if self.page_size > 1:
            self.allocator.free_segment(slots, start_pos=start)
        else:
            self.allocator.free(slots)

    # -- what SGLang's hooks ask -----------------------------------------------------------------
    def _cold(self, row: int):
        tier = self.rows.get(row)
        return () if tier is None else tier.cold.values()

    def holes(self, row: int) -> List[Tuple[int, int]]:
        """Row positions whose device slots are given back, ascending."""
        tier = self.rows.get(row)
        return [] if tier is None else [(t.start, t.end) for t in tier.holes()]

    def uncounted_device_tokens(self, row: int, protected_len: int) -> int:
        """Device slots the row holds minus what SGLang counts as its own (positions from its
        tree-owned prefix ``protected_len`` on): inherited thoughts zoomed into (below that
        prefix) and zoom-ins under way add, its own holes (above it) subtract."""
        tier = self.rows.get(row)
        adjust = 0 if tier is None else position_device_tokens(tier)
        for t in self._cold(row):
            if t.copy_in is not None:
                adjust += t.end - t.start
            if t.owns_host == 0 and t.on_device:
                adjust += t.end - t.start
            elif not t.on_device and t.start >= protected_len:
                adjust -= t.end - t.start
        return adjust

    def zoom_headroom(self, row: int) -> int:
        """Device slots the next step's zoom-ins of this row may need (at most c cold thoughts)."""
        sizes = sorted((t.end - t.start for t in self._cold(row) if not t.on_device and t.copy_in is None),
                       reverse=True)
        tier = self.rows.get(row)
        return sum(sizes[: self.config.num_thoughts]) + (0 if tier is None else tier.position_headroom)

    def whole_holes(self, row: int) -> None:
        """Drop the row's positions brought back for the fine levels: its holes read as holes."""
        tier = self.rows.get(row)
        if tier is not None:
            drop_positions(self, row, tier)

    def drain_row(self, row: int) -> None:
        """Wait for the row's copies before SGLang frees its slots (the release path, the one place
        that waits): thoughts copied out keep their device slots (SGLang frees them with the row)
        and their host copies (freed on release); zoom-ins put their slots into the row."""
        tier = self.rows.get(row)
        if tier is None:
            return
        for copy in tier.in_flight:
            copy.transfer.wait()
            tier.add_cold(copy.index, ColdThought(copy.start, copy.end, copy.host_slots, on_device=True))
        tier.in_flight = []
        for index in tier.copying_in:
            tier.cold[index].copy_in.transfer.wait()
            self._complete_copy_in(tier, row, index, tier.cold[index])
        tier.copying_in.clear()
        drop_positions(self, row, tier)

    def release_row(self, row: int) -> None:
        """Free the host copies of a row SGLang has released (its device slots are SGLang's to free,
        except those of inherited thoughts it zoomed into: the tree owns those positions). A zoom-in
        still under way here was not drained before SGLang freed the row around its hole: its fresh
        slots are freed here."""
        self.adopted_rows.discard(row)
        tier = self.rows.get(row)
        if tier is None:
            return
        for index in tier.copying_in:
            thought = tier.cold[index]
            thought.copy_in.transfer.wait()
            self._give_back(thought.copy_in.device_slots, thought.start)
            thought.copy_in = None
        tier.copying_in.clear()
        self.drain_row(row)
        del self.rows[row]
        for thought in tier.cold.values():
            if thought.owns_host == 0 and thought.on_device:
                self._free_device(row, thought.start, thought.end)
            owned = thought.host_slots if thought.owns_host < 0 else thought.host_slots[: thought.owns_host]
            if owned.numel():
                self.host.free(owned)

    # -- the zoomr radix tree -------------------------------------------------------------------
    def adopt(self, row: int, cold: List[Tuple[int, int, int, torch.Tensor]]) -> None:
        """Holes a new request inherits from the radix tree: ``(thought, start, end, host slots)``;
        the tree keeps their host slots."""
        tier = self.tier_of(row)
        tier.cold, tier.resident, tier.offloaded = {}, set(), 0
        tier.unsettle()
        for index, start, end, slots in cold:
            tier.add_cold(index, ColdThought(start, end, slots, owns_host=0))
        if cold:
            self.adopted_rows.add(row)

    def hand_to_tree(self, row: int, from_position: int) -> List[Tuple[int, int, torch.Tensor]]:
        """The row's own holes at or after ``from_position``, ``(start, end, host slots)``: their host
        slots pass to the radix tree (the row keeps those below ``from_position``). A zoom-in under
        way is drained first (the tree insert is on the release path): the thought is then on the
        device and the tree takes its device slots, not a hole whose host slots a copy still reads."""
        tier = self.rows.get(row)
        if tier is None:
            return []
        if tier.copying_in:
            self.drain_row(row)
        drop_positions(self, row, tier)  # the tree takes whole holes
        tier.unsettle()
        handed = []
        for thought in tier.cold.values():
            if thought.on_device or thought.owns_host >= 0 or thought.end <= from_position:
                continue
            keep = max(from_position - thought.start, 0)
            handed.append((thought.start + keep, thought.end, thought.host_slots[keep:]))
            thought.owns_host = keep
        return handed
