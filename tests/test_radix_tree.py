"""ZoomRRadixCache on SGLang's real CPU allocator: host pieces survive splits, stay out of the
device sizes SGLang's leak check adds up, and eviction frees device and host slots exactly once."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from backend_harness import Harness
from zoomr_sglang.algo.segmentation import Thought, TokenRole
from zoomr_sglang.config import ZoomRConfig
from zoomr_sglang.radix_ext.notes import HostPiece, NodeNotes
from zoomr_sglang.radix_ext.tree import ZoomRRadixCache
from zoomr_sglang.runtime import attach
from zoomr_sglang.tree_port import ThoughtRecord


def _tree(harness: Harness) -> ZoomRRadixCache:
    attach(harness.req_to_token_pool, harness.controller)  # what the backend factory does
    return ZoomRRadixCache(CacheInitParams(disable=False, req_to_token_pool=harness.req_to_token_pool,
                                           token_to_kv_pool_allocator=harness.allocator, page_size=1))


def _insert_with_hole(tree, harness, tokens, hole):
    """Insert ``tokens`` whose positions ``hole`` are in the host tier (as checkpoint leaves it)."""
    start, end = hole
    slots = harness.allocator.alloc(len(tokens) - (end - start))
    value = torch.cat([slots[:start], torch.zeros(end - start, dtype=slots.dtype), slots[start:]])
    host_slots = harness.controller.tiering.host.alloc(end - start)
    tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=value))
    leaf = tree.root_node.children[tokens[0]]
    thought = Thought(index=0, start=start - 2, body_end=end + 2, final=True)
    tree.node_notes[leaf] = NodeNotes(pieces=[HostPiece(start, end, host_slots)],
                                      records=[ThoughtRecord(thought=thought, reasoning_start=0, role=TokenRole.BODY)])
    tree.host_tokens += end - start
    tree.thought_records += 1
    return leaf


def test_pieces_split_lock_and_evict_with_exact_counts():
    harness = Harness(ZoomRConfig(sink=0, window=8), host_tier_tokens=256)
    tree = _tree(harness)
    host, allocator = harness.controller.tiering.host, harness.allocator
    free_device = allocator.available_size()
    tokens = list(range(1, 41))
    _insert_with_hole(tree, harness, tokens, (10, 20))
    assert tree.evictable_size() == 30 and tree.protected_size() == 0  # the hole is not a device slot
    # A second request shares the first 15 tokens: the node splits inside the hole.
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens[:15] + [99]))))
    head = match.last_device_node
    assert match.device_prefix_len == 15 and len(head.key) == 15
    assert [(p.start, p.end) for p in tree.node_notes[head].pieces] == [(10, 15)]
    tail = next(iter(head.children.values()))
    assert [(p.start, p.end) for p in tree.node_notes[tail].pieces] == [(0, 5)] and len(tree.node_notes[tail].records) == 1
    assert not hasattr(head, "zoomr")  # SGLang's nodes carry nothing of zoomr's
    # Locking the head protects its 10 device tokens, not its 5 host ones.
    tree.inc_lock_ref(head)
    assert tree.protected_size() == 10 and tree.evictable_size() == 20
    tree.evict(EvictParams(num_tokens=1000))  # only the unlocked tail can go
    assert tree.evicted_device_tokens == 20 and tree.evicted_host_tokens == 5
    assert tree.host_tokens == 5 and tree.thought_records == 0
    tree.dec_lock_ref(head)
    assert tree.protected_size() == 0 and tree.evictable_size() == 10
    tree.evict(EvictParams(num_tokens=1000))
    assert allocator.available_size() == free_device and host.num_used == 0
    assert tree.evictable_size() == 0 and tree.host_tokens == 0 and tree.node_notes == {}


class _RecordingPort:
    """A ``TreePort`` that accepts holes and records what the tree hands over and gives back."""

    def __init__(self, host) -> None:
        self.host, self.handed, self.freed = host, [], 0

    def accepts_holes(self, req) -> bool:
        return True

    def hand_inheritance(self, req, inheritance) -> None:
        self.handed.append((req, inheritance))

    def free_host_slots(self, host_slots) -> None:
        self.freed += len(host_slots)
        self.host.free(host_slots)


def test_the_tree_reaches_its_backend_only_through_the_port():
    """A match hands the inheritance to the pool's port (the tree writes nothing on SGLang's Req),
    eviction gives host slots back through it, and a tree whose pool zoomr does not decode hands
    nothing over."""
    harness = Harness(ZoomRConfig(sink=0, window=8), host_tier_tokens=256)
    tree = _tree(harness)
    port = _RecordingPort(harness.controller.tiering.host)
    attach(harness.req_to_token_pool, port)
    tokens = list(range(1, 41))
    _insert_with_hole(tree, harness, tokens, (10, 20))
    req = SimpleNamespace()
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens + [99])), req=req))
    assert match.device_prefix_len == 40 and vars(req) == {}
    (first, cleared), (second, inheritance) = port.handed
    assert first is req and cleared is None and second is req
    assert inheritance.prefix_len == 40 and len(inheritance.records) == 1
    assert [(thought, start, end) for thought, start, end, _ in inheritance.cold] == [(0, 10, 20)]
    tree.evict(EvictParams(num_tokens=1000))
    assert port.freed == 10 and harness.controller.tiering.host.num_used == 0

    other = Harness(ZoomRConfig(sink=0, window=8))  # another decode backend: no runtime for its pool
    plain = ZoomRRadixCache(CacheInitParams(disable=False, req_to_token_pool=other.req_to_token_pool,
                                            token_to_kv_pool_allocator=other.allocator, page_size=1))
    plain.insert(InsertParams(key=RadixKey(array("q", tokens)), value=other.allocator.alloc(40)))
    assert plain.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req)).device_prefix_len == 40
    assert vars(req) == {} and plain.node_notes == {}


def test_reset_frees_every_host_piece():
    """SGLang's flush resets the tree (and clears the allocator itself); the host pieces go too."""
    harness = Harness(ZoomRConfig(sink=0, window=8), host_tier_tokens=256)
    tree = _tree(harness)
    _insert_with_hole(tree, harness, list(range(1, 33)), (8, 24))
    assert harness.controller.tiering.host.num_used == 16 and tree.stats()["host_tokens"] == 16
    tree.reset()
    assert harness.controller.tiering.host.num_used == 0
    assert tree.stats() == {"device_tokens": 0, "host_tokens": 0, "thought_records": 0,
                            "evicted_device_tokens": 0, "evicted_host_tokens": 0, "retracted_kept": 0}


