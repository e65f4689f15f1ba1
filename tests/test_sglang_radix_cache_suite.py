"""SGLang's own ``RadixCache`` unit tests, run on SGLang's class and on ``ZoomRRadixCache`` alike.

Source: the ``TestRadixCache`` cases of ``test/registered/unit/mem_cache/test_radix_cache_unit.py``
(Apache-2.0, SGLang Team), read at amdpilot-org/sglang@4d68007d1345b03fd894dcc23e56f3f2bc687f8f, a
fork of sgl-project/sglang: the stored version nearest 0.5.23's API (``array("q")`` keys,
``cache_salt``, ``KVCacheEventRecorder``; sgl-project/sglang's own stored copies, de14e71f and
0102aa39, predate those). Each case keeps its name, inputs and assertions; adapted only where
0.5.23's API differs, the same for both classes:

- ``RadixCache.create_simulated`` always builds a ``RadixCache``: :func:`simulated` builds the same
  ``CacheInitParams`` for either class.
- 0.5.23's ``MatchResult`` carries no ``device_indices``: read ``path_device_indices(last_device_node)``.
- 0.5.23 checkpoints a running request with ``checkpoint(req, up_to=...)`` (was ``cache_unfinished_req``).
- 0.5.23's ``BlockStored`` carries ``cache_salt`` itself (was ``metadata.cache_salt``).

Not ported: ``test_memory_allocated`` (10,000 sequences of 10,100 tokens measured in device memory:
minutes on a CPU, and no tree subclass is involved), and the ``RadixKey``/``TreeNode``/event-queue
classes of the file, which never construct a cache. Issue 23 item 1: no case may pass on SGLang's
class and fail on zoomr's.
"""

from __future__ import annotations

import unittest.mock
from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.disaggregation.kv_events import BlockRemoved, BlockStored
from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from zoomr_sglang.radix_ext.tree import ZoomRRadixCache


@pytest.fixture(params=[RadixCache, ZoomRRadixCache], ids=["sglang", "zoomr"])
def cache_cls(request):
    TreeNode.counter = 0
    return request.param


def simulated(cls, *, disable=False, mock_allocator=None, page_size=1, enable_kv_cache_events=False):
    """``RadixCache.create_simulated`` for ``cls``."""
    return cls(CacheInitParams(disable=disable, req_to_token_pool=None, token_to_kv_pool_allocator=mock_allocator,
                               page_size=page_size, enable_kv_cache_events=enable_kv_cache_events))


def key(tokens, *args, **kwargs) -> RadixKey:
    return RadixKey(array("q", tokens), *args, **kwargs)


def ids(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def matched(cache, radix_key) -> torch.Tensor:
    """The device indices of a match (0.5.23: on the path to its last node)."""
    return cache.path_device_indices(cache.match_prefix(MatchPrefixParams(key=radix_key)).last_device_node)


def cpu_mock_allocator():
    allocator = unittest.mock.Mock()
    allocator.device = torch.device("cpu")
    return allocator


class RowPool:
    """A one-row ``req_to_token_pool``."""

    def __init__(self, row):
        self.req_to_token = row.unsqueeze(0)

    def write(self, indices, values):
        self.req_to_token[indices] = values


@pytest.mark.parametrize("page_size,disable,enable_events", [(1, False, False), (4, False, True), (1, True, False)])
def test_init_variations(cache_cls, page_size, disable, enable_events):
    cache = simulated(cache_cls, disable=disable, page_size=page_size, enable_kv_cache_events=enable_events)
    assert (cache.page_size, cache.disable, cache.kv_events.enabled) == (page_size, disable, enable_events)
    assert cache.device == torch.device("cpu") and cache.root_node is not None and len(cache.root_node.key) == 0


def test_reset(cache_cls):
    cache = simulated(cache_cls)
    cache.insert(InsertParams(key=key([1, 2, 3]), value=ids(10, 20, 30)))
    assert cache.total_size() > 0
    cache.reset()
    assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)


