"""Host-memory tier for cold thoughts' KV: a token-slot pool in CPU memory (pinned on CUDA).

Layout: slot-major, ``k[capacity, num_layers, num_kv_heads, head_dim]`` (and ``v`` alike), so a run
of consecutive host slots holds every layer of its tokens in one contiguous chunk. Slots are handed
out in whole blocks of ``block_tokens`` consecutive slots (a thought's blocks are consecutive while
the tier is not fragmented), and a block returns to the free stack once every slot of it is freed:
any subset of a thought's slots can be freed (the radix tree keeps suffixes of them). Host slot ids
stay per token (int64).

Copies (:meth:`HostKVTier.store` out of the device, :meth:`HostKVTier.load` into it) return a
:class:`Transfer`. On CUDA both run on one side stream that first waits for the current (forward)
stream: a copy out gathers the device slots of every layer into a device staging buffer and copies
each contiguous host run to the pinned tier with one non-blocking copy; a copy in does the reverse.
The caller polls :meth:`Transfer.done` (``event.query()``, never a wait): the device slots of a copy
out are freed, and those of a copy in are attended, only once it is done. On CPU the copies run
directly between the pool and the tier (no staging) and are done at once.

With tensor parallelism every rank copies its heads' part of the same thought, and every rank's
allocator must free and take slots at the same step (SGLang's replicated schedulers admit and
retract from what the allocator holds). So there a copy is done at an agreed poll,
:data:`TP_COPY_POLLS`, whatever its event says: the tiering polls a copy once in the step that
starts it and once in each later step, so it is done the step after it started, and the rank
waits for it then if it has not finished yet (a thought's KV takes well under a decode step).

SGLang's HiCache host pool (``MHATokenToKVPoolHost``) is built around radix-tree pages and its
transfer kernels need CUDA ``sgl_kernel``; a thought is a plain run of one row, so this tier keeps
its own tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

HOST_BLOCK_TOKENS = 32  # slots per allocation block: at most 31 unused slots per thought
TP_COPY_POLLS = 2  # with TP > 1, the poll at which every rank calls a copy done (see above)
GATHER_RUNS = 8  # a load from more runs of host slots than this is gathered on the host first


class Transfer:
    """A copy that may still be running on the side stream; holds the tensors it reads and writes
    until it is known to be done. ``event`` None: done already (CPU). ``agreed_polls`` > 0: the
    poll of :meth:`done` that says True on every rank (TP > 1), waiting for the copy if need be."""

    def __init__(self, event=None, keep: Sequence[torch.Tensor] = (), agreed_polls: int = 0) -> None:
        self._event = event
        self._keep = tuple(keep)
        self._polls_left = agreed_polls

    def done(self) -> bool:
        """True once the copy has finished (never blocks), or, with agreed polls, from that poll on
        (blocks then, if the copy is still running)."""
        if self._event is None:
            return True
        if self._polls_left:
            self._polls_left -= 1
            if self._polls_left == 0:
                self.wait()
        elif self._event.query():
            self._event, self._keep = None, ()
        return self._event is None

    def wait(self) -> None:
        """Block until the copy has finished (release path only)."""
        if self._event is not None:
            self._event.synchronize()
            self._event, self._keep = None, ()


def contiguous_runs(host_slots: torch.Tensor) -> List[Tuple[int, int, int]]:
    """``(first host slot, offset in host_slots, length)`` of each run of consecutive slots.

    host_slots: [n] int64 CPU.
    """
    slots = host_slots.numpy()
    bounds = [0, *(np.flatnonzero(np.diff(slots) != 1) + 1).tolist(), len(slots)]
    return [(int(slots[a]), a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def gather_layers(layers: Sequence[torch.Tensor], device_slots: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:, layer] = layers[layer][device_slots]``: layers [slots, heads, dim] each,
    device_slots [n] int64, out [n, num_layers, heads, dim] (a strided view is fine)."""
    for layer, buffer in enumerate(layers):
        torch.index_select(buffer, 0, device_slots, out=out[:, layer])


def scatter_layers(layers: Sequence[torch.Tensor], device_slots: torch.Tensor, src: torch.Tensor) -> None:
    """``layers[layer][device_slots] = src[:, layer]``, the inverse of :func:`gather_layers`."""
    for layer, buffer in enumerate(layers):
        buffer.index_copy_(0, device_slots, src[:, layer])


