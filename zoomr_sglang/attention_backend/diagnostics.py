"""Checks of a decode step's outputs against dense references (eager steps only).

Self-check steps (``self_check_interval`` in ``ZOOMR_CONFIG``): the largest error of each request's output
against a float64 masked dense reference over the same working set. Requests with
``zoomr_fidelity``: the share of the dense (whole-sequence) attention mass the working set covers,
averaged over heads, and ``||output - dense|| / ||dense||``. Both loop over requests in Python:
they are measurements, and a step that needs them never runs in a CUDA graph.
"""

from __future__ import annotations

import torch

from zoomr_sglang.algo.torch_attention import dense_attention_weights, masked_decode_reference, weighted_values
from zoomr_sglang.attention_backend.planning import HostPlan


def check_outputs(plan: HostPlan, layer_id: int, query: torch.Tensor, output: torch.Tensor, scaling: float,
                  kv_pool, req_to_token: torch.Tensor) -> None:
    """Compare ``output [bs, num_heads, v_head_dim]`` of layer ``layer_id`` with the references."""
    if not plan.self_check and not plan.fidelity_rows:
        return
    keys = kv_pool.get_key_buffer(layer_id)
    values = kv_pool.get_value_buffer(layer_id)
    for i in range(plan.batch_size) if plan.self_check else plan.fidelity_rows:
        state, seq_len = plan.states[i], plan.seq_lens[i]
        if state is None:  # its planning failed before it had a state (HostPlan.failed)
            continue
        slots = req_to_token[state.row, :seq_len].long()
        keep = torch.zeros(seq_len, dtype=torch.bool, device=keys.device)
        for start, end in plan.working_sets[i].tolist():
            keep[start:end] = True
        if plan.self_check:
            expected = masked_decode_reference(query[i], keys[slots], values[slots], keep, scaling)
            error = float((output[i].double() - expected).abs().max())
            state.stats.self_checks += 1
            state.stats.self_check_max_error = max(state.stats.self_check_max_error, error)
        if state.settings.fidelity:
            weights = dense_attention_weights(query[i], keys[slots], scaling)  # [num_heads, seq_len]
            dense = weighted_values(weights, values[slots])
            per_head = weights[:, keep].sum(dim=1)
            mass = float(per_head.mean())
            rel_error = float((output[i].double() - dense).norm() / dense.norm().clamp_min(1e-30))
            state.stats.add_fidelity(layer_id, mass, rel_error, float(per_head.min()))
