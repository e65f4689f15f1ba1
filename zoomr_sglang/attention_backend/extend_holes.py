"""Extend (prefill) over a prompt prefix with holes: requests that inherited cold thoughts from the
zoomr radix tree (``radix_ext``). Both backends run SGLang's own extend unless a request of the
batch has holes; then every request of the batch is computed by
:func:`zoomr_sglang.algo.torch_attention.extend_attention_around_holes`, once per request and layer.
It runs once per turn, not per decode step.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from zoomr_sglang.algo.torch_attention import extend_attention_around_holes

Holes = List[Tuple[int, int]]


def batch_holes(controller, forward_batch) -> Optional[List[Tuple[int, Holes]]]:
    """Each request's pool row and holes in an extend batch (read once per batch, not per layer),
    or None when no request has any (SGLang's extend)."""
    tiering = controller.tiering
    if tiering is None or not tiering.adopted_rows:  # only an inherited prefix has holes at prefill
        return None
    rows = forward_batch.req_pool_indices.tolist()
    holes = [(row, tiering.holes(row)) for row in rows]
    return holes if any(row_holes for _, row_holes in holes) else None


def extend_around_holes(q: torch.Tensor, layer, forward_batch, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        req_to_token: torch.Tensor, holes: List[Tuple[int, Holes]]) -> torch.Tensor:
    """``[tokens, heads * v_head_dim]`` outputs of an extend batch whose requests may have holes
    (``holes`` from :func:`batch_holes`)."""
    query = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
    prefix_lens = forward_batch.extend_prefix_lens_cpu
    extend_lens = forward_batch.extend_seq_lens_cpu
    outputs, offset = [], 0
    for (row, row_holes), prefix_len, extend_len in zip(holes, prefix_lens, extend_lens):
        seq_len = prefix_len + extend_len
        outputs.append(extend_attention_around_holes(
            query[offset: offset + extend_len], k_cache, v_cache, req_to_token[row, :seq_len], row_holes,
            prefix_len, layer.scaling))
        offset += extend_len
    return torch.cat(outputs).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
