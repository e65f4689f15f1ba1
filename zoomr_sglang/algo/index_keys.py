"""Incremental mean keys: each index entry (a thought's body or summary key) holds running sums."""

from typing import Iterable

import torch


class IndexKeyStore:
    """Running key sums per index entry and layer.

    sums: [num_layers, capacity, num_kv_heads, head_dim] float32
    counts: [num_layers, capacity] float32 (keys added per entry and layer)
    Sums rather than means are stored so that adding keys is one index_add_ with no rescaling.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device, initial_capacity: int = 64):
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("initial_capacity", initial_capacity),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.sums = torch.zeros(
            num_layers, initial_capacity, num_kv_heads, head_dim, dtype=torch.float32, device=self.device
        )
        self.counts = torch.zeros(num_layers, initial_capacity, dtype=torch.float32, device=self.device)
        # Lowest ids are handed out first (popped from the end), which keeps the live range compact.
        self._free_ids: list[int] = list(range(initial_capacity - 1, -1, -1))
        self._live: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.counts.shape[1]

    @property
    def num_live(self) -> int:
        """Entries allocated and not freed."""
        return len(self._live)

    def alloc(self) -> int:
        """A fresh zeroed entry id; doubles the capacity when full."""
        if not self._free_ids:
            self._grow()
        entry = self._free_ids.pop()
        self._live.add(entry)
        return entry

    def free(self, entries: Iterable[int]) -> None:
        """Return entries to the free list, zeroed so a later alloc starts from nothing."""
        entries = [int(e) for e in entries]
        if len(set(entries)) != len(entries):
            raise ValueError(f"entries contains duplicates: {entries}")
        for entry in entries:
            if entry not in self._live:
                raise ValueError(f"entries contains {entry}, which is not a live entry")
        if not entries:
            return
        ids = torch.tensor(entries, dtype=torch.int64, device=self.device)
        self.sums[:, ids] = 0
        self.counts[:, ids] = 0
        self._live.difference_update(entries)
        self._free_ids.extend(sorted(entries, reverse=True))

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

    def means_all_layers(self, entries: torch.Tensor) -> torch.Tensor:
        """Mean keys [num_layers, n, num_kv_heads, head_dim] float32 of entries [n]."""
        counts = self.counts[:, entries].clamp(min=1.0)
        return self.sums[:, entries] / counts[:, :, None, None]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def _grow(self) -> None:
        old_capacity = self.capacity
        new_capacity = 2 * old_capacity
        sums = self.sums.new_zeros(self.num_layers, new_capacity, self.num_kv_heads, self.head_dim)
        counts = self.counts.new_zeros(self.num_layers, new_capacity)
        sums[:, :old_capacity] = self.sums
        counts[:, :old_capacity] = self.counts
        self.sums, self.counts = sums, counts
        self._free_ids.extend(range(new_capacity - 1, old_capacity - 1, -1))
