"""What ``tiering.py`` records per row (:class:`RowTier`), per thought and per copy, and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from zoomr_sglang.attention_backend.host_tier import Transfer


@dataclass
class CopyIn:
    """A zoom-in whose copy may still be running: its fresh device slots enter the row once done."""

    device_slots: torch.Tensor  # [end - start] int64, allocated, not yet in the row
    transfer: Transfer


@dataclass
class ColdThought:
    start: int  # hole positions [start, end) of the row, page-aligned
    end: int
    host_slots: torch.Tensor  # [end - start] int64 host-tier slots
    on_device: bool = False  # zoomed in: the row points at live device slots again
    last_used: int = 0  # step of the last use while on the device (zoom cache order)
    owns_host: int = -1  # host slots [0, owns_host) are the row's to free (-1: all; the radix tree owns the rest)
    copy_in: Optional[CopyIn] = None  # a zoom-in under way (the thought is not on the device yet)


@dataclass
class InFlight:
    """A thought whose copy to the host tier may still be running; its slots stay allocated."""

    index: int
    start: int
    end: int
    host_slots: torch.Tensor
    transfer: Transfer


@dataclass
class PositionCopy:
    """Positions of holes being copied back for the fine levels (``tier_positions.py``)."""

    positions: np.ndarray  # [n] int64, ascending
    device_slots: torch.Tensor  # [n] int64, allocated, not yet in the row
    transfer: Transfer


def _no_positions() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _no_slots() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass(slots=True, eq=False)
class RowTier:
    """Everything the host tier keeps for one pool row (one record: a released row is one pop).

    A row whose last ``prepare`` found nothing to do keeps it in ``quiet``; ``settled`` caches the
    selection's resident part, ``hole_list`` its holes. Any change to the row's cold thoughts drops
    all three (``add_cold``, ``set_on_device``, ``unsettle``).
    """

    cold: Dict[int, ColdThought] = field(default_factory=dict)  # thought index -> its hole (or zoomed-in copy)
    in_flight: List[InFlight] = field(default_factory=list)  # copies out not yet known finished
    copying_in: Set[int] = field(default_factory=set)  # cold thoughts with a zoom-in under way
    resident: Set[int] = field(default_factory=set)  # cold thoughts on the device
    offloaded: int = 0  # tokens in the host tier only
    # Closed thoughts waiting for the window to pass them: the sequence length before which none
    # can leave, how many were waiting and the selection then (a new waiting thought or a new
    # selection checks again).
    evict_after: Optional[Tuple[int, int, List[int]]] = None
    # The selection when it is wholly on the device (the list object the vote set), the thoughts
    # prepare returned and how many are cold.
    settled: Optional[Tuple[List[int], List[int], int]] = None
    # The selection, the count of thoughts waiting to leave, the sequence length up to which they
    # wait, and what prepare returned: while all hold, prepare has nothing to do again (most steps).
    quiet: Optional[Tuple[List[int], int, int, List[int]]] = None
    # Positions of holes brought back for the fine levels (ascending) and their device slots, the
    # copies of more under way, and how many such positions the last step wanted (admission).
    zoomed_positions: np.ndarray = field(default_factory=_no_positions)
    zoomed_position_slots: torch.Tensor = field(default_factory=_no_slots)
    position_copies: List[PositionCopy] = field(default_factory=list)
    position_headroom: int = 0
    hole_list: Optional[List[ColdThought]] = None  # holes() until the cold thoughts change
    hole_array: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # hole_ranges()

    def quiet_holds(self, record: Tuple[List[int], int, int, List[int]], seq_len: int) -> bool:
        """Whether ``record``, this row's quiet record when a request step read it, still says
        that ``prepare`` has nothing to do at ``seq_len`` (the planner's quiet steps then skip it;
        the row's selection and waiting thoughts are the ones the record was made with)."""
        return self.quiet is record and seq_len < record[2]

    def waits_for_window(self, waiting: int, zoomed: List[int], seq_len: int) -> bool:
        """Whether the row's ``waiting`` closed thoughts, under the selection ``zoomed``, still wait
        for the window at ``seq_len`` (as ``evict_after`` recorded: nothing to check before)."""
        if self.evict_after is None:
            return False
        until, count, selection = self.evict_after
        return seq_len < until and waiting == count and zoomed is selection

    def add_cold(self, index: int, thought: ColdThought) -> None:
        self.settled = self.quiet = self.hole_list = None
        self.cold[index] = thought
        if thought.on_device:
            self.resident.add(index)
        else:
            self.offloaded += thought.end - thought.start

    def set_on_device(self, index: int, thought: ColdThought, on_device: bool) -> None:
        self.settled = self.quiet = self.hole_list = None
        thought.on_device = on_device
        size = thought.end - thought.start
        if on_device:
            self.offloaded -= size
            self.resident.add(index)
        else:
            self.offloaded += size
            self.resident.discard(index)

    def holes(self) -> List[ColdThought]:
        """The cold thoughts whose positions have no device slots (the row's holes), ascending."""
        if self.hole_list is None:  # most steps change no cold thought: sorted once per change
            self.hole_list = sorted((t for t in self.cold.values() if not t.on_device), key=lambda t: t.start)
            self.hole_array = np.array([(t.start, t.end) for t in self.hole_list], dtype=np.int64).reshape(-1, 2)
        return self.hole_list

    def hole_ranges(self) -> np.ndarray:
        """``[h, 2]`` int64: the :meth:`holes` as position ranges."""
        self.holes()
        return self.hole_array

    def last_hole_end(self) -> int:
        """Where the row's last hole ends (0: it has none); positions after it are on the device."""
        holes = self.holes()  # disjoint and ascending: the last ends last
        return holes[-1].end if holes else 0

    def unsettle(self) -> None:
        """The row's cold thoughts changed: its cached prepare results no longer hold."""
        self.settled = self.quiet = self.hole_list = None


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