class HostKVTier:
    """Token slots for K and V of every layer in host memory.

    Storage: ``k[capacity, num_layers, num_kv_heads, head_dim]`` and
    ``v[capacity, num_layers, num_kv_heads, v_head_dim]``, ``dtype`` of the device KV pool;
    ``capacity`` is ``capacity_tokens`` rounded down to whole blocks. ``agreed_polls``: see
    :class:`Transfer` (0: a copy is done when its event says so).
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, capacity_tokens: int, pin_memory: bool,
                 block_tokens: int = HOST_BLOCK_TOKENS, agreed_polls: int = 0) -> None:
        self.agreed_polls = agreed_polls
        num_blocks = capacity_tokens // block_tokens
        self.block_tokens = block_tokens
        self.capacity = num_blocks * block_tokens
        self.k = torch.empty((self.capacity, num_layers, num_kv_heads, head_dim), dtype=dtype, pin_memory=pin_memory)
        self.v = torch.empty((self.capacity, num_layers, num_kv_heads, v_head_dim), dtype=dtype, pin_memory=pin_memory)
        self._free_blocks: List[int] = list(range(num_blocks - 1, -1, -1))  # a stack; the lowest id on top
        self._block_use = np.zeros(num_blocks, dtype=np.int64)  # allocated, not yet freed slots per block
        self._num_used = 0
        self._copy_stream = None  # CUDA side stream for copies out and in, made on first use
        self.token_bytes = self.bytes_per_token(num_layers, num_kv_heads, head_dim, v_head_dim, dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * num_kv_heads * (head_dim + v_head_dim) * torch.tensor([], dtype=dtype).element_size()

    @property
    def num_used(self) -> int:
        """Slots allocated and not yet freed (the unused tail of a thought's last block not counted)."""
        return self._num_used

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    # -- slots -------------------------------------------------------------------------------------
    def alloc(self, n: int) -> Optional[torch.Tensor]:
        """``n`` host slots [n] int64 CPU, the first ``n`` of ``ceil(n / block_tokens)`` whole free
        blocks taken in ascending order; None when too few blocks are free."""
        blocks_needed = -(-n // self.block_tokens)
        if blocks_needed > len(self._free_blocks):
            return None
        blocks = sorted(self._free_blocks[len(self._free_blocks) - blocks_needed:])
        del self._free_blocks[len(self._free_blocks) - blocks_needed:]
        uses = np.full(blocks_needed, self.block_tokens, dtype=np.int64)
        if blocks_needed:
            uses[-1] = n - (blocks_needed - 1) * self.block_tokens
        self._block_use[blocks] = uses
        self._num_used += n
        first = torch.tensor(blocks, dtype=torch.int64) * self.block_tokens
        return (first[:, None] + torch.arange(self.block_tokens)).reshape(-1)[:n]

    def free(self, slots: torch.Tensor) -> None:
        """Free any subset of allocated slots; a block whose every slot is freed is free again."""
        if slots.numel() == 0:
            return
        blocks, counts = np.unique(slots.numpy() // self.block_tokens, return_counts=True)
        self._block_use[blocks] -= counts
        emptied = blocks[self._block_use[blocks] == 0]
        self._free_blocks.extend(emptied[::-1].tolist())  # the lowest on top: the next alloc is consecutive
        self._num_used -= slots.numel()

    # -- copies -------------------------------------------------------------------------------------
    def _pairs(self, kv_pool):
        """(per-layer device buffers, host tensor) for K and for V."""
        layers = range(self.k.shape[1])
        return (([kv_pool.get_key_buffer(layer) for layer in layers], self.k),
                ([kv_pool.get_value_buffer(layer) for layer in layers], self.v))

    def _side_stream(self, device: torch.device):
        """The copy stream, ordered after everything the current (forward) stream has queued: the
        forward that wrote a thought's KV, or the last reads of slots the allocator hands out again."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        return self._copy_stream

    def store(self, kv_pool, device_slots: torch.Tensor, host_slots: torch.Tensor) -> Transfer:
        """Copy every layer's K and V of ``device_slots`` [n] into ``host_slots`` [n].

        The device slots must stay allocated until the returned transfer is done.
        """
        return self._copy(kv_pool, device_slots, host_slots, to_host=True)

    def load(self, kv_pool, host_slots: torch.Tensor, device_slots: torch.Tensor) -> Transfer:
        """Copy every layer's K and V of ``host_slots`` [n] into ``device_slots`` [n] (freshly
        allocated). Nothing may read the device slots until the returned transfer is done."""
        return self._copy(kv_pool, device_slots, host_slots, to_host=False)

    def _copy(self, kv_pool, device_slots: torch.Tensor, host_slots: torch.Tensor, to_host: bool) -> Transfer:
        runs = contiguous_runs(host_slots)
        # Scattered host slots (single positions brought back for the fine levels): one gather on
        # the host into one buffer, then one copy, instead of a copy per run.
        gathered = not to_host and len(runs) > GATHER_RUNS
        device = kv_pool.get_key_buffer(0).device
        if device.type != "cuda":  # straight between the pool and the tier, done at once
            move = gather_layers if to_host else scatter_layers
            for layers, host in self._pairs(kv_pool):
                if gathered:
                    scatter_layers(layers, device_slots, host.index_select(0, host_slots))
                    continue
                for first, offset, length in runs:
                    move(layers, device_slots[offset:offset + length], host[first:first + length])
            return Transfer()
        stream = self._side_stream(device)
        device_slots.record_stream(stream)
        staged = []
        with torch.cuda.stream(stream):
            for layers, host in self._pairs(kv_pool):
                staging = torch.empty((len(device_slots), *host.shape[1:]), dtype=host.dtype, device=device)
                if to_host:
                    gather_layers(layers, device_slots, staging)
                if gathered:
                    rows = torch.empty(staging.shape, dtype=host.dtype, pin_memory=host.is_pinned())
                    torch.index_select(host, 0, host_slots, out=rows)
                    staging.copy_(rows, non_blocking=True)
                    staged.append(rows)  # pinned source rows live until the copy is done
                    runs_to_copy = ()
                else:
                    runs_to_copy = runs
                for first, offset, length in runs_to_copy:  # one copy per contiguous run of the pinned tier
                    if to_host:
                        host[first:first + length].copy_(staging[offset:offset + length], non_blocking=True)
                    else:
                        staging[offset:offset + length].copy_(host[first:first + length], non_blocking=True)
                if not to_host:
                    scatter_layers(layers, device_slots, staging)
                staged.append(staging)
            event = torch.cuda.Event()
            event.record(stream)
        return Transfer(event, (device_slots, *staged), self.agreed_polls)