@pytest.mark.parametrize("num_tokens,evicted,left", [(2, 2, 10), (5, 12, 0)])
def test_evict_counts_device_tokens_of_deleted_leaves(num_tokens, evicted, left):
    """A leaf frees its length less its host pieces, counted from the deleted leaves (frees deferred
    by a free group included): the older leaf holds 2 device and 8 host tokens, the newer 10 device
    ones, so a request for 5 takes both."""
    harness = Harness(ZoomRConfig(sink=0, window=8), host_tier_tokens=256)
    tree, allocator = _tree(harness), harness.allocator
    free_device = allocator.available_size()
    _insert_with_hole(tree, harness, list(range(1, 11)), (2, 10))
    tree.insert(InsertParams(key=RadixKey(array("q", range(50, 60))), value=allocator.alloc(10)))
    allocator.free_group_begin()
    assert tree.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted == evicted
    allocator.free_group_end()
    assert tree.evictable_size() == left and allocator.available_size() == free_device - left
    assert tree.host_tokens == 0 and harness.controller.tiering.host.num_used == 0


def test_sliding_window_pool_is_refused_at_construction():
    from unittest.mock import MagicMock

    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator

    swa_pool = MagicMock(spec=SWATokenToKVPoolAllocator)
    with pytest.raises(ValueError, match=r"does not support sliding-window \(SWA\) KV pools"):
        ZoomRRadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=swa_pool,
                                        page_size=1))
