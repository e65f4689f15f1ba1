"""Prefill over an inherited prefix with holes: every query attends causally to every earlier
position except the holes, checked against a float64 softmax written out by hand."""

from __future__ import annotations

import pytest
import torch

from zoomr_sglang.algo.torch_attention import extend_attention_around_holes


def _by_hand(query, keys, values, keep, prefix_len, scaling, group):
    outputs = []
    for i in range(query.shape[0]):
        visible = keep.clone()
        visible[prefix_len + i + 1:] = False
        k, v = keys[visible].double(), values[visible].double()
        heads = []
        for h in range(query.shape[1]):
            weights = torch.softmax(k[:, h // group] @ query[i, h].double() * scaling, dim=0)
            heads.append(weights @ v[:, h // group])
        outputs.append(torch.stack(heads))
    return torch.stack(outputs)


def test_extend_skips_holes_and_is_causal():
    torch.manual_seed(0)
    seq_len, prefix_len, heads, kv_heads, dim = 40, 30, 4, 2, 8
    k_cache, v_cache = torch.randn(64, kv_heads, dim), torch.randn(64, kv_heads, dim)
    row_slots = torch.randperm(63)[:seq_len] + 1
    holes = [(8, 16), (20, 24)]
    row_slots[8:16] = 0  # what a hole holds: the padding slot, never read
    row_slots[20:24] = 0
    k_cache[0] = 1e4  # a stray read of slot 0 would dominate every softmax
    query = torch.randn(seq_len - prefix_len, heads, dim)
    out = extend_attention_around_holes(query, k_cache, v_cache, row_slots, holes, prefix_len, 0.3)
    keep = torch.ones(seq_len, dtype=torch.bool)
    keep[8:16] = keep[20:24] = False
    expected = _by_hand(query, k_cache[row_slots], v_cache[row_slots], keep, prefix_len, 0.3, heads // kv_heads)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # Without holes it is plain causal attention over the row.
    row_slots = torch.randperm(63)[:seq_len] + 1
    out = extend_attention_around_holes(query, k_cache, v_cache, row_slots, [], prefix_len, 0.3)
    expected = _by_hand(query, k_cache[row_slots], v_cache[row_slots], torch.ones(seq_len, dtype=torch.bool),
                        prefix_len, 0.3, heads // kv_heads)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_extend_around_holes_on_cuda_matches_the_cpu():
    """What the FlashInfer backend runs for a batch with inherited holes; CPU twin above."""
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(128, 2, 64), torch.randn(128, 2, 64)
    row_slots = torch.randperm(127)[:96] + 1
    row_slots[16:48] = 0
    query = torch.randn(32, 8, 64)
    args = ([(16, 48)], 64, 0.125)
    cpu = extend_attention_around_holes(query, k_cache, v_cache, row_slots, *args)
    gpu = extend_attention_around_holes(query.cuda().half(), k_cache.cuda().half(), v_cache.cuda().half(),
                                        row_slots.cuda(), *args)
    assert torch.allclose(gpu.float().cpu(), cpu, atol=2e-2)
