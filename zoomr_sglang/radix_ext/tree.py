"""``--radix-cache-backend zoomr``: SGLang's radix tree, taught about thoughts and the host tier.

A subclass of SGLang's ``RadixCache`` (as FlexKV's tree is); the tree, its locks, eviction order and
node splits stay SGLang's. What it adds (notes in ``notes.py``):

- **Insert whole.** A finished request is inserted up to its last token, its cold thoughts
  included: their ``node.value`` entries hold the padding slot 0 and their host-tier slots pass to
  the tree as host pieces. Its closed thoughts are recorded with their index keys.
- **Inherit.** A zoomr request whose prompt matches such a path takes the whole match: its row
  gets the holes, its tiering the tree's host pieces (zoomed in on demand, into its own slots),
  its planner the recorded thoughts and index keys. A request that cannot attend around holes
  (another policy, another backend) has its match cut at the first host piece.
- **Exact counts.** Host pieces are not device slots: ``evictable_size``/``protected_size`` leave
  them out, eviction frees device slots only (slot 0 is never handed back) and frees the
  pieces' host slots, and ``evict`` counts the device tokens of the leaves it deletes.

Wherever no host piece is in the tree, every call is SGLang's own (``evict`` included), so the
tree answers as ``RadixCache`` does; ``tests/test_sglang_radix_cache_suite.py`` and
``tests/test_radix_differential.py`` hold it to that.

What the tree needs of the decode backend goes through ``tree_port.TreePort``, found through
``zoomr_sglang.runtime`` from the tree's ``ReqToTokenPool`` (None: zoomr does not decode from it,
and the tree keeps no thoughts). This package never imports ``attention_backend``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from zoomr_sglang.algo.policy_base import mask_to_ranges
from zoomr_sglang.radix_ext.notes import HostPiece, NodeNotes, inherit
from zoomr_sglang.runtime import runtime_of
from zoomr_sglang.tree_port import TreePort


class PaddingSkippingAllocator:
    """SGLang's allocator as the tree sees it: frees skip the padding slot 0 that marks host pieces
    (whole pages, so every live run starts on a page boundary)."""

    def __init__(self, allocator) -> None:
        self._allocator = allocator

    def __getattr__(self, name):
        return getattr(self._allocator, name)

    @property
    def __class__(self):
        """isinstance() sees SGLang's allocator: SGLang branches on its type (e.g.
        ``page_interleave_shard_size`` reads a page-interleaved pool's shard count)."""
        return type(self._allocator)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        live = free_index != 0
        if bool(live.all()):
            return self._allocator.free_segment(free_index, start_pos=start_pos)
        for a, b in mask_to_ranges(live):
            self._allocator.free_segment(free_index[a:b], start_pos=start_pos + a)


