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

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer (the GPU check installs it)"),
]


@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_sparse_decode_and_its_log_sum_exp_match_the_reference(use_tensor_cores):
    import flashinfer

    from test_kernels import check_sparse_decode, sparse_decode_case

    case = sparse_decode_case(torch.bfloat16)
    k_cache, v_cache, _, kv_indptr, kv_indices, query = case
    num_heads, head_dim = query.shape[1:]
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=use_tensor_cores)
    wrapper.plan(kv_indptr, kv_indices, torch.ones(3, dtype=torch.int32, device="cuda"), num_heads, k_cache.shape[1],
                 head_dim, 1, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    scaling = head_dim ** -0.5
    out, lse = wrapper.forward_return_lse(query, (k_cache, v_cache), sm_scale=scaling)
    check_sparse_decode(case, out, lse * math.log(2.0), scaling, 2e-2)
