"""Host-memory tier for cold thoughts' KV: a token-slot pool in CPU memory (pinned on CUDA).

SGLang's HiCache host pool (``MHATokenToKVPoolHost``) is built around radix-tree pages and its
transfer kernels need CUDA ``sgl_kernel``; the thoughts of a running request are plain token runs
of one row, so this tier keeps its own tensors and copies with ``index_select``/``index_copy_`` on
the current stream. The copy out completes before the device slots are freed; the copy in is
enqueued on the forward stream before the attention that reads it.
"""

from __future__ import annotations

from typing import Optional

import torch


class HostKVTier:
    """Token slots for K and V of every layer in host memory.

    Storage: ``k[num_layers, capacity, num_kv_heads, head_dim]`` and
    ``v[num_layers, capacity, num_kv_heads, v_head_dim]``, ``dtype`` of the device KV pool.
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, capacity_tokens: int, pin_memory: bool) -> None:
        self.capacity = capacity_tokens
        self.k = torch.empty((num_layers, capacity_tokens, num_kv_heads, head_dim), dtype=dtype, pin_memory=pin_memory)
        self.v = torch.empty((num_layers, capacity_tokens, num_kv_heads, v_head_dim), dtype=dtype, pin_memory=pin_memory)
        self._free = torch.arange(capacity_tokens, dtype=torch.int64)
        self._num_free = capacity_tokens

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * num_kv_heads * (head_dim + v_head_dim) * torch.tensor([], dtype=dtype).element_size()

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    def alloc(self, n: int) -> Optional[torch.Tensor]:
        """``n`` free host slots (int64 CPU), or None when the tier is full."""
        if n > self._num_free:
            return None
        start = self._num_free - n
        slots = self._free[start:self._num_free].clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        self._free[self._num_free:self._num_free + n] = slots
        self._num_free += n

    def store(self, kv_pool, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Copy every layer's K and V of ``device_slots`` [n] into ``host_slots`` [n]."""
        for layer in range(self.k.shape[0]):
            keys = kv_pool.get_key_buffer(layer).index_select(0, device_slots)
            values = kv_pool.get_value_buffer(layer).index_select(0, device_slots)
            # Blocking on purpose: the host-side index_copy_ must see finished data. An
            # asynchronous copy-out on a side stream comes with the GPU-speed work.
            self.k[layer].index_copy_(0, host_slots, keys.to("cpu"))
            self.v[layer].index_copy_(0, host_slots, values.to("cpu"))

    def load(self, kv_pool, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Copy every layer's K and V of ``host_slots`` [n] into ``device_slots`` [n]."""
        for layer in range(self.k.shape[0]):
            key_buffer = kv_pool.get_key_buffer(layer)
            value_buffer = kv_pool.get_value_buffer(layer)
            keys = self.k[layer].index_select(0, host_slots).to(key_buffer.device, non_blocking=True)
            values = self.v[layer].index_select(0, host_slots).to(value_buffer.device, non_blocking=True)
            key_buffer.index_copy_(0, device_slots, keys)
            value_buffer.index_copy_(0, device_slots, values)
