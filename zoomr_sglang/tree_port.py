"""What the zoomr radix tree (``radix_ext/``) and the decode backend (``attention_backend/``) hand
each other: the layer both import, so that neither imports the other's package.

- :class:`ThoughtRecord`: a closed thought the tree keeps on the node where its span ends, with a
  snapshot of its index key (the backend exports it when the request is inserted);
- :class:`Inheritance`: what a request whose prompt matched a path takes over (the tree reads it
  from the path, the backend's planner and host tier take it when the request gets its pool row);
- :class:`TreePort`: what the tree asks the decode backend of its pool (may this request inherit
  holes, how far may it be inserted, what does its insert keep) and hands it (a match's
  inheritance, host slots back). ``ZoomRController`` is one; the tree finds it through
  ``zoomr_sglang.runtime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

import torch

from zoomr_sglang.algo.segmentation import Thought, TokenRole

# Positions [start, end) of a row whose KV is in the host tier only, and their host slots
# ([end - start] int64): a hole of the row, or the part of it the tree takes over.
HostRun = Tuple[int, int, torch.Tensor]


@dataclass
class ThoughtRecord:
    thought: Thought  # absolute positions (index: the writer's ordinal, renumbered on inheritance)
    reasoning_start: int  # the writer's first reasoning position (its prompt length)
    role: TokenRole  # which key indexes the thought
    key_sums: Optional[torch.Tensor] = None  # [layers, kv_heads, head_dim] float32; None: no key
    key_counts: Optional[torch.Tensor] = None  # [layers] float32


@dataclass
class Inheritance:
    """What a request whose prompt matched ``prefix_len`` tokens of the tree takes over."""

    prefix_len: int
    reasoning_start: int
    records: List[ThoughtRecord]  # thoughts renumbered 0..k-1, ascending
    cold: List[Tuple[int, int, int, torch.Tensor]]  # (thought index, start, end, host slots)

    @property
    def resume_from(self) -> int:
        """First position the request segments itself (after the last inherited thought)."""
        return self.records[-1].thought.span_end()


class TreePort(Protocol):
    """The decode backend as the zoomr radix tree of the same ``ReqToTokenPool`` sees it."""

    def accepts_holes(self, req) -> bool:
        """Whether ``req`` may inherit a prefix whose cold thoughts are in the host tier only."""

    def checkpoint_limit(self, req, up_to: int, *, holes_allowed: bool, leaving: bool) -> int:
        """How far a tree may insert ``req`` now (``up_to`` asked)."""

    def export_to_tree(self, row: int, new_from: int, end: int) -> Tuple[List[ThoughtRecord], List[HostRun]]:
        """The closed thoughts and the holes of ``row`` that the tree keeps as it first inserts
        positions ``[new_from, end)``; the holes' host slots pass to the tree."""

    def hand_inheritance(self, req, inheritance: Optional[Inheritance]) -> None:
        """What ``req``'s latest match lets it inherit (None: nothing), taken when it gets its row."""

    def free_host_slots(self, host_slots: torch.Tensor) -> None:
        """Give host-tier slots the tree owned back to the tier (a node with host pieces left)."""
