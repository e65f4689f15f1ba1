"""CUDA twins of the host tier's copies (CPU twins: tests/test_host_tier.py,
``test_host_tier_store_and_load_round_trip_every_layer``, ``test_zoom_ins_that_finish_late_...``
and ``test_tier_copy_benchmark_runs``); imports no SGLang, so benchmarks/gpu_check.sh runs it on
the lent GPU machine."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zoomr_sglang.attention_backend.host_tier import GATHER_RUNS, HostKVTier, contiguous_runs

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
BUSY_CYCLES = 200_000_000  # ~0.1 s of a spinning kernel: the 'forward' the copies must wait for


def _pool(num_layers: int = 4, slots: int = 256):
    keys = [torch.randn(slots, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(num_layers)]
    values = [torch.randn(slots, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(num_layers)]
    return SimpleNamespace(get_key_buffer=keys.__getitem__, get_value_buffer=values.__getitem__), keys, values


def _issue_without_sync(copy):
    """Issue a copy behind a busy forward stream: it must not sync, and it is not done yet."""
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    torch.cuda.set_sync_debug_mode("error")
    try:
        transfer = copy()
        assert not transfer.done(), "the copy must wait for the forward stream"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return transfer


@pytest.mark.cuda
@needs_gpu
def test_host_tier_async_copies_on_cuda():
    """Copy out and in on the side stream, ordered after the forward stream, issued without a host
    sync; host slots in two runs of the pinned slot-major tier; the data is exact in bf16."""
    pool, keys, values = _pool()
    host = HostKVTier(num_layers=4, num_kv_heads=8, head_dim=128, v_head_dim=128, dtype=torch.bfloat16,
                      capacity_tokens=512, pin_memory=True, block_tokens=32)
    assert host.k.is_pinned() and host.v.is_pinned()
    spacer, _ = host.alloc(32), host.alloc(32)
    host.free(spacer)
    host_slots = host.alloc(64)  # blocks 0 and 2: two runs
    assert len(contiguous_runs(host_slots)) == 2
    order = torch.randperm(256, device="cuda")
    source, target = order[:64], order[64:128]
    expected = [(keys[layer][source].cpu(), values[layer][source].cpu()) for layer in range(4)]
    host.store(pool, source, host_slots).wait()  # warm-up: the side stream exists

    transfer = _issue_without_sync(lambda: host.store(pool, source, host_slots))
    transfer.wait()
    assert transfer.done()
    for layer, (key, value) in enumerate(expected):
        assert torch.equal(host.k[host_slots, layer], key) and torch.equal(host.v[host_slots, layer], value)

    transfer = _issue_without_sync(lambda: host.load(pool, host_slots, target))
    transfer.wait()
    for layer in range(4):
        assert torch.equal(keys[layer][target], keys[layer][source])
        assert torch.equal(values[layer][target], values[layer][source])

    # Single positions (the fine levels' loads): gathered on the host, one copy, still no sync.
    picks = torch.tensor([50, 3, 17, 8, 40, 1, 33, 60, 12, 25])
    scattered, target = host_slots[picks], order[128:138]
    assert len(contiguous_runs(scattered)) > GATHER_RUNS
    transfer = _issue_without_sync(lambda: host.load(pool, scattered, target))
    transfer.wait()
    for layer in range(4):
        assert torch.equal(keys[layer][target], keys[layer][source[picks.cuda()]])
        assert torch.equal(values[layer][target], values[layer][source[picks.cuda()]])


@pytest.mark.cuda
@needs_gpu
def test_tier_copy_benchmark_runs_on_cuda():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tier_copy import measure_tier_copy

    result = measure_tier_copy("cuda", thought_tokens=64, repeats=2, num_layers=4, pool_tokens=256, host_tokens=512)
    assert result["tier_copy_gbps"] > 0 and result["issue_us"] > 0
