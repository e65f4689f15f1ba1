"""Unit tests for the pure-torch ``sgl_kernel`` CPU stand-in in ``cpu_shim/``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SHIM_INIT = Path(__file__).resolve().parents[1] / "cpu_shim" / "sgl_kernel" / "__init__.py"


@pytest.fixture(scope="module")
def shim():
    """Load the stand-in under a private name so the real module namespace stays untouched."""
    spec = importlib.util.spec_from_file_location("_zoomr_test_sgl_kernel_shim", _SHIM_INIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_assign_req_to_token_pool_matches_hand_computed(shim):
    req_to_token = torch.full((4, 8), -1, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0, 3], dtype=torch.int64)
    start = torch.tensor([1, 0, 5], dtype=torch.int64)
    end = torch.tensor([4, 2, 5], dtype=torch.int64)  # lengths 3, 2, 0
    out_cache_loc = torch.tensor([10, 11, 12, 20, 21], dtype=torch.int64)

    shim.assign_req_to_token_pool_cpu(
        req_pool_indices, req_to_token, start, end, out_cache_loc, req_to_token.shape[1]
    )

    expected = torch.full((4, 8), -1, dtype=torch.int32)
    expected[2, 1:4] = torch.tensor([10, 11, 12], dtype=torch.int32)
    expected[0, 0:2] = torch.tensor([20, 21], dtype=torch.int32)
    assert torch.equal(req_to_token, expected)


def test_copy_all_layer_kv_cache_on_real_tensors(shim):
    torch.manual_seed(0)
    # Two "layers" of K and V with different dtypes/row widths, as the pool hands them over.
    buffers = [
        torch.randn(16, 2, 8, dtype=torch.float32),
        torch.randn(16, 2, 8, dtype=torch.float32),
        torch.randn(16, 3, 4, dtype=torch.bfloat16),
        torch.randn(16, 3, 4, dtype=torch.bfloat16),
    ]
    before = [b.clone() for b in buffers]
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.dtype.itemsize for b in buffers])
    # Overlapping sets: 3 is both a source and a target, 5 <-> 7 swap.
    src = torch.tensor([3, 5, 7, 1], dtype=torch.int64)
    tgt = torch.tensor([9, 7, 5, 3], dtype=torch.int64)

    shim.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)

    for buf, old in zip(buffers, before):
        expected = old.clone()
        expected[tgt] = old[src]
        assert torch.equal(buf, expected)

    # The warm-up call SGLang makes (slot 0 onto itself) is a no-op.
    zero = torch.zeros(1, dtype=torch.int64)
    snapshot = [b.clone() for b in buffers]
    shim.copy_all_layer_kv_cache_cpu(data_ptrs, strides, zero, zero)
    assert all(torch.equal(b, s) for b, s in zip(buffers, snapshot))


def test_other_attributes_raise_not_implemented(shim):
    # Either the attribute lookup or the call must fail loudly.
    with pytest.raises(NotImplementedError, match="CPU stand-in"):
        shim.some_cuda_only_kernel()
    assert not hasattr(shim, "__wrapped__")  # dunders stay AttributeError
