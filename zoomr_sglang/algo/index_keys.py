"""Incremental mean keys: each index entry (a thought's body or summary key) holds running sums.

The store has a fixed capacity: a captured CUDA graph reads ``sums`` and ``counts`` at fixed
addresses, so they never move. Row ``capacity`` is a scratch entry that padded commits write to and
nothing reads. Handing out and taking back ids is host bookkeeping only; an id handed out must be
zeroed on the device (:meth:`IndexKeyStore.zero`) before keys are added to it, in stream order with
the forward that adds them (the engine does this at the start of each decode step).
"""

from typing import Iterable, List, Optional

import torch


class IndexKeyStore:
    """Running key sums per index entry and layer.

    sums: [num_layers, capacity + 1, num_kv_heads, head_dim] float32
    counts: [num_layers, capacity + 1] float32 (keys added per entry and layer)
    Sums rather than means are stored so that adding keys is one scatter-add with no rescaling.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device, capacity: int):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("capacity", capacity)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.scratch = capacity  # the padding entry
        self.device = torch.device(device)
        self.sums = torch.zeros(num_layers, capacity + 1, num_kv_heads, head_dim, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(num_layers, capacity + 1, dtype=torch.float32, device=self.device)
        # Lowest ids are handed out first (popped from the end), which keeps the live range compact.
        self._free_ids: List[int] = list(range(capacity - 1, -1, -1))
        self._live: set = set()
        self.exhausted = 0  # alloc calls refused because every entry was live

    @property
    def num_live(self) -> int:
        """Entries handed out and not taken back."""
        return len(self._live)

    def alloc(self) -> Optional[int]:
        """A free entry id (to be zeroed before use), or None when the store is full."""
        if not self._free_ids:
            self.exhausted += 1
            return None
        entry = self._free_ids.pop()
        self._live.add(entry)
        return entry

    def free(self, entries: Iterable[int]) -> None:
        """Take entries back (host bookkeeping; their values are reset when handed out again)."""
        entries = [int(e) for e in entries]
        if len(set(entries)) != len(entries):
            raise ValueError(f"entries contains duplicates: {entries}")
        for entry in entries:
            if entry not in self._live:
                raise ValueError(f"entries contains {entry}, which is not a live entry")
        self._live.difference_update(entries)
        self._free_ids.extend(sorted(entries, reverse=True))

    def zero(self, entries: torch.Tensor) -> None:
        """Reset entries [n] int64 (on the store's device) in every layer."""
        self.sums.index_fill_(1, entries, 0.0)
        self.counts.index_fill_(1, entries, 0.0)

    def load(self, entries: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Set entries [n] int64 to saved sums [num_layers, n, num_kv_heads, head_dim] and counts
        [num_layers, n] (a key another request computed)."""
        self.sums.index_copy_(1, entries, sums.to(self.sums.device, torch.float32))
        self.counts.index_copy_(1, entries, counts.to(self.counts.device, torch.float32))

    def add(self, layer: int, entries: torch.Tensor, keys: torch.Tensor) -> None:
        """Add keys [n, num_kv_heads, head_dim] (any float dtype) to entries [n] int64 (repeats allowed).

        Entry liveness is not checked here: that would need a device-to-host sync every step.
        """
        self._check_layer(layer)
        if entries.dim() != 1 or keys.shape != (entries.shape[0], self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys must have shape [n, {self.num_kv_heads}, {self.head_dim}] for entries of shape [n],"
                f" got keys {tuple(keys.shape)} and entries {tuple(entries.shape)}"
            )
        self.sums[layer].index_add_(0, entries, keys.to(torch.float32))
        self.counts[layer].index_add_(0, entries, torch.ones_like(entries, dtype=torch.float32))

    def means(self, layer: int, entries: torch.Tensor) -> torch.Tensor:
        """Mean keys [n, num_kv_heads, head_dim] float32 of entries [n]; an empty entry gives zeros."""
        self._check_layer(layer)
        counts = self.counts[layer, entries].clamp(min=1.0)
        return self.sums[layer, entries] / counts[:, None, None]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