class ZoomRRadixCache(RadixCache):
    def __init__(self, params) -> None:
        if isinstance(params.token_to_kv_pool_allocator, SWATokenToKVPoolAllocator):
            raise ValueError(
                "--radix-cache-backend zoomr does not support sliding-window (SWA) KV pools "
                f"({type(params.token_to_kv_pool_allocator).__name__}); use the default radix cache")
        self.host_tokens = 0  # tokens of host pieces in the tree
        self.host_tokens_protected = 0  # of those, in locked nodes
        self.thought_records = 0  # closed thoughts recorded on nodes
        self.evicted_device_tokens = 0  # device slots eviction gave back
        self.evicted_host_tokens = 0  # host-tier slots eviction gave back (host pieces)
        # TreeNode -> its notes, for the nodes that have any. Kept here, not on SGLang's nodes: the
        # tree's own overrides are every place a node is split or leaves (split, delete, reset).
        self.node_notes: Dict[object, NodeNotes] = {}
        super().__init__(params)
        if self.token_to_kv_pool_allocator is not None:
            self.token_to_kv_pool_allocator = PaddingSkippingAllocator(self.token_to_kv_pool_allocator)
        self._recording = False  # checkpoint() is inserting: note where its new positions start
        self._new_from: Optional[int] = None
        self._retracting = False  # set while keep_retracted() inserts
        self.retracted_kept = 0  # retracted requests inserted whole (their re-prefill inherits)

    # -- the zoomr decode backend of the same pool -------------------------------------------------
    def _port(self) -> Optional[TreePort]:
        runtime = runtime_of(self.req_to_token_pool)
        return None if runtime is None else runtime.tree_port

    def _drop_notes(self, notes: NodeNotes) -> None:
        """A node left the tree: free its pieces' host slots and forget its records (only a
        backend's export puts pieces in the tree, so a node with pieces has a port)."""
        for piece in notes.pieces:
            self._port().free_host_slots(piece.host_slots)
        self.host_tokens -= notes.host_tokens
        self.thought_records -= len(notes.records)

    def stats(self) -> dict:
        """What the tree holds (the plug-in adds it to SGLang's server info)."""
        return {"device_tokens": self.evictable_size() + self.protected_size(), "host_tokens": self.host_tokens,
                "thought_records": self.thought_records, "evicted_device_tokens": self.evicted_device_tokens,
                "evicted_host_tokens": self.evicted_host_tokens, "retracted_kept": self.retracted_kept}


    # -- sizes: device slots only ----------------------------------------------------------------
    def evictable_size(self):
        return self.evictable_size_ - (self.host_tokens - self.host_tokens_protected)

    def protected_size(self):
        return self.protected_size_ - self.host_tokens_protected

    def reset(self):
        for notes in self.node_notes.values():
            self._drop_notes(notes)
        self.node_notes.clear()
        super().reset()
        self.host_tokens = self.host_tokens_protected = self.thought_records = 0

    # -- match: cut at what the request cannot take, hand over the rest ---------------------------
    def match_prefix(self, params: MatchPrefixParams):
        result = super().match_prefix(params)
        req = params.req
        if req is None or self.disable:
            return result  # the tree's own re-match inside checkpoint(): no request to hand over to
        port = self._port()
        if port is not None:
            port.hand_inheritance(req, None)  # until this match says otherwise
        if result.device_prefix_len == 0 or (not self.host_tokens and not self._has_records(result.last_device_node)):
            return result  # nothing the request could inherit
        cut, inheritance = inherit(self._path(result.last_device_node), port is not None and port.accepts_holes(req))
        if cut < result.device_prefix_len:
            result = super().match_prefix(MatchPrefixParams(key=params.key[:cut], cow_mamba=params.cow_mamba, req=req))
        if port is not None and inheritance is not None:
            port.hand_inheritance(req, inheritance)
        return result

    def _has_records(self, node) -> bool:
        while node is not self.root_node:
            notes = self.node_notes.get(node)
            if notes is not None and notes.records:
                return True
            node = node.parent
        return False

    def _path_nodes(self, node) -> List[Tuple[int, object]]:
        """(start position, node) of each node from the root's child down to ``node``."""
        nodes = []
        while node is not self.root_node:
            nodes.append(node)
            node = node.parent
        path, start = [], 0
        for n in reversed(nodes):
            path.append((start, n))
            start += len(n.key)
        return path

    def _path(self, node) -> List[Tuple[int, int, Optional[NodeNotes]]]:
        """(start, length, notes) of each node from the root's child down to ``node``."""
        return [(start, len(n.key), self.node_notes.get(n)) for start, n in self._path_nodes(node)]

    # -- insert: a finished request goes in whole ------------------------------------------------
    def insert(self, params):
        result = super().insert(params)
        if self._recording and self._new_from is None:  # checkpoint's insert of the whole key (its second
            self._new_from = result.prefix_len  # insert, of the prompt alone, adds no position)
        return result

    def checkpoint(self, req, *, up_to: int):
        if self.disable:
            return
        port = self._port()
        if port is not None:
            up_to = port.checkpoint_limit(req, up_to, holes_allowed=True, leaving=req.finished() or self._retracting)
        self._recording, self._new_from = True, None
        try:
            super().checkpoint(req, up_to=up_to)
            new_from = self._new_from
        finally:
            self._recording = False
        if port is None or new_from is None or req.kv.cache_protected_len <= new_from:
            return
        records, holes = port.export_to_tree(req.kv.req_pool_idx, new_from, req.kv.cache_protected_len)
        for start, node in self._path_nodes(req.last_node):  # the request's lock covers the path: protected
            end = start + len(node.key)
            mine = [r for r in records if start < r.thought.span_end() <= end]
            pieces = [HostPiece(max(s, start) - start, min(e, end) - start, slots[max(s, start) - s: min(e, end) - s])
                      for s, e, slots in holes if s < end and e > start]
            if mine or pieces:
                notes = self.node_notes.setdefault(node, NodeNotes())
                notes.records += mine
                notes.pieces = sorted(notes.pieces + pieces, key=lambda p: p.start)
                self.thought_records += len(mine)
                added = sum(p.end - p.start for p in pieces)
                self.host_tokens += added
                self.host_tokens_protected += added if node.lock_ref > 0 else 0

    def keep_retracted(self, req) -> None:
        """SGLang retracts a running request (pool pressure) and will prefill it again from its
        prompt and output: insert it whole first, so that prefill matches it and inherits its
        thoughts, keys and cold thoughts instead of holding it all on the device as prompt."""
        req.refresh_fill_ids()  # as release_kv_cache does before an insert
        self._retracting = True
        try:
            self.checkpoint(req, up_to=req.owned_kv_len())
        finally:
            self._retracting = False
        self.retracted_kept += 1

    # -- splits, locks, eviction ----------------------------------------------------------------
    def _split_node(self, key, child, split_len: int):
        new_node = super()._split_node(key, child, split_len)
        notes = self.node_notes.pop(child, None)
        if notes is not None:
            node_start, node = 0, new_node.parent
            while node is not self.root_node:
                node_start += len(node.key)
                node = node.parent
            for part, notes_of_part in zip((new_node, child), notes.split(split_len, node_start)):
                if notes_of_part.pieces or notes_of_part.records:
                    self.node_notes[part] = notes_of_part
        return new_node

    def inc_lock_ref(self, node):
        result = super().inc_lock_ref(node)
        self.host_tokens_protected += self._host_tokens_at_lock(node, 1)
        return result

    def dec_lock_ref(self, node, params=None):
        result = super().dec_lock_ref(node, params)
        self.host_tokens_protected -= self._host_tokens_at_lock(node, 0)
        return result

    def _host_tokens_at_lock(self, node, lock_ref: int) -> int:
        """Host-piece tokens on the path whose lock count just became ``lock_ref`` (0 or 1)."""
        if self.disable or not self.host_tokens:
            return 0
        moved = 0
        while node is not self.root_node:
            notes = self.node_notes.get(node) if node.lock_ref == lock_ref else None
            if notes is not None:
                moved += notes.host_tokens
            node = node.parent
        return moved

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        notes = self.node_notes.pop(node, None)
        host = 0 if notes is None else notes.host_tokens
        self.evicted_device_tokens += len(node.value) - host
        if notes is not None:
            self.evicted_host_tokens += host
            self._drop_notes(notes)  # an evictable leaf is unlocked: its pieces were not protected

    def evict(self, params: EvictParams) -> EvictResult:
        """SGLang's eviction, counted in device tokens: a leaf frees its length less its host pieces.

        SGLang's own tally counts host pieces too, so while the tree holds any, evict again until
        ``num_tokens`` device tokens are counted or nothing is evictable (each pass stops at the
        same leaf a single device-counting pass would). Counted from the deleted leaves, never from
        the allocator's free count: a free group defers the frees, and a page-interleaved pool's
        free count is a minimum over its page classes.
        """
        if not self.host_tokens:
            return super().evict(params)
        start = self.evicted_device_tokens
        while (missing := params.num_tokens - (self.evicted_device_tokens - start)) > 0:
            if super().evict(replace(params, num_tokens=missing)).num_tokens_evicted == 0:
                break
        return EvictResult(num_tokens_evicted=self.evicted_device_tokens - start)


def create_zoomr_radix_cache(ctx):
    """The factory registered as ``--radix-cache-backend zoomr``."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise ValueError(
            "--radix-cache-backend zoomr supports full-attention models without --enable-hierarchical-cache; "
            "drop the flag or use the default radix cache")
    if ctx.disable_radix_cache:
        from sglang.srt.mem_cache.registry import create_unified_radix_cache

        return create_unified_radix_cache(ctx)  # what SGLang builds with the radix cache off
    return ZoomRRadixCache(ctx.params)


def before_release_req(*args, **kwargs):
    """BEFORE SGLang's ``schedule_batch.release_req`` (a retraction): a zoomr tree keeps the
    request whole, so its prefill after the retraction inherits what it wrote."""
    req, tree = kwargs.get("req"), kwargs.get("tree_cache")
    if isinstance(tree, ZoomRRadixCache) and not tree.disable and req is not None and not req.finished() \
            and req.kv.holds_kv:
        tree.keep_retracted(req)
    return None
