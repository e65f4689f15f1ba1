"""The host tier on SGLang's real CPU pools and allocator: lossless, really frees device slots,
and every count comes back when the requests leave."""

from __future__ import annotations

import random

import torch

from backend_harness import Harness, scripted_tokens
from zoomr_sglang.attention_backend.admission import device_tokens_per_request
from zoomr_sglang.attention_backend.host_tier import GATHER_RUNS, HostKVTier, contiguous_runs
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


def _small_tier(capacity_tokens: int = 20, block_tokens: int = 4) -> HostKVTier:
    return HostKVTier(num_layers=3, num_kv_heads=2, head_dim=8, v_head_dim=8, dtype=torch.bfloat16,
                      capacity_tokens=capacity_tokens, pin_memory=False, block_tokens=block_tokens)


def test_allocator_hands_out_whole_blocks_and_frees_any_subset():
    host = _small_tier(capacity_tokens=22)  # 5 blocks of 4: the 2 leftover tokens are not used
    assert host.capacity == 20 and host.k.shape == (20, 3, 2, 8) and host.free_blocks == 5
    first = host.alloc(6)
    assert first.tolist() == list(range(6)) and host.num_used == 6 and host.free_blocks == 3  # blocks 0, 1
    assert host.alloc(13) is None and host.num_used == 6  # 4 blocks needed, 3 free
    second = host.alloc(12)
    assert second.tolist() == list(range(8, 20)) and host.alloc(1) is None  # full, though 2 slots are unused
    host.free(first[2:5])  # part of blocks 0 and 1: neither is free yet
    assert host.num_used == 15 and host.free_blocks == 0
    host.free(first[:2])  # block 0 is empty now
    assert host.num_used == 13 and host.free_blocks == 1 and host.alloc(4).tolist() == [0, 1, 2, 3]
    host.free(torch.tensor([0, 1, 2, 3]))
    for piece in (second[5:], first[5:], second[:2], second[2:5]):  # any order, any pieces
        host.free(piece)
    assert host.num_used == 0 and host.free_blocks == 5
    assert host.alloc(20).tolist() == list(range(20))  # consecutive again
    assert HostKVTier.bytes_per_token(3, 2, 8, 8, torch.bfloat16) == 3 * 2 * 16 * 2


def test_contiguous_runs_of_host_slots():
    from zoomr_sglang.attention_backend.host_tier import contiguous_runs

    assert contiguous_runs(torch.tensor([4, 5, 6, 12, 13, 2], dtype=torch.int64)) == [(4, 0, 3), (12, 3, 2), (2, 5, 1)]
    assert contiguous_runs(torch.arange(7, 9)) == [(7, 0, 2)]
    assert contiguous_runs(torch.zeros(0, dtype=torch.int64)) == []


