"""Host-memory tier for cold thoughts' KV: a token-slot pool in CPU memory (pinned on CUDA).

SGLang's HiCache host pool (``MHATokenToKVPoolHost``) is built around radix-tree pages and its
transfer kernels need CUDA ``sgl_kernel``; the thoughts of a running request are plain token runs
of one row, so this tier keeps its own tensors.

Copy out (:meth:`HostKVTier.store`): on CUDA it runs on a side stream that first waits for the
forward stream (so it follows the forward that wrote the thought's last token), into pinned staging
memory, and returns a :class:`Transfer`; the caller frees the device slots only once the transfer
is done, which overlaps the copy with the next steps' compute. On CPU it completes at once.
Copy in (:meth:`HostKVTier.load`): from pinned staging, non-blocking on the current (forward)
stream, so it is ordered before the attention that reads the slots; PyTorch's pinned-memory cache
keeps the staging block alive until the copy has run.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class Transfer:
    """A copy out of the device that may still be running; ``finish`` runs once it is done."""

    def __init__(self, event: Optional["torch.cuda.Event"], finish: Callable[[], None]) -> None:
        self._event = event
        self._finish: Optional[Callable[[], None]] = finish
        if event is None:
            self._complete()

    def done(self) -> bool:
        """True once the copy has finished (never blocks)."""
        if self._finish is not None and self._event.query():
            self._complete()
        return self._finish is None

    def wait(self) -> None:
        if self._finish is not None:
            self._event.synchronize()
            self._complete()

    def _complete(self) -> None:
        finish, self._finish = self._finish, None
        finish()


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
        self._copy_stream = None  # CUDA side stream for copies out, made on first use
        self.token_bytes = self.bytes_per_token(num_layers, num_kv_heads, head_dim, v_head_dim, dtype)

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

    def store(self, kv_pool, device_slots: torch.Tensor, host_slots: torch.Tensor) -> Transfer:
        """Copy every layer's K and V of ``device_slots`` [n] into ``host_slots`` [n].

        The device slots must stay allocated until the returned transfer is done.
        """
        num_layers = self.k.shape[0]
        device = kv_pool.get_key_buffer(0).device
        if device.type != "cuda":
            for layer in range(num_layers):
                self.k[layer].index_copy_(0, host_slots, kv_pool.get_key_buffer(layer).index_select(0, device_slots))
                self.v[layer].index_copy_(0, host_slots, kv_pool.get_value_buffer(layer).index_select(0, device_slots))
            return Transfer(None, lambda: None)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=device)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(device))
        device_slots.record_stream(stream)
        with torch.cuda.stream(stream):
            keys = torch.stack([kv_pool.get_key_buffer(layer).index_select(0, device_slots) for layer in range(num_layers)])
            values = torch.stack([kv_pool.get_value_buffer(layer).index_select(0, device_slots) for layer in range(num_layers)])
            staged_k = torch.empty(keys.shape, dtype=keys.dtype, pin_memory=True)
            staged_v = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            staged_k.copy_(keys, non_blocking=True)
            staged_v.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)

        def scatter() -> None:  # host side, after the copy has landed in staging
            self.k.index_copy_(1, host_slots, staged_k)
            self.v.index_copy_(1, host_slots, staged_v)

        return Transfer(event, scatter)

    def load(self, kv_pool, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Copy every layer's K and V of ``host_slots`` [n] into ``device_slots`` [n], ordered on
        the current stream before whatever reads them next."""
        device = kv_pool.get_key_buffer(0).device
        pinned = device.type == "cuda"
        keys = self.k.index_select(1, host_slots)
        values = self.v.index_select(1, host_slots)
        if pinned:
            keys, values = keys.pin_memory(), values.pin_memory()
        keys = keys.to(device, non_blocking=pinned)
        values = values.to(device, non_blocking=pinned)
        for layer in range(self.k.shape[0]):
            kv_pool.get_key_buffer(layer).index_copy_(0, device_slots, keys[layer])
            kv_pool.get_value_buffer(layer).index_copy_(0, device_slots, values[layer])
