"""The fine levels' token weights for every observing request of a decode step at once.

ZoomR's token level keeps the tokens the last observed step attended most: per position of the
working set, the attention weight summed over query heads and over layers, a layer weighing more the
nearer it is to the logits (:func:`token_layer_weight`). The decode kernel already
knows each head's softmax denominator (its log-sum-exp, which the thought votes read too), so a
weight is ``exp(scaling * q . k - lse)``: one pass over the working set's keys per layer, batched
over the step's observing lanes, no Python loop over requests and no host read. The per-request
reference is a float64 softmax over the same keys
(:func:`zoomr_sglang.algo.torch_attention.dense_attention_weights`, summed over heads).

Shapes: ``n_lanes`` observing requests of the step, ``width`` the longest of their working sets
(shorter lanes are padded and their padding weighs nothing).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def token_layer_weight(layer: int, num_layers: int) -> float:
    """What layer ``layer`` of ``num_layers`` adds to the token ranking: ``(layer + 1) /
    num_layers``, a ramp. The last layers, nearest the logits, decide the next token, and the
    first layers' heads spread their attention thinly (summed evenly, they ranked tokens the late
    layers did not need: on SmolLM2 zoomr covered more attention than Quest at every layer at 35%
    yet had the higher output error at 10 of the last 16). The ramp missed the model's own token
    at 121 and 51 of 6,144 teacher-forced steps at 20% and 35% against 145 and 57 summed evenly;
    the last half alone, 159 and 56 (``benchmarks/README.md``)."""
    return (layer + 1) / num_layers


def lane_entries(kv_indptr: np.ndarray, lanes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Where each observing lane's working set sits in the step's KV list (host, once per step).

    kv_indptr: ``[bs + 1]`` int, request ``b`` attends KV-list entries ``kv_indptr[b]:kv_indptr[b + 1]``;
    lanes: ``[n_lanes]`` int64 batch indices. Returns ``entries [n_lanes, width]`` int64 (a lane's
    entries in order, padded with its first entry; an empty lane's padding stays inside the list)
    and ``lengths [n_lanes]``.
    The work is the lanes' working sets, never their sequences."""
    starts = kv_indptr[lanes].astype(np.int64)
    lengths = kv_indptr[lanes + 1].astype(np.int64) - starts
    width = int(lengths.max()) if len(lanes) else 0
    offsets = np.arange(width, dtype=np.int64)
    entries = starts[:, None] + np.where(offsets[None, :] < lengths[:, None], offsets[None, :], 0)
    return np.minimum(entries, max(int(kv_indptr[-1]) - 1, 0)), lengths


def accumulate_token_weights(query: torch.Tensor, log_normalizer: torch.Tensor, key_buffer: torch.Tensor,
                             kv_indices: torch.Tensor, lanes: torch.Tensor, entries: torch.Tensor,
                             valid: torch.Tensor, weights: torch.Tensor, scaling: float,
                             key_rows: Optional[torch.Tensor] = None, layer_weight: float = 1.0) -> None:
    """Add one layer's attention weights of every observing lane, times ``layer_weight``
    (:func:`token_layer_weight`), to ``weights`` in place.

    Args:
        query: ``[bs, num_heads, head_dim]``, post-RoPE like the cached keys.
        log_normalizer: ``[bs, num_heads]`` float32, natural log of each head's softmax denominator
            over the request's working set (what the decode kernel returns).
        key_buffer: ``[n_slots, num_kv_heads, head_dim]``, the layer's cached keys.
        kv_indices: ``[nnz]`` int, the step's KV list (the slots the attention read).
        lanes: ``[n_lanes]`` int64 batch indices; entries ``[n_lanes, width]`` int64 and valid
            ``[n_lanes, width]`` bool: :func:`lane_entries` on the device.
        weights: ``[n_lanes, width]`` float32 accumulator (padding stays 0).
        scaling: the softmax scale.
        key_rows: optional ``[n_lanes * width, num_kv_heads, head_dim]`` buffer in the cache's dtype
            that the keys are gathered into (kept across layers: on the CPU, gathering into fresh
            memory costs several times the gather itself).
    """
    n_lanes, width = entries.shape
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_buffer.shape[1]
    slots = kv_indices.index_select(0, entries.reshape(-1)).long()
    keys = torch.index_select(key_buffer, 0, slots, out=key_rows) if key_rows is not None else (
        key_buffer.index_select(0, slots))
    keys = keys.float().reshape(n_lanes, width, num_kv_heads, head_dim)
    grouped = query.index_select(0, lanes).float().reshape(n_lanes, num_kv_heads, -1, head_dim)
    # Consecutive query heads share a KV head (GQA): one batched matmul per KV head reads the keys
    # where they were gathered (a grouped einsum over all heads first copies them head-major).
    logits = torch.stack([torch.bmm(grouped[:, kv], keys[:, :, kv].transpose(1, 2)) for kv in range(num_kv_heads)],
                         dim=1).reshape(n_lanes, num_heads, width)
    normalizer = log_normalizer.index_select(0, lanes).float()[:, :, None]
    weights += torch.where(valid, torch.exp(logits * scaling - normalizer).sum(dim=1) * layer_weight, 0.0)