def test_host_tier_store_and_load_round_trip_every_layer():
    """Slot-major layout (host.k[slot, layer] is that token's key of the layer), scattered device
    slots and host slots in several runs: store then load gives the same KV, bit for bit."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=8, layer_num=3,
                            device="cpu", enable_memory_saver=False)
    for layer in range(3):
        pool.get_key_buffer(layer).copy_(torch.randn_like(pool.get_key_buffer(layer), dtype=torch.float32))
        pool.get_value_buffer(layer).copy_(torch.randn_like(pool.get_value_buffer(layer), dtype=torch.float32))
    host = _small_tier()
    spacer, _ = host.alloc(4), host.alloc(6)
    host.free(spacer)  # block 0 is free again: the next thought takes blocks 0, 3 and 4 (two runs)
    source, target = torch.tensor([3, 9, 4, 20, 33, 7, 60, 12, 5]), torch.arange(40, 49)
    host_slots = host.alloc(9)
    assert host_slots.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16]
    assert host.store(pool, source, host_slots).done()  # CPU: done at once
    for layer in range(3):
        assert torch.equal(host.k[host_slots, layer], pool.get_key_buffer(layer)[source])
        assert torch.equal(host.v[host_slots, layer], pool.get_value_buffer(layer)[source])
    assert host.load(pool, host_slots, target).done()
    for layer in range(3):
        assert torch.equal(pool.get_key_buffer(layer)[target], pool.get_key_buffer(layer)[source])
        assert torch.equal(pool.get_value_buffer(layer)[target], pool.get_value_buffer(layer)[source])
    # Single positions (the fine levels' loads): more runs than GATHER_RUNS, gathered first.
    scattered, target = host_slots[[8, 0, 5, 2, 7, 1, 4, 6, 3, 8]], torch.arange(50, 60)
    assert len(contiguous_runs(scattered)) > GATHER_RUNS
    assert host.load(pool, scattered, target).done()
    for layer in range(3):
        assert torch.equal(pool.get_key_buffer(layer)[target], host.k[scattered, layer])
        assert torch.equal(pool.get_value_buffer(layer)[target], host.v[scattered, layer])


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
        assert tiered.controller.tiering.host.num_used == 0 and tiered.controller.tiering.rows == {}


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
    """Stands in for a CUDA event: the copy 'finishes' only after a few polls; counts the waits."""

    waits = 0

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def query(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def synchronize(self) -> None:
        _SlowEvent.waits += 1
        self.polls = -1


def _slow(copy, polls: int):
    """``HostKVTier.store`` or ``load`` whose data lands at once but whose 'event' lies for a few polls."""
    from zoomr_sglang.attention_backend.host_tier import Transfer

    def start(self, *args):
        copy(self, *args)
        return Transfer(_SlowEvent(polls))
    return start


def test_copies_that_finish_late_free_slots_late_and_stay_exact(monkeypatch):
    """The CUDA path's state machine on CPU: a copy out that is still running keeps the thought's
    slots allocated (not a hole), they are freed once it is done, and release drains it first."""
    dense_outputs, _, _ = _run(0, summaries=True)
    monkeypatch.setattr(HostKVTier, "store", _slow(HostKVTier.store, polls=30))
    tiered_outputs, tiered, _ = _run(4096, summaries=True)
    assert all(torch.equal(a, b) for a, b in zip(dense_outputs, tiered_outputs))
    tiering = tiered.controller.tiering
    assert tiering.counters.evicted_tokens > 300
    in_flight = [(row, copy) for row, tier in tiering.rows.items() for copy in tier.in_flight]
    assert in_flight, "the last steps' copies should still be running"
    for row, copy in in_flight:
        assert (copy.start, copy.end) not in tiering.holes(row)  # slots still owned, not a hole
        assert bool((tiered.req_to_token_pool.req_to_token[row, copy.start:copy.end] != 0).all())
    tiered.release_all()
    assert tiered.allocator.available_size() == tiered.pool_tokens
    assert tiering.host.num_used == 0 and tiering.rows == {}


def test_zoom_ins_that_finish_late_are_attended_only_once_done(monkeypatch):
    """The CUDA path's zoom-in on CPU: the copy in starts at the step that applies the vote; until
    its event reports done the thought stays a hole (row slots 0, listed in holes) and out of the
    working set (no step attends slot 0), then its slots enter the row. No decode step waits on an
    event: only the release path drains."""
    monkeypatch.setattr(HostKVTier, "store", _slow(HostKVTier.store, polls=5))
    monkeypatch.setattr(HostKVTier, "load", _slow(HostKVTier.load, polls=3))
    monkeypatch.setattr(_SlowEvent, "waits", 0)
    harness = Harness(CONFIG, host_tier_tokens=4096, seed=2)
    for n in (6, 30):
        harness.add_request(n)
    tiering = harness.controller.tiering
    rng = random.Random(9)
    scripts = [scripted_tokens(rng, 240, summaries=True) for _ in range(2)]
    loading_steps = 0
    for step in range(240):
        harness.decode_step([s[step] for s in scripts])
        assert not bool((harness.backend.kv_indices == 0).any())
        for state in harness.states.values():
            tier = tiering.rows[state.row]
            assert tier is state.tier  # the state reads the tier's record of its row directly
            for index in state.zoomed:  # a selected cold thought is on the device or on its way
                thought = tier.cold.get(index)
                assert thought is None or thought.on_device or index in tier.copying_in
            for index in tier.copying_in:
                thought = tier.cold[index]
                assert not thought.on_device and (thought.start, thought.end) in tiering.holes(state.row)
                assert bool((harness.req_to_token_pool.req_to_token[state.row, thought.start:thought.end] == 0).all())
                loading_steps += 1
    assert loading_steps > 0 and tiering.counters.zoomed_in_tokens > 0 and tiering.counters.evicted_tokens > 0
    assert _SlowEvent.waits == 0
    harness.release_all()
    assert harness.allocator.available_size() == harness.pool_tokens and tiering.host.num_used == 0
    assert tiering.rows == {}  # release is one pop per row


def test_host_slots_handed_to_the_tree_are_freed_in_pieces(monkeypatch):
    """The radix tree's paths: ``hand_to_tree`` passes each hole's part from a position on to the
    tree (a cut inside a block), a zoom-in under way is drained first (its thought is on the device,
    not handed), the row frees the rest at release, the tree frees its pieces split anywhere (as
    ``NodeNotes.split`` does): every block comes back."""
    harness = Harness(CONFIG, host_tier_tokens=4096, seed=2)
    harness.add_request(6)
    script = scripted_tokens(random.Random(9), 200, summaries=True)
    for step in range(200):
        harness.decode_step([script[step]])
    tiering, row = harness.controller.tiering, harness.rows[0]
    holes = tiering.holes(row)
    assert len(holes) >= 3
    monkeypatch.setattr(HostKVTier, "load", _slow(HostKVTier.load, polls=9))
    tier = tiering.rows[row]
    loading = next(i for i, t in tier.cold.items() if (t.start, t.end) == holes[-1])
    assert not tiering._zoom_in(tier, row, loading, tier.cold[loading]) and tier.copying_in
    cut = (holes[0][0] + holes[0][1]) // 2
    handed = tiering.hand_to_tree(row, cut)
    assert not tier.copying_in and tier.cold[loading].on_device
    assert sorted((start, end) for start, end, _ in handed) == [(cut, holes[0][1]), *holes[1:-1]]
    tree_tokens = sum(end - start for start, end, _ in handed)
    harness.release_all()
    host = tiering.host
    assert host.num_used == tree_tokens and harness.allocator.available_size() == harness.pool_tokens
    for _, _, slots in handed:
        third = len(slots) // 3
        host.free(slots[third:])
        host.free(slots[:third])
    assert host.num_used == 0 and host.free_blocks == host.capacity // host.block_tokens


def test_prepare_with_nothing_to_move_costs_almost_nothing():
    """A request with cold thoughts, none selected, no pending eviction and no copy under way:
    prepare reads its quiet record (the planner's host budget is 10 us per request and step)."""
    import time

    harness = Harness(CONFIG, host_tier_tokens=4096, seed=2)
    harness.add_request(6)
    rng = random.Random(9)
    script = scripted_tokens(rng, 200, summaries=True)
    for step in range(200):
        harness.decode_step([script[step]])
    tiering = harness.controller.tiering
    state = next(iter(harness.states.values()))
    assert state.tier.cold
    state.zoomed, state.pending_eviction = [], []
    tiering.prepare(state, 10_000, 10_000)
    assert not state.tier.in_flight and not state.tier.copying_in
    repeats = 20_000
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(repeats):
            tiering.prepare(state, 10_000, 10_000)
        best = min(best, (time.perf_counter() - begin) / repeats)
    assert state.tier.quiet is not None  # the repeats returned the row's quiet record
    assert best < 2e-6, f"prepare with nothing to move: {best * 1e6:.2f} us"


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
        tier = tiering.rows.get(no_copy_in)
        if tier is not None and any(bool(torch.isin(host_slots, t.host_slots).any()) for t in tier.cold.values()):
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
    assert tiering.rows[no_copy_out].offloaded == 0 and tiering.rows[healthy].offloaded > 0
    cold = tiering.rows[no_copy_in].cold
    assert cold and not any(t.on_device for t in cold.values())  # never back
    harness.release_all()
    assert harness.allocator.available_size() == harness.pool_tokens and tiering.host.num_used == 0


def test_tier_copy_benchmark_runs():
    """CPU twin of the benchmark's CUDA run (tests/test_host_tier_cuda.py): small shapes, one repeat."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tier_copy import measure_tier_copy

    result = measure_tier_copy("cpu", thought_tokens=40, repeats=1, num_layers=2, pool_tokens=128, host_tokens=256)
    assert result["tier_copy_gbps"] > 0 and result["bytes_per_move"] == 40 * 2 * 8 * 256 * 2
    assert result["host_runs_per_thought"] >= 1
