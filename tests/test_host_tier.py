"""The host tier on SGLang's real CPU pools and allocator: lossless, really frees device slots,
and every count comes back when the requests leave."""

from __future__ import annotations

import random

import torch

from backend_harness import Harness, scripted_tokens
from zoomr_sglang.attention_backend.admission import device_tokens_per_request
from zoomr_sglang.attention_backend.host_tier import HostKVTier
from zoomr_sglang.config import ZoomRConfig

# Count votes: the late-copy test needs evictions in the last steps of this script, which the
# paper's top-k votes give here (mass votes keep the last thoughts selected by chance).
CONFIG = ZoomRConfig(topk=2, num_thoughts=2, sink=4, window=8, max_thought_tokens=32, refresh_interval=16, zoom_cache=1,
                     vote="count")
STEPS = 300


def _run(host_tier_tokens: int, summaries: bool):
    """Decode three scripted requests; returns (outputs per step, harness, min free slots seen)."""
    harness = Harness(CONFIG, host_tier_tokens=host_tier_tokens, seed=11)
    for n in (5, 17, 40):
        harness.add_request(n)
    rng = random.Random(4)
    scripts = [scripted_tokens(rng, STEPS, summaries=summaries) for _ in range(3)]
    outputs, free_slots = [], []
    for step in range(STEPS):
        _, layers = harness.decode_step([s[step] for s in scripts])
        outputs.append(torch.stack([out for (_, _, _, out) in layers]))
        free_slots.append(harness.allocator.available_size())
    return outputs, harness, free_slots


def test_host_tier_store_and_load_round_trip_every_layer():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=3,
                            device="cpu", enable_memory_saver=False)
    for layer in range(3):
        pool.get_key_buffer(layer).copy_(torch.randn_like(pool.get_key_buffer(layer), dtype=torch.float32))
        pool.get_value_buffer(layer).copy_(torch.randn_like(pool.get_value_buffer(layer), dtype=torch.float32))
    host = HostKVTier(num_layers=3, num_kv_heads=2, head_dim=8, v_head_dim=8, dtype=torch.bfloat16,
                      capacity_tokens=10, pin_memory=False)
    source, target = torch.tensor([3, 9, 4, 20]), torch.tensor([40, 41, 50, 51])
    host_slots = host.alloc(4)
    assert host.num_used == 4 and host.alloc(7) is None  # full: 6 left
    host.store(pool, source, host_slots)
    host.load(pool, host_slots, target)
    for layer in range(3):
        assert torch.equal(pool.get_key_buffer(layer)[target], pool.get_key_buffer(layer)[source])
        assert torch.equal(pool.get_value_buffer(layer)[target], pool.get_value_buffer(layer)[source])
    host.free(host_slots)
    assert host.num_used == 0 and host.alloc(10) is not None
    assert HostKVTier.bytes_per_token(3, 2, 8, 8, torch.bfloat16) == 3 * 2 * 16 * 2


def test_offloading_is_lossless_frees_device_slots_and_returns_every_count():
    for summaries in (False, True):
        dense_outputs, dense, dense_free = _run(0, summaries)
        tiered_outputs, tiered, tiered_free = _run(4096, summaries)
        for step, (a, b) in enumerate(zip(dense_outputs, tiered_outputs)):
            assert torch.equal(a, b), f"step {step} differs with the host tier on"
        counters = tiered.controller.tiering.counters
        assert counters.evicted_tokens > 300 and counters.zoomed_in_tokens > 0 and counters.dropped_tokens > 0
        assert counters.zoom_in_failures == 0 and counters.host_full == 0
        # The saving is real: at the end SGLang's pool holds less than half as many slots.
        pool = tiered.pool_tokens
        assert pool - tiered_free[-1] < 0.5 * (pool - dense_free[-1])
        # What admission assumes: a request's device-resident output stays within the per-request
        # bound plus its summaries.
        for state in tiered.states.values():
            resident_output = state.stats.resident_max - state.prompt_len
            assert resident_output <= device_tokens_per_request(tiered.config) + state.summary_tokens
            assert state.stats.over_bound_steps == 0
        for harness in (dense, tiered):
            harness.release_all()
            assert harness.allocator.available_size() == harness.pool_tokens
            assert harness.controller.index_keys.num_live == 0
        assert tiered.controller.tiering.host.num_used == 0 and tiered.controller.tiering.cold == {}


def test_full_host_tier_keeps_thoughts_resident_and_stays_exact():
    dense_outputs, _, _ = _run(0, summaries=False)
    tiered_outputs, tiered, _ = _run(40, summaries=False)
    assert all(torch.equal(a, b) for a, b in zip(dense_outputs, tiered_outputs))
    counters = tiered.controller.tiering.counters
    assert counters.host_full > 0 and counters.evicted_tokens <= 40
    tiered.release_all()
    assert tiered.allocator.available_size() == tiered.pool_tokens
    assert tiered.controller.tiering.host.num_used == 0


