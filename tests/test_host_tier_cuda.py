"""CUDA twin of the host tier's round trip (CPU twin: tests/test_host_tier.py); imports no SGLang, so
benchmarks/gpu_check.sh runs it on the lent GPU machine."""

import pytest
import torch

from zoomr_sglang.attention_backend.host_tier import HostKVTier


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_host_tier_async_copies_on_cuda():
    """The CUDA twin of the round trip: copy out on the side stream into pinned staging, copy in on
    the current stream; the transfer reports done and the data is exact in bf16."""
    from types import SimpleNamespace

    keys = [torch.randn(256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    values = [torch.randn(256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    pool = SimpleNamespace(get_key_buffer=lambda layer: keys[layer], get_value_buffer=lambda layer: values[layer])
    host = HostKVTier(num_layers=4, num_kv_heads=8, head_dim=128, v_head_dim=128, dtype=torch.bfloat16,
                      capacity_tokens=512, pin_memory=True)
    source = torch.arange(10, 74, device="cuda")
    target = torch.arange(100, 164, device="cuda")
    host_slots = host.alloc(64)
    transfer = host.store(pool, source, host_slots)
    transfer.wait()
    assert transfer.done()
    host.load(pool, host_slots, target)
    torch.cuda.synchronize()
    for layer in range(4):
        assert torch.equal(keys[layer][target], keys[layer][source])
        assert torch.equal(values[layer][target], values[layer][source])
