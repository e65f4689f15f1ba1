"""What the CUDA backend assumes of FlashInfer's paged decode (0.7.2), checked on a GPU before any
server runs: a sparse KV-slot list from ``ranges_to_kv_indices`` is attended exactly as the dense
masked reference says, and the log-sum-exp FlashInfer returns is in base 2 (the backend multiplies
it by ln 2 for the mass votes). The CPU twin is
``test_backend_cpu.py::test_gather_decode_attention_returns_the_softmax_denominators``."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from zoomr_sglang.algo.reference import masked_decode_reference
from zoomr_sglang.kernels.kv_indices import flatten_ranges, ranges_to_kv_indices

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer (the GPU check installs it)"),
]


@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_sparse_decode_and_its_log_sum_exp_match_the_reference(use_tensor_cores):
    import flashinfer

    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, num_slots = 32, 8, 128, 20_000
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16).cuda()
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16).cuda()
    seq_lens = [1, 777, 5000]
    table = torch.zeros(3, 8192, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        table[i, :n] = (torch.randperm(num_slots - 1, generator=gen)[:n] + 1).to(torch.int32)
    table = table.cuda()
    ranges = [[(0, 1)], [(0, 4), (100, 240), (700, 777)], [(0, 64), (1000, 1800), (4872, 5000)]]
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges([0, 1, 2], ranges)
    kv_indices = ranges_to_kv_indices(table, range_rows.cuda(), range_starts.cuda(), range_lens.cuda(),
                                      out_offsets.cuda(), int(kv_indptr[-1]))
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=use_tensor_cores)
    wrapper.plan(kv_indptr, kv_indices, torch.ones(3, dtype=torch.int32, device="cuda"), num_heads, num_kv_heads,
                 head_dim, 1, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    query = torch.randn(3, num_heads, head_dim, generator=gen).to(torch.bfloat16).cuda()
    scaling = head_dim ** -0.5
    out, lse = wrapper.forward_return_lse(query, (k_cache, v_cache), sm_scale=scaling)
    for i, n in enumerate(seq_lens):
        slots = table[i, :n].long()
        keep = torch.zeros(n, dtype=torch.bool, device="cuda")
        for start, end in ranges[i]:
            keep[start:end] = True
        expected = masked_decode_reference(query[i], k_cache[slots], v_cache[slots], keep, scaling)
        torch.testing.assert_close(out[i].double(), expected, rtol=2e-2, atol=2e-2)
        kept = k_cache[slots][keep].double().repeat_interleave(num_heads // num_kv_heads, dim=1)
        natural = torch.logsumexp(torch.einsum("hd,nhd->hn", query[i].double(), kept) * scaling, dim=1)
        torch.testing.assert_close(lse[i].double() * math.log(2.0), natural, rtol=1e-2, atol=2e-2)
