"""What ``tiering.py`` records per thought and per copy, and its counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
class TieringCounters:
    evicted_tokens: int = 0  # device slots given back to SGLang's allocator
    zoomed_in_tokens: int = 0  # tokens copied back from the host tier
    dropped_tokens: int = 0  # zoomed-in tokens dropped again without a copy (host copy kept)
    host_full: int = 0  # thoughts that stayed resident because the host tier was full
    zoom_in_failures: int = 0  # zoom-ins the device pool could not serve (thought skipped that step)
    copy_failures: int = 0  # copies out or in that raised: that thought stays (or stays off) the device

    def as_dict(self) -> dict:
        return dict(self.__dict__)
