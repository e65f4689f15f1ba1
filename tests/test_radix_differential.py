"""ZoomRRadixCache beside SGLang 0.5.23's RadixCache where no thought is involved: the same calls on
twin trees, each over its own real allocator of the same kind, give equal observables after every
call (match results and paths, insert prefix lengths, lock deltas, evictable/protected/total sizes,
evicted counts, allocator free counts, KV events). Issue 23 item 1.

SGLang's eviction order is LRU on ``time.monotonic()``; the tests give both trees one strictly
increasing clock so that no two nodes tie (a tie is broken by set order, which differs between
two trees that are both right).
"""

from __future__ import annotations

import itertools
import random
import time
from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache import radix_cache
from sglang.srt.mem_cache.allocator.page_interleave import PageInterleavePoolAllocator
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from zoomr_sglang.radix_ext.tree import ZoomRRadixCache

POOL_TOKENS = 512


def _allocator(kind: str, page_size: int):
    if kind == "token":
        return TokenToKVPoolAllocator(POOL_TOKENS, torch.float16, "cpu", None, need_sort=False)
    if kind == "paged":
        return PagedTokenToKVPoolAllocator(POOL_TOKENS, page_size, torch.float16, "cpu", None, need_sort=False)
    return PageInterleavePoolAllocator(POOL_TOKENS // 2, page_size, 2, torch.float16, "cpu", None, need_sort=False)


def _alloc(allocator, num_tokens: int) -> torch.Tensor:
    """What a request's prefill gets: ``num_tokens`` slots, whole pages."""
    if isinstance(allocator, PageInterleavePoolAllocator):  # a new chain starts on the least-full class
        return allocator.alloc_cyclic(allocator.least_full_class(), num_tokens)
    return allocator.alloc(num_tokens)


def _tree(cls, allocator, page_size: int):
    return cls(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                               page_size=page_size, enable_kv_cache_events=True))


@pytest.fixture(autouse=True)
def strict_clock(monkeypatch):
    ticks = itertools.count(1)
    monkeypatch.setattr(radix_cache, "time",
                        SimpleNamespace(monotonic=lambda: float(next(ticks)), perf_counter=time.perf_counter))


class Twins:
    """The same call on a RadixCache and a ZoomRRadixCache, each over its own allocator."""

    def __init__(self, kind: str, page_size: int):
        self.page_size = page_size
        self.allocators = [_allocator(kind, page_size) for _ in range(2)]
        self.trees = [_tree(cls, a, page_size) for cls, a in zip((RadixCache, ZoomRRadixCache), self.allocators)]

    def both(self, call):
        """``call(tree, allocator)`` on each twin; asserts the answers and every observable equal."""
        return self.same([call(tree, allocator) for tree, allocator in zip(self.trees, self.allocators)])

    def same(self, answers):
        assert answers[0] == answers[1]
        views = [(t.evictable_size(), t.protected_size(), t.total_size(), a.available_size(), t.take_events())
                 for t, a in zip(self.trees, self.allocators)]
        assert views[0] == views[1]
        return answers[0]

    def insert(self, tokens):
        """A finished request: its slots go into the tree, the duplicates of what was there are freed."""
        def call(tree, allocator):
            value = _alloc(allocator, len(tokens))
            prefix_len = tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=value)).prefix_len
            allocator.free(value[:prefix_len])
            return prefix_len
        return self.both(call)

    def match(self, tokens):
        def call(tree, _):
            result = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
            return result.device_prefix_len, tree.path_device_indices(result.last_device_node).tolist()
        return self.both(call)

    def lock(self, tokens):
        """Lock the node a match of ``tokens`` ends on (the same node on both twins)."""
        nodes = [t.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)))).last_device_node
                 for t in self.trees]
        self.same([t.inc_lock_ref(n).delta for t, n in zip(self.trees, nodes)])
        return nodes

    def unlock(self, nodes):
        self.same([t.dec_lock_ref(n).delta for t, n in zip(self.trees, nodes)])

    def evict(self, num_tokens: int, *, in_free_group: bool = False):
        def call(tree, allocator):
            if in_free_group:
                allocator.free_group_begin()
            evicted = tree.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted
            if in_free_group:
                allocator.free_group_end()
            return evicted
        return self.both(call)


