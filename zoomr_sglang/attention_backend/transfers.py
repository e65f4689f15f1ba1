"""Moving a step's small tables between host and device: the two copies the device half of a step
(``selection.py``, ``page_slots.py``, ``fine_observers.py``) shares. Neither waits for the device."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``: on CUDA one copy from pinned memory, queued
    (no wait); elsewhere the host array itself."""
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_host(sources: List[torch.Tensor]) -> Tuple[Optional[torch.cuda.Event], List[torch.Tensor]]:
    """Copies of ``sources`` in host memory: on CUDA pinned, queued behind the stream's work (no
    wait) with the event that marks them done; elsewhere taken at once (event None)."""
    if sources[0].device.type != "cuda":
        return None, [t.clone() for t in sources]
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in sources]
    for copy, source in zip(copies, sources):
        copy.copy_(source, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return event, copies

