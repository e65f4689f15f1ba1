"""The fine levels' per-layer token weights in one Triton launch, with a dispatcher to the torch reference.

:func:`accumulate_token_weights` adds one layer's attention weights of every observing lane of a
step (reference: :func:`zoomr_sglang.algo.token_weights.accumulate_token_weights`, same arguments,
weights equal to float rounding). Grid ``(n_lanes, width / BLOCK)``: a program reads its block of
the lane's entries in the step's KV list, their slots and, KV head by KV head, the keys once, the
query rows of the GQA group that reads that head and their log-sum-exp; it adds
``exp(scaling * q . k - lse)`` summed over the heads to the block's weights. A program owns its
block, so the sums need no atomics and come out the same at every run. Padding entries
(``valid`` False) read nothing and add nothing.

Against the torch reference on a GPU, the keys are read once and in the cache's dtype (the
reference gathers them, then makes a float32 copy) and a layer is one launch instead of about
fifteen. Not timed on a GPU yet.
"""

from __future__ import annotations

from typing import Optional

import torch

from zoomr_sglang.algo.token_weights import accumulate_token_weights as accumulate_token_weights_torch
from zoomr_sglang.kernels.kv_indices import tl, triton, triton_available, triton_interpreted

TILE_ELEMENTS = 8192  # products a program holds per KV head: GQA group x entries x head_dim
MAX_BLOCK = 64  # entries per program


if triton is not None:

    @triton.jit
    def _token_weight_kernel(
        query, stride_qb, stride_qh,  # [bs, num_heads, head_dim]
        log_normalizer, stride_lb,  # [bs, num_heads] float32
        keys, stride_kt, stride_kh,  # [n_slots, num_kv_heads, head_dim]
        kv_indices,  # [nnz] int
        lanes,  # [n_lanes] int64
        entries, stride_el,  # [n_lanes, width] int64
        valid, stride_vl,  # [n_lanes, width] uint8
        weights, stride_wl,  # [n_lanes, width] float32
        width, scaling, layer_weight,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
        DIM_P2: tl.constexpr, BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0)
        w = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_width = w < width
        ok = in_width & (tl.load(valid + lane * stride_vl + w, mask=in_width, other=0) != 0)
        b = tl.load(lanes + lane)
        entry = tl.load(entries + lane * stride_el + w, mask=ok, other=0)
        slot = tl.load(kv_indices + entry, mask=ok, other=0).to(tl.int64)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for kv_head in tl.static_range(NUM_KV_HEADS):
            heads = kv_head * GROUP + g
            q = tl.load(query + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            k = tl.load(keys + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            score = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P2, BLOCK]
            normalizer = tl.load(log_normalizer + b * stride_lb + heads, mask=g_ok, other=0.0)
            weight = tl.exp(score * scaling - normalizer[:, None])
            total += tl.sum(tl.where(g_ok[:, None] & ok[None, :], weight, 0.0), axis=0)
        target = weights + lane * stride_wl + w
        tl.store(target, tl.load(target, mask=ok, other=0.0) + total * layer_weight, mask=ok)

else:  # pragma: no cover
    _token_weight_kernel = None


def accumulate_token_weights_triton(query, log_normalizer, key_buffer, kv_indices, lanes, entries, valid, weights,
                                    scaling: float, layer_weight: float = 1.0) -> None:
    """Triton version of :func:`zoomr_sglang.algo.token_weights.accumulate_token_weights`. One
    launch, no host sync."""
    if not triton_available():
        raise RuntimeError("triton is not installed")
    n_lanes, width = entries.shape
    if n_lanes == 0 or width == 0:
        return
    _, num_heads, head_dim = query.shape
    num_kv_heads = key_buffer.shape[1]
    if weights.dtype != torch.float32 or weights.stride(-1) != 1 or log_normalizer.dtype != torch.float32:
        raise ValueError(f"weights and log_normalizer must be float32 (weights contiguous in its last dimension), "
                         f"got {weights.dtype} with strides {weights.stride()} and {log_normalizer.dtype}")
    for name, t in (("query", query), ("key_buffer", key_buffer), ("entries", entries), ("valid", valid),
                    ("log_normalizer", log_normalizer)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    group = num_heads // num_kv_heads
    group_p2, dim_p2 = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    block = max(1, min(MAX_BLOCK, TILE_ELEMENTS // (group_p2 * dim_p2)))
    _token_weight_kernel[(n_lanes, triton.cdiv(width, block))](
        query, query.stride(0), query.stride(1),
        log_normalizer, log_normalizer.stride(0),
        key_buffer, key_buffer.stride(0), key_buffer.stride(1),
        kv_indices, lanes,
        entries, entries.stride(0),
        valid.view(torch.uint8), valid.stride(0),
        weights, weights.stride(0),
        width, scaling, layer_weight,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, DIM_P2=dim_p2, BLOCK=block,
        num_warps=4,
    )


def runs_triton(weights: torch.Tensor) -> bool:
    """Whether :func:`accumulate_token_weights` runs the kernel for ``weights``' device: CUDA, or
    the CPU under ``TRITON_INTERPRET=1``."""
    return triton_available() and (weights.is_cuda or triton_interpreted())


def accumulate_token_weights(query, log_normalizer, key_buffer, kv_indices, lanes, entries, valid, weights,
                             scaling: float, key_rows: Optional[torch.Tensor] = None,
                             layer_weight: float = 1.0) -> None:
    """Add one layer's token weights of every observing lane (the torch reference's arguments):
    the kernel where :func:`runs_triton`, the torch reference otherwise (``key_rows``, its gather
    buffer, only there)."""
    if runs_triton(weights):
        accumulate_token_weights_triton(query, log_normalizer, key_buffer, kv_indices, lanes, entries, valid,
                                        weights, scaling, layer_weight)
    else:
        accumulate_token_weights_torch(query, log_normalizer, key_buffer, kv_indices, lanes, entries, valid, weights,
                                       scaling, key_rows=key_rows, layer_weight=layer_weight)