@pytest.mark.parametrize("disable_cache", [False, True])
def test_insert_and_match_basic(cache_cls, disable_cache):
    cache = simulated(cache_cls, disable=disable_cache)
    value = ids(10, 20, 30)
    assert cache.insert(InsertParams(key=key([1, 2, 3]), value=value)).prefix_len == 0
    if disable_cache:
        assert cache.total_size() == 0
        return
    assert cache.total_size() == 3 and cache.evictable_size() == 3
    torch.testing.assert_close(matched(cache, key([1, 2, 3])), value)
    torch.testing.assert_close(matched(cache, key([1, 2])), ids(10, 20))


def test_insert_with_none_value(cache_cls):
    cache = simulated(cache_cls)
    assert cache.insert(InsertParams(key=key([1, 2, 3]), value=None)).prefix_len == 0
    assert cache.total_size() == 3


def test_total_size(cache_cls):
    cache = simulated(cache_cls)
    assert cache.total_size() == 0
    cache.insert(InsertParams(key=key([1, 2, 3]), value=ids(10, 20, 30)))
    assert cache.total_size() == 3
    cache.insert(InsertParams(key=key([4, 5]), value=ids(40, 50)))
    assert cache.total_size() == 5


def test_cache_unfinished_req_deferred_free_owns_original_indices(cache_cls):
    allocator = TokenToKVPoolAllocator(size=16, dtype=torch.float16, device="cpu", kvcache=None, need_sort=False)
    cache = simulated(cache_cls, mock_allocator=allocator)
    token_ids = array("q", [1, 2, 3])
    tree_indices, request_indices = allocator.alloc(3), allocator.alloc(3)
    cache.insert(InsertParams(key=key(token_ids), value=tree_indices))
    cache.req_to_token_pool = RowPool(request_indices.clone())
    req = SimpleNamespace(kv=ReqKvInfo(req_pool_idx=0, cache_protected_len=0), extra_key=None, cache_salt=None,
                          priority=0, last_node=cache.root_node, lock=None, full_untruncated_fill_ids=token_ids,
                          origin_input_ids=token_ids, finished=lambda: False)
    available_before_free = allocator.available_size()
    allocator.free_group_begin()
    cache.checkpoint(req, up_to=len(token_ids))
    allocator.free_group_end()
    assert allocator.available_size() == available_before_free + request_indices.numel()
    torch.testing.assert_close(allocator.free_pages[-3:], request_indices)
    torch.testing.assert_close(cache.req_to_token_pool.req_to_token[0], tree_indices)


