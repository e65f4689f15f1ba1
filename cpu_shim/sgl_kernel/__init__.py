"""Pure-torch CPU stand-in for the ``sgl_kernel`` extension module.

Why this exists
---------------
SGLang's CPU path (``SGLANG_USE_CPU_ENGINE=1``) imports two functions from
``sgl_kernel`` at module import time:

* ``assign_req_to_token_pool_cpu`` (``sglang/srt/mem_cache/allocation.py``)
* ``copy_all_layer_kv_cache_cpu`` (``sglang/kernels/ops/kvcache/cache_move.py``)

The real ``sgl_kernel`` (PyPI ``sglang-kernel``) has no CPU-only build: importing
it without a GPU fails because ``libcuda.so.1`` is missing. On a CPU without AMX
every layer falls back to plain torch (``forward_native``), so these two
functions are all that is needed to run SGLang on CPU for tests. Both are
implemented here in plain torch with the semantics of the Triton kernels they
replace. Any other (non-dunder) attribute is a stub that raises
``NotImplementedError`` when called, so that module-level imports of kernels
the CPU path never calls still succeed, while an unexpected use fails loudly
instead of silently doing the wrong thing.

This folder (``cpu_shim``) is put on ``PYTHONPATH`` only for CPU runs. It must
come from ``PYTHONPATH`` rather than from the plug-in because SGLang's spawned
scheduler processes import ``sgl_kernel`` while unpickling, before plug-ins load.

**It must never be on the path on a GPU machine**: it would shadow the real
``sgl_kernel`` and break every CUDA kernel SGLang uses.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"]

__version__ = "0.0.0+cpu-shim"

#: Marker that lets callers tell this stand-in from the real extension.
IS_CPU_SHIM = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write freshly allocated KV slots into the request-to-token table, in place.

    Same semantics as the Triton kernel ``assign_req_to_token_pool`` in
    ``sglang/srt/mem_cache/allocation.py``: for each request ``i`` (in order),

    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] =
    out_cache_loc[o_i : o_i + end_offset[i] - start_offset[i]]``

    where ``o_i`` is the sum of ``end_offset[j] - start_offset[j]`` over ``j < i``.
    ``pool_len`` is the row length of ``req_to_token`` (kept for signature
    compatibility; rows are addressed through the tensor itself).
    """
    bs = int(req_pool_indices.numel())
    if bs == 0:
        return
    if req_to_token.dim() != 2 or req_to_token.shape[1] != pool_len:
        raise ValueError(
            f"req_to_token has shape {tuple(req_to_token.shape)}, expected (*, {pool_len})"
        )
    rows = req_pool_indices.reshape(-1).tolist()
    starts = start_offset.reshape(-1)[:bs].tolist()
    ends = end_offset.reshape(-1)[:bs].tolist()
    locs = out_cache_loc.reshape(-1)
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n <= 0:
            continue
        req_to_token[row, start:end] = locs[offset : offset + n].to(req_to_token.dtype)
        offset += n


def _byte_view(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` of raw memory at ``address`` (no copy)."""
    array = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(array, dtype=torch.uint8, count=nbytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy KV slots ``src_loc[k] -> tgt_loc[k]`` in every buffer, in place.

    Same semantics as the Triton kernel ``copy_all_layer_kv_cache_tiled`` in
    ``sglang/kernels/ops/kvcache/cache_move.py``: ``data_ptrs[b]`` is the raw
    address of a contiguous KV buffer (one per layer and per K/V, plus scale
    buffers for quantised caches) and ``strides[b]`` its row stride in bytes,
    which is also the number of bytes copied per slot. For each buffer, row
    ``tgt_loc[k]`` receives the bytes of row ``src_loc[k]``. All source rows are
    read before any target row is written, as in the kernel, so overlapping
    ``src``/``tgt`` sets ("in-place" moves) are safe.
    """
    n = int(tgt_loc.numel())
    if n == 0:
        return
    if int(src_loc.numel()) != n:
        raise ValueError(f"tgt_loc has {n} entries but src_loc has {src_loc.numel()}")
    src = src_loc.reshape(-1).to(device="cpu", dtype=torch.int64)
    tgt = tgt_loc.reshape(-1).to(device="cpu", dtype=torch.int64)
    if bool((src < 0).any()) or bool((tgt < 0).any()):
        raise ValueError("copy_all_layer_kv_cache_cpu: negative slot index")
    rows_needed = int(torch.maximum(src.max(), tgt.max()).item()) + 1
    ptrs = data_ptrs.reshape(-1).tolist()
    row_bytes = strides.reshape(-1).tolist()
    if len(ptrs) != len(row_bytes):
        raise ValueError(f"{len(ptrs)} data pointers but {len(row_bytes)} strides")
    for ptr, stride in zip(ptrs, row_bytes):
        ptr, stride = int(ptr), int(stride)
        if stride <= 0:
            continue
        buf = _byte_view(ptr, rows_needed * stride).view(rows_needed, stride)
        # Advanced indexing on the right-hand side materialises a copy first,
        # so every source row is read before any target row is written.
        buf[tgt] = buf[src]


def __getattr__(name: str):
    if name.startswith("__") and name.endswith("__"):
        # Keep the import machinery, pickle, inspect and copy working.
        raise AttributeError(f"module 'sgl_kernel' (CPU stand-in) has no attribute {name!r}")
    # Some SGLang modules import CPU kernels at module level that the paths we run never call
    # (speculative decoding, for one): hand out a stub that fails only when called.
    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this 'sgl_kernel' is the pure-torch CPU "
            f"stand-in from zoomr-sglang's cpu_shim/, which implements only "
            f"{', '.join(__all__)}. It must never be on PYTHONPATH on a GPU machine."
        )

    unavailable.__name__ = name
    return unavailable