def _three_prompts(twins: Twins) -> None:
    for first in (1, 100, 200):
        twins.insert(list(range(first, first + 8)))


@pytest.mark.parametrize("kind,page_size", [("token", 1), ("paged", 4)])
def test_evict_inside_a_free_group_counts_deleted_leaves(kind, page_size):
    """Frees deferred by a free group: SGLang evicts one 8-token prompt; zoomr used to empty the
    tree and report 0 (it counted the allocator's free count, which a group holds back)."""
    twins = Twins(kind, page_size)
    _three_prompts(twins)
    assert twins.evict(8, in_free_group=True) == 8
    assert [t.total_size() for t in twins.trees] == [16, 16]


def test_evict_on_page_interleaved_pool_counts_deleted_leaves():
    """A page-interleaved pool's free count is a minimum over page classes (one-page prompts on
    classes 0, 1, 0): zoomr used to report the 16 that minimum rose by when asked for 8."""
    twins = Twins("interleave", 8)
    _three_prompts(twins)
    assert twins.evict(8) == 8
    assert [t.total_size() for t in twins.trees] == [16, 16]


def test_page_interleaved_pool_is_seen_as_itself():
    """SGLang branches on the allocator's type (the shard count of a page-interleaved pool):
    the tree's wrapper keeps isinstance() answering as for SGLang's allocator."""
    from sglang.srt.mem_cache.allocator.page_interleave import page_interleave_shard_size

    twins = Twins("interleave", 4)
    assert [page_interleave_shard_size(t.token_to_kv_pool_allocator) for t in twins.trees] == [2, 2]


@pytest.mark.parametrize("kind,page_size,seed", [("token", 1, 0), ("paged", 4, 1), ("interleave", 2, 2)])
def test_random_operations_match_sglang(kind, page_size, seed):
    """A few hundred seeded inserts, matches, locks, unlocks and evictions (some inside free
    groups): every answer and every observable equal after each."""
    rng = random.Random(seed)
    twins = Twins(kind, page_size)
    inserted, locks, evicted = [], [], 0

    def some_tokens():
        """A sequence sharing a random prefix with an earlier one (splits nodes), page-aligned."""
        base = rng.choice(inserted)[: rng.randrange(0, 24)] if inserted and rng.random() < 0.7 else []
        tokens = base + [rng.randrange(1, 6) for _ in range(rng.randrange(1, 20))]
        return tokens[: max(page_size, len(tokens) // page_size * page_size)]

    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            tokens = some_tokens()
            if _alloc_fits(twins, len(tokens)):
                twins.insert(tokens)
                inserted.append(tokens)
        elif op < 0.55:
            twins.match(some_tokens())
        elif op < 0.7 and inserted:
            locks.append(twins.lock(rng.choice(inserted)))
        elif op < 0.85 and locks:
            twins.unlock(locks.pop(rng.randrange(len(locks))))
        else:
            evicted += twins.evict(rng.randrange(0, 40), in_free_group=rng.random() < 0.3)
    assert evicted > 0 and twins.trees[1].evicted_device_tokens >= evicted  # eviction was exercised
    assert twins.trees[1].host_tokens == 0  # no thought was involved


def _alloc_fits(twins: Twins, num_tokens: int) -> bool:
    """Room for a prefill (SGLang evicts first; an unrelated eviction keeps the twins in step)."""
    need = num_tokens + 2 * twins.page_size
    if twins.allocators[0].available_size() < need:
        twins.evict(need)
    return twins.allocators[0].available_size() >= need
