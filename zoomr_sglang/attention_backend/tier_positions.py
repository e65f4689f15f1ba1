"""The host tier's fine moves: single positions of cold thoughts brought back for zoomr's fine levels.

A model that writes no summaries is zoomed into at pages and tokens, not whole thoughts
(``ZoomRPolicy``): such a request zooms into no thought, so the host tier moves every closed
thought off the device once the window has passed it (``tiering.py``). Before each of its steps
the policy names the positions it may attend or observe (``Policy.wanted_positions``: the tokens
the last step attended most, the voted pages, the pages whose bounds are due); here the ones in a
hole are copied back into fresh device slots, and the ones no longer wanted are dropped again
(their host copy stays). A request's device KV is then its window, skeleton and about one budget
of positions, whatever its length.

The moves keep the tier's rules: copies never block a step (a position is attended from the step
that finds its copy done; until then ``view.absent`` keeps it out of the working set), the copies
count in the tier's counters, and every path that hands a row's holes to SGLang or to the radix
tree first drops these positions (``drop_positions``), so a hole is whole again when anyone else
reads it. Per step the work is in the number of wanted positions and holes, not the sequence.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from zoomr_sglang.algo.policy_base import range_mask
from zoomr_sglang.algo.working_set import in_sorted
from zoomr_sglang.attention_backend.tier_records import PositionCopy, RowTier


def bring_in_positions(tiering, state, wanted: Optional[np.ndarray], seq_len: int) -> Optional[np.ndarray]:
    """Copy the positions of ``wanted`` (sorted ``[n]`` int64, or None: none) that lie in the row's
    holes back to the device, drop the ones copied back earlier and not wanted now; returns the
    bool mask ``[seq_len]`` of positions not on the device (None: none is missing)."""
    tier, row = state.tier, state.row
    if wanted is None and not len(tier.zoomed_positions) and not tier.position_copies:
        return None
    finish_position_copies(tiering, row, tier)
    holes = tier.holes()
    desired = desired_hole = np.zeros(0, dtype=np.int64)
    if holes and wanted is not None:
        starts, ends = tier.hole_ranges().T
        wanted = wanted[wanted < seq_len]
        hole_of = np.searchsorted(starts, wanted, side="right") - 1
        inside = (hole_of >= 0) & (wanted < ends[np.maximum(hole_of, 0)])
        desired, desired_hole = wanted[inside], hole_of[inside]
    unwanted = ~in_sorted(tier.zoomed_positions, desired)
    if unwanted.any():
        _drop(tiering, row, tier, unwanted)
    new = ~in_sorted(desired, tier.zoomed_positions)
    for copy in tier.position_copies:  # a few copies under way, each ascending
        new &= ~in_sorted(desired, copy.positions)
    if new.any() and tiering.page_size == 1:  # paged pools free whole pages only: whole thoughts move there
        positions, which = desired[new], desired_hole[new]
        host_slots = torch.cat([holes[h].host_slots[torch.from_numpy(positions[which == h] - holes[h].start)]
                                for h in np.unique(which)])  # holes ascend, so positions keep their order
        _start_copy(tiering, row, tier, positions, host_slots)
    tier.position_headroom = len(desired)
    if not holes:
        return None
    # A mask, not a binary search per lookup: at 8K it measured faster (docs/fine-levels.md, "Cost").
    absent = range_mask(tier.hole_ranges(), seq_len)
    absent[tier.zoomed_positions[tier.zoomed_positions < seq_len]] = False
    return absent


def _start_copy(tiering, row: int, tier: RowTier, positions: np.ndarray, host_slots: torch.Tensor) -> None:
    slots = tiering.allocator.alloc(len(positions))
    if slots is None:
        tiering.counters.zoom_in_failures += 1
        return
    try:
        transfer = tiering.host.load(tiering.kv_pool, host_slots, slots)
    except Exception:  # these positions stay off the device; nothing else is touched
        tiering.allocator.free(slots)
        tiering.counters.copy_failures += 1
        return
    tier.position_copies.append(PositionCopy(positions, slots, transfer))
    finish_position_copies(tiering, row, tier)


def finish_position_copies(tiering, row: int, tier: RowTier, *, wait: bool = False) -> None:
    """Put the slots of the copies that are done (all, waiting, with ``wait``) into the row."""
    running = []
    for copy in tier.position_copies:
        if wait:
            copy.transfer.wait()
        elif not copy.transfer.done():
            running.append(copy)
            continue
        tiering.req_to_token[row, torch.from_numpy(copy.positions)] = copy.device_slots.to(tiering.req_to_token.dtype)
        positions = np.concatenate([tier.zoomed_positions, copy.positions])
        order = np.argsort(positions, kind="stable")
        tier.zoomed_positions = positions[order]
        tier.zoomed_position_slots = torch.cat([tier.zoomed_position_slots, copy.device_slots])[torch.from_numpy(order)]
        tier.offloaded -= len(copy.positions)
        tiering.counters.zoomed_in_tokens += len(copy.positions)
    tier.position_copies = running


def _drop(tiering, row: int, tier: RowTier, which: np.ndarray) -> None:
    """Give back the device slots of the brought-back positions ``which`` (bool mask over them)."""
    positions, slots = tier.zoomed_positions[which], tier.zoomed_position_slots[torch.from_numpy(which)]
    tiering.allocator.free(slots)
    tiering.req_to_token[row, torch.from_numpy(positions)] = 0  # the padding slot, as in every hole
    tier.zoomed_positions = tier.zoomed_positions[~which]
    tier.zoomed_position_slots = tier.zoomed_position_slots[torch.from_numpy(~which)]
    tier.offloaded += len(positions)
    tiering.freed_since_admission += len(positions)
    tiering.counters.dropped_tokens += len(positions)


def drop_positions(tiering, row: int, tier: RowTier, start: int = 0, end: Optional[int] = None) -> None:
    """Drop the brought-back positions in ``[start, end)`` (all by default), waiting for copies
    under way: the holes there are whole again (before SGLang, the radix tree or a whole
    thought's copy in takes them)."""
    if tier.position_copies:
        finish_position_copies(tiering, row, tier, wait=True)
    positions = tier.zoomed_positions
    which = (positions >= start) & (positions < (end if end is not None else np.iinfo(np.int64).max))
    if which.any():
        _drop(tiering, row, tier, which)


def position_device_tokens(tier: RowTier) -> int:
    """Device slots the row holds for brought-back positions (copies under way included)."""
    return len(tier.zoomed_positions) + sum(len(copy.positions) for copy in tier.position_copies)
