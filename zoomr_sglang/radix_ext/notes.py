"""What the zoomr tree keeps per node, and what a request inherits from a matched path.

A node of SGLang's radix tree holds the KV slots of a run of tokens (``node.value``). The zoomr
tree keeps :class:`NodeNotes` beside it (``ZoomRRadixCache.node_notes``, by node):

- ``pieces``: runs of the node whose KV lives in the host tier only (a cold thought's body, or
  part of it after a node split). Their ``node.value`` entries hold the padding slot 0; the host
  slots belong to the tree and are freed when the node is evicted.
- ``records``: the closed thoughts whose span ends inside the node (``tree_port.ThoughtRecord``:
  absolute positions and the thought's index key, a snapshot of its running sums).

:func:`inherit` reads a matched path and says how much of it a request may take (``cut``) and
what it inherits: its writers' segmentation, index keys and cold thoughts. A host piece that no
whole thought record on the path explains is never handed out: the match stops before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch

from zoomr_sglang.tree_port import Inheritance, ThoughtRecord


@dataclass
class HostPiece:
    start: int  # node-relative positions [start, end)
    end: int
    host_slots: torch.Tensor  # [end - start] int64 host-tier slots, owned by the tree


@dataclass
class NodeNotes:
    pieces: List[HostPiece] = field(default_factory=list)  # ascending, disjoint
    records: List[ThoughtRecord] = field(default_factory=list)  # ascending span ends

    @property
    def host_tokens(self) -> int:
        return sum(p.end - p.start for p in self.pieces)

    def split(self, split_len: int, node_start: int) -> Tuple["NodeNotes", "NodeNotes"]:
        """Notes of the node's first ``split_len`` positions and of the rest (re-based to 0), for a
        node starting at absolute position ``node_start``."""
        head, tail = NodeNotes(), NodeNotes()
        for p in self.pieces:
            if p.start < split_len:
                cut = min(p.end, split_len)
                head.pieces.append(HostPiece(p.start, cut, p.host_slots[: cut - p.start]))
            if p.end > split_len:
                cut = max(p.start, split_len)
                tail.pieces.append(HostPiece(cut - split_len, p.end - split_len, p.host_slots[cut - p.start:]))
        for r in self.records:
            (head if r.thought.span_end() <= node_start + split_len else tail).records.append(r)
        return head, tail


def inherit(path: Sequence[Tuple[int, int, Optional[NodeNotes]]], accept_holes: bool) -> Tuple[int, Optional[Inheritance]]:
    """Read a matched path ``[(node start, node length, notes)]`` (root first).

    Returns ``(cut, inheritance)``: the request may take the first ``cut`` positions (no host piece
    below ``cut`` unless ``accept_holes`` and a whole thought record explains it), and the thoughts
    recorded wholly below ``cut`` (None when there are none).
    """
    total = sum(length for _, length, _ in path)
    pieces: List[Tuple[int, int, torch.Tensor]] = []
    records: List[ThoughtRecord] = []
    for start, _, notes in path:
        if notes is None:
            continue
        pieces += [(start + p.start, start + p.end, p.host_slots) for p in notes.pieces]
        for r in notes.records:  # writers that segmented differently: keep the earlier thought
            if not records or r.thought.start >= records[-1].thought.span_end():
                records.append(r)
    cut = total if accept_holes or not pieces else pieces[0][0]
    settled = False
    while not settled:  # each pass only lowers the cut
        kept = [r for r in records if r.thought.span_end() <= cut]
        cold: List[list] = []  # [owner, start, end, [host slot runs]]
        settled = True
        for s, e, slots in (p for p in pieces if p[0] < cut):
            owner = next((i for i, r in enumerate(kept) if r.thought.start <= s and e <= r.thought.body_end), None)
            if cold and cold[-1][0] == owner and cold[-1][2] == s:  # one hole split over two nodes
                cold[-1][2] = e
                cold[-1][3].append(slots)
            elif owner is None or any(c[0] == owner for c in cold):  # unexplained, or a second hole
                cut, settled = s, False
                break
            else:
                cold.append([owner, s, e, [slots]])
    if not kept:
        return cut, None
    renumbered = [replace(r, thought=replace(r.thought, index=i)) for i, r in enumerate(kept)]
    return cut, Inheritance(prefix_len=cut, reasoning_start=kept[0].reasoning_start, records=renumbered,
                            cold=[(owner, s, e, torch.cat(runs)) for owner, s, e, runs in cold])
