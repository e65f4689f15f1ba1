"""IndexKeyStore: incremental means equal from-scratch means; entry lifecycle at a fixed capacity."""

import pytest
import torch

from zoomr_sglang.algo.index_keys import IndexKeyStore

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 3, 2, 4


def make(capacity: int = 8) -> IndexKeyStore:
    return IndexKeyStore(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, "cpu", capacity=capacity)


def test_incremental_means_equal_from_scratch_means():
    gen = torch.Generator().manual_seed(0)
    store = make(capacity=5)
    entries = [store.alloc() for _ in range(5)]
    # Each (layer, entry) gets its own number of keys, including an entry left empty in layer 0.
    keys = {
        (layer, e): torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.float16)
        for layer in range(NUM_LAYERS)
        for e, n in zip(entries, (7, 1, 12, 3, 0 if layer == 0 else 5))
    }
    for layer in range(NUM_LAYERS):
        rows = [(e, k) for e in entries for k in keys[(layer, e)]]
        order = torch.randperm(len(rows), generator=gen).tolist()
        cursor = 0
        while cursor < len(order):  # random chunks that mix entries and repeat them
            size = int(torch.randint(1, 6, (1,), generator=gen))
            chunk = [rows[i] for i in order[cursor : cursor + size]]
            store.add(layer, torch.tensor([e for e, _ in chunk]), torch.stack([k for _, k in chunk]))
            cursor += size

    ids = torch.tensor(entries)
    expected = torch.stack([
        torch.stack([
            keys[(layer, e)].float().mean(0) if len(keys[(layer, e)]) else torch.zeros(NUM_KV_HEADS, HEAD_DIM)
            for e in entries
        ])
        for layer in range(NUM_LAYERS)
    ])
    for layer in range(NUM_LAYERS):
        got = store.means(layer, ids)
        assert got.dtype == torch.float32 and got.shape == (5, NUM_KV_HEADS, HEAD_DIM)
        assert torch.allclose(got, expected[layer], rtol=1e-5, atol=1e-6)
    assert torch.equal(store.means(0, ids[4:]), torch.zeros(1, NUM_KV_HEADS, HEAD_DIM))


def test_full_store_refuses_then_serves_again_and_scratch_is_never_handed_out():
    store = make(capacity=2)
    a, b = store.alloc(), store.alloc()
    assert store.alloc() is None and store.exhausted == 1 and store.num_live == 2
    assert store.scratch == 2 and store.sums.shape[1] == 3  # the padding entry lies past the capacity
    # Padded commits land in the scratch entry and change no live entry.
    store.add(0, torch.tensor([a, store.scratch, store.scratch]), torch.ones(3, NUM_KV_HEADS, HEAD_DIM))
    assert store.counts[0, a] == 1 and store.counts[0, b] == 0
    store.free([b])
    assert store.alloc() == b and store.exhausted == 1


def test_free_then_realloc_starts_at_zero_and_num_live_returns():
    store = make(capacity=4)
    start_live = store.num_live
    entries = [store.alloc() for _ in range(3)]
    assert store.num_live == start_live + 3
    for layer in range(NUM_LAYERS):
        store.add(layer, torch.tensor(entries), torch.ones(3, NUM_KV_HEADS, HEAD_DIM))
    store.free(entries[1:])
    assert store.num_live == start_live + 1
    again = [store.alloc(), store.alloc()]
    assert sorted(again) == sorted(entries[1:])  # the freed ids are reused
    ids = torch.tensor(again)
    assert torch.equal(store.counts[:, ids], torch.ones(NUM_LAYERS, 2))  # values stay until zeroed ...
    store.zero(ids)  # ... which the engine does on the device at the start of the step that uses them
    assert torch.equal(store.sums[:, ids], torch.zeros(NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM))
    assert torch.equal(store.counts[:, ids], torch.zeros(NUM_LAYERS, 2))
    # The entry that stayed live is untouched.
    assert torch.equal(store.means(2, torch.tensor(entries[:1])), torch.ones(1, NUM_KV_HEADS, HEAD_DIM))
    store.free(again + entries[:1])
    assert store.num_live == start_live


def test_bad_free_raises_and_changes_nothing():
    store = make(capacity=4)
    a = store.alloc()
    store.add(0, torch.tensor([a]), torch.ones(1, NUM_KV_HEADS, HEAD_DIM))
    with pytest.raises(ValueError, match="entries"):
        store.free([3])  # never allocated
    with pytest.raises(ValueError, match="entries"):
        store.free([a, a])
    with pytest.raises(ValueError, match="entries"):
        store.free([a, 3])  # a valid id next to a bad one is not freed either
    assert store.num_live == 1
    assert torch.equal(store.means(0, torch.tensor([a])), torch.ones(1, NUM_KV_HEADS, HEAD_DIM))
    store.free([a])
    with pytest.raises(ValueError, match="entries"):
        store.free([a])  # double free


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        IndexKeyStore(1, 0, 4, "cpu", capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        IndexKeyStore(1, 1, 4, "cpu", capacity=0)
    store = make()
    a = store.alloc()
    with pytest.raises(ValueError, match="layer"):
        store.add(NUM_LAYERS, torch.tensor([a]), torch.ones(1, NUM_KV_HEADS, HEAD_DIM))
    with pytest.raises(ValueError, match="keys"):
        store.add(0, torch.tensor([a]), torch.ones(1, NUM_KV_HEADS, HEAD_DIM + 1))