def test_cache_unfinished_req_deferred_paged_free_owns_original_indices(cache_cls):
    """A deferred page free must not keep a view of the request row that is then overwritten."""
    page_size = 64
    allocator = PagedTokenToKVPoolAllocator(size=page_size * 8, page_size=page_size, dtype=torch.float16,
                                            device="cpu", kvcache=None, need_sort=False)
    cache = simulated(cache_cls, page_size=page_size, mock_allocator=allocator)
    token_ids = array("q", range(page_size))
    tree_indices, request_indices = allocator.alloc(page_size), allocator.alloc(page_size)
    cache.insert(InsertParams(key=key(token_ids), value=tree_indices))
    cache.req_to_token_pool = RowPool(request_indices.clone())
    free_pages_before = allocator.free_pages.clone()
    allocator.free_group_begin()
    cache.insert(InsertParams(key=key(token_ids), value=request_indices))
    allocator.free(cache.req_to_token_pool.req_to_token[0])
    match = matched(cache, key(token_ids))
    cache.req_to_token_pool.write((0, slice(None)), match)
    allocator.free_group_end()
    assert torch.any(allocator.free_pages == request_indices[0] // page_size)
    assert not torch.any(allocator.free_pages == tree_indices[0] // page_size)
    assert allocator.available_size() == (free_pages_before.numel() + 1) * page_size
    torch.testing.assert_close(cache.req_to_token_pool.req_to_token[0], tree_indices)
    torch.testing.assert_close(match, tree_indices)


@pytest.mark.parametrize("page_size,enable_events", [(1, True), (2, True), (1, False)])
def test_kv_cache_events(cache_cls, page_size, enable_events):
    cache = simulated(cache_cls, page_size=page_size, enable_kv_cache_events=enable_events)
    cache.insert(InsertParams(key=key([1, 2, 3, 4, 5]), value=None))
    events = cache.take_events()
    if not enable_events:
        assert events == []
        return
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored
    for event in stored:
        assert event.block_size <= page_size and len(event.token_ids) == event.block_size * len(event.block_hashes)


def test_kv_cache_events_with_eviction(cache_cls):
    cache = simulated(cache_cls, mock_allocator=cpu_mock_allocator(), page_size=2, enable_kv_cache_events=True)
    seq = [1, 2, 3, 4]
    cache.insert(InsertParams(key=key(seq), value=ids(10, 20, 30, 40)))
    result = cache.evict(EvictParams(num_tokens=len(seq)))
    assert isinstance(result, EvictResult) and result.num_tokens_evicted >= len(seq)
    events = cache.take_events()
    assert "BlockStored" in [type(e).__name__ for e in events]
    stored_hashes = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored_hashes) == 2
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert len(removed) == 1 and removed[0].block_hashes == stored_hashes


def test_extra_key_isolation(cache_cls):
    cache = simulated(cache_cls)
    for extra_key, value in (("key1", ids(10, 20, 30)), ("key2", ids(40, 50, 60)), (None, ids(70, 80, 90))):
        cache.insert(InsertParams(key=key([1, 2, 3], extra_key), value=value))
    torch.testing.assert_close(matched(cache, key([1, 2, 3], "key1")), ids(10, 20, 30))
    torch.testing.assert_close(matched(cache, key([1, 2, 3], "key2")), ids(40, 50, 60))
    torch.testing.assert_close(matched(cache, key([1, 2, 3], None)), ids(70, 80, 90))
    assert len(matched(cache, key([1, 2, 3], "nonexistent"))) == 0


def test_cache_salt_isolation_is_independent_of_extra_key(cache_cls):
    cache = simulated(cache_cls)
    cache.insert(InsertParams(key=key([1, 2, 3], extra_key="bc", cache_salt="a"), value=ids(10, 20, 30)))
    cache.insert(InsertParams(key=key([1, 2, 3], extra_key="c", cache_salt="ab"), value=ids(40, 50, 60)))
    torch.testing.assert_close(matched(cache, key([1, 2, 3], extra_key="bc", cache_salt="a")), ids(10, 20, 30))
    torch.testing.assert_close(matched(cache, key([1, 2, 3], extra_key="c", cache_salt="ab")), ids(40, 50, 60))


def test_cache_salt_is_included_in_store_and_remove_events(cache_cls):
    cache = simulated(cache_cls, mock_allocator=cpu_mock_allocator(), page_size=2, enable_kv_cache_events=True)
    tokens = [1, 2, 3, 4]
    cache.insert(InsertParams(key=key(tokens, cache_salt="tenant-a"), value=ids(10, 20, 30, 40)))
    cache.evict(EvictParams(num_tokens=len(tokens)))
    events = cache.take_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert len(stored) == 1 and stored[0].cache_salt == "tenant-a"
    assert stored[0].parent_block_hash is None and len(stored[0].block_hashes) == 2
    assert removed[0].block_hashes == stored[0].block_hashes
    unsalted = simulated(cache_cls, page_size=2, enable_kv_cache_events=True)
    unsalted.insert(InsertParams(key=key(tokens), value=None))
    unsalted_hashes = [h for e in unsalted.take_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert unsalted_hashes != stored[0].block_hashes


def test_cache_salt_event_hashes_are_preserved_across_node_split(cache_cls):
    cache = simulated(cache_cls, page_size=2, enable_kv_cache_events=True)
    original = key([1, 2, 3, 4], cache_salt="tenant-a")
    cache.insert(InsertParams(key=original, value=ids(10, 20, 30, 40)))
    original_hashes = list(cache.match_prefix(MatchPrefixParams(key=original)).last_device_node.event_hash_value)
    cache.insert(InsertParams(key=key([1, 2, 9, 10], cache_salt="tenant-a"), value=ids(10, 20, 90, 100)))
    split_child = cache.match_prefix(MatchPrefixParams(key=original)).last_device_node
    assert split_child.parent.event_hash_value + split_child.event_hash_value == original_hashes


def test_lock_ref_operations(cache_cls):
    cache = simulated(cache_cls)
    cache.insert(InsertParams(key=key([1, 2, 3]), value=ids(10, 20, 30)))
    node = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).last_device_node
    evictable, protected = cache.evictable_size(), cache.protected_size()
    cache.inc_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (protected + 3, evictable - 3)
    cache.dec_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (protected, evictable)


def test_evict_functionality(cache_cls):
    mock_allocator = cpu_mock_allocator()
    cache = simulated(cache_cls, mock_allocator=mock_allocator)
    cache.insert(InsertParams(key=key([1, 2]), value=ids(10, 20)))
    cache.insert(InsertParams(key=key([3, 4]), value=ids(30, 40)))
    initial_size = cache.total_size()
    result = cache.evict(EvictParams(num_tokens=2))
    assert isinstance(result, EvictResult) and result.num_tokens_evicted >= 2
    mock_allocator.free_segment.assert_called()
    assert cache.total_size() < initial_size


@pytest.mark.parametrize("page_size,sequence_length", [(1, 5), (2, 5), (4, 6)])
def test_page_alignment_boundary(cache_cls, page_size, sequence_length):
    cache = simulated(cache_cls, page_size=page_size)
    tokens = list(range(sequence_length))
    radix_key = key(tokens)
    cache.insert(InsertParams(key=radix_key, value=torch.tensor(tokens, dtype=torch.int64)[: len(radix_key)]))
    match_len = len(matched(cache, key(tokens)))
    assert match_len > 0 and match_len % page_size == 0


@pytest.mark.parametrize("page_size", [1, 2])
def test_advanced_prefix_match_with_node_splits(cache_cls, page_size):
    cache = simulated(cache_cls, page_size=page_size)
    seq1, seq2 = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 9, 10]
    val1, val2 = ids(*(x * 10 for x in seq1)), ids(*(x * 10 for x in seq2))
    cache.insert(InsertParams(key=key(seq1), value=val1))
    cache.insert(InsertParams(key=key(seq2), value=val2))
    assert cache.total_size() == 10
    torch.testing.assert_close(matched(cache, key([1, 2, 3, 4, 999, 1000])), val1[:4])
    assert cache.total_size() == 10  # a split while matching moves no data
    torch.testing.assert_close(matched(cache, key(seq1)), val1)
    torch.testing.assert_close(matched(cache, key([1, 2, 3, 4, 5, 6, 777, 888])), val1[:6])
    assert cache.total_size() == 10
    torch.testing.assert_close(matched(cache, key(seq2)), val2)