def test_holes_are_never_attended():
    """Every slot in a step's KV list is a live slot: never SGLang's padding slot 0."""
    harness = Harness(CONFIG, host_tier_tokens=4096, seed=2)
    for n in (6, 30):
        harness.add_request(n)
    rng = random.Random(9)
    scripts = [scripted_tokens(rng, 200, summaries=True) for _ in range(2)]
    for step in range(200):
        harness.decode_step([s[step] for s in scripts])
        assert not bool((harness.backend.kv_indices == 0).any())
    assert harness.controller.tiering.counters.evicted_tokens > 0


class _SlowEvent:
    """Stands in for a CUDA event: the copy 'finishes' only after a few polls."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def synchronize(self) -> None:
        self.polls = -1


def test_copies_that_finish_late_free_slots_late_and_stay_exact(monkeypatch):
    """The CUDA path's state machine on CPU: a copy out that is still running keeps the thought's
    slots allocated (not a hole), they are freed once it is done, and release drains it first."""
    from zoomr_sglang.attention_backend.host_tier import Transfer

    original_store = HostKVTier.store
    def slow_store(self, kv_pool, device_slots, host_slots):
        original_store(self, kv_pool, device_slots, host_slots)  # the data lands now; the 'event' lies
        return Transfer(_SlowEvent(polls=30), lambda: None)

    dense_outputs, _, _ = _run(0, summaries=True)
    monkeypatch.setattr(HostKVTier, "store", slow_store)
    tiered_outputs, tiered, _ = _run(4096, summaries=True)
    assert all(torch.equal(a, b) for a, b in zip(dense_outputs, tiered_outputs))
    tiering = tiered.controller.tiering
    assert tiering.counters.evicted_tokens > 300
    in_flight = [copy for copies in tiering.in_flight.values() for copy in copies]
    assert in_flight, "the last steps' copies should still be running"
    for copy in in_flight:
        row = next(r for r, copies in tiering.in_flight.items() if copy in copies)
        assert (copy.start, copy.end) not in tiering.holes(row)  # slots still owned, not a hole
        assert bool((tiered.req_to_token_pool.req_to_token[row, copy.start:copy.end] != 0).all())
    tiered.release_all()
    assert tiered.allocator.available_size() == tiered.pool_tokens
    assert tiering.host.num_used == 0 and tiering.in_flight == {}


def test_a_failing_copy_degrades_only_its_request(monkeypatch):
    """Copies out of one request and copies in of another raise: the first keeps its KV on the
    device (its outputs stay exact), the second's thoughts stay off the device, the third is tiered
    and exact as usual, and every count comes back."""
    dense_outputs, _, _ = _run(0, summaries=True)
    harness = Harness(CONFIG, host_tier_tokens=4096, seed=11)
    for n in (5, 17, 40):
        harness.add_request(n)
    no_copy_out, no_copy_in, healthy = harness.rows
    tiering = harness.controller.tiering
    original_store, original_load = HostKVTier.store, HostKVTier.load

    def store(self, kv_pool, device_slots, host_slots):
        if bool(torch.isin(device_slots, harness.req_to_token_pool.req_to_token[no_copy_out]).any()):
            raise RuntimeError("copy out failed")
        return original_store(self, kv_pool, device_slots, host_slots)

    def load(self, kv_pool, host_slots, device_slots):
        if any(bool(torch.isin(host_slots, t.host_slots).any()) for t in tiering.cold.get(no_copy_in, {}).values()):
            raise RuntimeError("copy in failed")
        return original_load(self, kv_pool, host_slots, device_slots)

    monkeypatch.setattr(HostKVTier, "store", store)
    monkeypatch.setattr(HostKVTier, "load", load)
    rng = random.Random(4)
    scripts = [scripted_tokens(rng, STEPS, summaries=True) for _ in range(3)]
    outputs = []
    for step in range(STEPS):
        _, layers = harness.decode_step([s[step] for s in scripts])
        outputs.append(torch.stack([out for (_, _, _, out) in layers]))
    for batch_index in (0, 2):  # the request that kept its KV and the healthy one
        assert all(torch.equal(a[:, batch_index], b[:, batch_index]) for a, b in zip(dense_outputs, outputs))
    assert tiering.counters.copy_failures > 0
    assert tiering.offloaded_tokens(no_copy_out) == 0 and tiering.offloaded_tokens(healthy) > 0
    assert tiering.cold[no_copy_in] and not any(t.on_device for t in tiering.cold[no_copy_in].values())  # never back
    harness.release_all()
    assert harness.allocator.available_size() == harness.pool_tokens and tiering.host.num_used == 0