def test_hash_value_storage(cache_cls):
    cache = simulated(cache_cls, page_size=4, enable_kv_cache_events=True)
    cache.insert(InsertParams(key=key([1, 2, 3, 4, 5, 6, 7, 8]), value=None))
    cache.take_events()  # hashes are computed when the events are emitted
    node = cache.root_node.children[(1, 2, 3, 4)]
    assert node.hash_value is not None and len(node.hash_value) == 2


def test_hash_value_repeating_tokens(cache_cls):
    cache = simulated(cache_cls, page_size=4, enable_kv_cache_events=True)
    cache.insert(InsertParams(key=key([1, 2, 3, 4, 1, 2, 3, 4]), value=None))
    stored = [e for e in cache.take_events() if isinstance(e, BlockStored)]
    assert len(stored) == 1 and len(stored[0].block_hashes) == 2
    first, second = stored[0].block_hashes
    assert first != second  # sequence-aware: the same page content at another position
    assert stored[0].parent_block_hash is None


def test_hash_value_split(cache_cls):
    cache = simulated(cache_cls, page_size=2, enable_kv_cache_events=True)
    cache.insert(InsertParams(key=key([1, 2, 3, 4]), value=None))
    cache.take_events()
    cache.insert(InsertParams(key=key([1, 2, 5, 6]), value=None))
    cache.take_events()
    node = cache.root_node.children[(1, 2)]
    assert node.hash_value is not None and len(node.hash_value) == 1
