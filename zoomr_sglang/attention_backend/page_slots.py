"""Where the fine levels' page bounds live: one KV slot of SGLang's own pool per page.

A request that zooms into pages (``fine_zoom.zooms_fine``) needs, per layer and KV head, the min
and max key of every complete page that a vote may rank (docs/fine-levels.md). A KV slot holds
``num_kv_heads x head_dim`` in its K buffer and as much in its V buffer per layer: one page's min
and max keys, in the cache's dtype (which holds them exactly). So each such page takes one slot
from SGLang's allocator when it completes and gives it back with the request: only the requests
that zoom fine pay (1/16 of their sequence), SGLang's accounting sees the slots (its busy check
through ``uncounted_device_tokens``, its decode memory check through ``headroom``), each rank of
attention tensor parallelism holds its own heads' bounds, and a page whose KV moves to the host
tier keeps its bounds on the device (a bound slot is in no row of ``req_to_token``).

Host, per step and request (the planner): the pages completed since the last step whose keys are
on the device get slots (one allocator call; the slots stay on the device, never read on the
host). Device, once per step (:meth:`PageBoundSlots.load`, outside any graph): ``row_pages`` points
at the new slots, and the pages whose keys were all written before this step are committed in
every layer; per layer (:meth:`PageBoundSlots.after_attention`, graph-safe: a fixed buffer padded
with ``(0, 0, 0)``): the pages the step's own token completes, after the layer's KV write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from zoomr_sglang.algo.page_bounds import PAGE_TOKENS, commit_page_bounds
from zoomr_sglang.attention_backend.transfers import to_device
from zoomr_sglang.kernels.kv_indices import fixed_shapes

NEVER = 1 << 40  # a page number past any sequence


@dataclass
class RowBounds:
    """One request's bounded pages: its pages ``[0, end)``, their slots (device tensors, in page order)."""

    end: int = 0
    slots: List[torch.Tensor] = field(default_factory=list)


@dataclass
class NewPages:
    """What one request adds to the step: pages ``[n]`` of ``row``, their slots ``[n]`` (device),
    and which of them the step's own token completes (``[n]`` bool: committed in the layers)."""

    row: int
    pages: np.ndarray
    slots: torch.Tensor
    in_step: np.ndarray


class PageBoundSlots:
    """The ``[n_rows, max_pages]`` int32 table of bound slots (0: none, SGLang's padding slot), the
    step's commit buffer and each row's host record."""

    def __init__(self, *, req_to_token: torch.Tensor, kv_pool, allocator, num_layers: int, page_size: int = 1) -> None:
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool
        self.allocator = allocator
        self.num_layers = num_layers
        self.fixed_shapes = fixed_shapes(req_to_token.device)
        # A paged pool hands out whole pages of slots, one bound each would double the request's KV:
        # there, no page gets bounds (the fine levels keep their token level).
        # A V head narrower than the K head cannot hold the max key: no bounds either.
        self.enabled = page_size == 1 and kv_pool.get_key_buffer(0).shape[1:] == kv_pool.get_value_buffer(0).shape[1:]
        n_rows, max_len = req_to_token.shape
        device = req_to_token.device
        self.row_pages = torch.zeros(n_rows, max(1, max_len // PAGE_TOKENS), dtype=torch.int32, device=device)
        self.step_commits = torch.zeros(n_rows, 3, dtype=torch.int64, device=device)  # (row, page, slot)
        self.active_commits = 0  # the torch path's commits this step (fixed shapes: ``slots``)
        self.slots = n_rows  # commit slots the per-layer call covers (a captured batch's size)
        self.rows: Dict[int, RowBounds] = {}
        self.alloc_failures = 0  # steps at which a request's new pages found no free slot (counted, retried)
        self.commits_bulk = 0  # pages committed at a step's load (completed before it)

    # -- host (the planner) -------------------------------------------------------------------------
    def bound(self, row: int, seq_len: int, absent: Optional[np.ndarray], new_pages: List[NewPages]) -> int:
        """Give slots to the pages of ``row`` completed at ``seq_len`` (the step's token included),
        the prompt's too, whose keys are on the device (``absent``: bool ``[seq_len]`` of positions
        that are not, or None); appends them to ``new_pages``. Returns the end of the row's bounded
        pages (its pages ``[0, end)``)."""
        record = self.rows.get(row)
        if record is None:
            record = self.rows[row] = RowBounds()
        complete = seq_len // PAGE_TOKENS
        if complete <= record.end or not self.enabled:
            return record.end
        pages = np.arange(record.end, complete, dtype=np.int64)
        if absent is not None:  # pages wait, in order, until the host tier brought their keys back
            missing = absent[record.end * PAGE_TOKENS: complete * PAGE_TOKENS].reshape(-1, PAGE_TOKENS).any(axis=1)
            pages = pages[: int(np.argmax(missing)) if missing.any() else len(pages)]
            if not len(pages):
                return record.end
        slots = self.allocator.alloc(len(pages))
        if slots is None:
            self.alloc_failures += 1
            return record.end
        record.slots.append(slots)
        record.end = int(pages[-1]) + 1
        new_pages.append(NewPages(row, pages, slots, (pages + 1) * PAGE_TOKENS == seq_len))
        return record.end

    def bounds_end(self, row: int) -> int:
        """Where the row's pages without bounds start (the fine levels want their keys on the
        device); on a paged pool, never (no page gets bounds there)."""
        if not self.enabled:
            return NEVER
        record = self.rows.get(row)
        return 0 if record is None else record.end

    def release(self, row: int) -> None:
        """The request in ``row`` left (or its state was dropped): its slots go back to SGLang."""
        record = self.rows.pop(row, None)
        if record is not None and record.slots:
            self.allocator.free(torch.cat(record.slots))

    def device_tokens(self, row: int) -> int:
        """Slots the row holds for bounds (SGLang does not count them as the request's)."""
        record = self.rows.get(row)
        return 0 if record is None else record.end

    def headroom(self, row: int) -> int:
        """Slots the row's next step may take: one page a step, once it bounds pages."""
        return int(row in self.rows)

    # -- device ---------------------------------------------------------------------------------------
    def load(self, new_pages: List[NewPages], padded_bs: int) -> None:
        """Point ``row_pages`` at the step's new slots, commit in every layer the pages completed
        before this step, and fill the commit buffer with the ones its token completes (host side
        of the step, outside any graph)."""
        self.slots = min(len(self.step_commits), padded_bs)
        if not new_pages:
            self._set_active(0)
            return
        host = np.concatenate([np.stack([np.full(len(n.pages), n.row), n.pages, n.in_step], axis=1)
                               for n in new_pages]).astype(np.int64)
        # Pages completed before the step first, the step's own last: each part is then a slice.
        order = np.argsort(host[:, 2], kind="stable")
        n_bulk = len(host) - int(host[:, 2].sum())
        packed = to_device(np.concatenate([host[order, :2].reshape(-1), order]), self.row_pages.device)
        row_page, order_d = packed[: 2 * len(host)].view(-1, 2), packed[2 * len(host):]
        slots = torch.cat([n.slots for n in new_pages]).long().to(order_d.device).index_select(0, order_d)
        commits = torch.cat([row_page, slots[:, None]], dim=1)
        self.row_pages[commits[:, 0], commits[:, 1]] = commits[:, 2].to(torch.int32)
        if n_bulk:
            for layer in range(self.num_layers):
                self._commit(layer, commits[:n_bulk])
            self.commits_bulk += n_bulk
        self._set_active(len(host) - n_bulk)
        self.step_commits[: len(host) - n_bulk] = commits[n_bulk:]

    def _set_active(self, n: int) -> None:
        if self.fixed_shapes:  # a graph replays over every slot: the unused ones commit the padding
            self.step_commits[n:].zero_()
        self.active_commits = n

    def after_attention(self, layer_id: int) -> None:
        """Commit the bounds of the pages this step's token completes in layer ``layer_id`` (after
        its KV write; fixed shapes on the graph path, exactly the step's commits on the torch path)."""
        n = self.slots if self.fixed_shapes else self.active_commits
        if n:
            self._commit(layer_id, self.step_commits[:n])

    def _commit(self, layer_id: int, commits: torch.Tensor) -> None:
        """Write the bounds of ``commits`` ``[n, 3]`` (row, page, slot) in layer ``layer_id``: from
        the layer's keys, min into its K buffer and max into its V buffer."""
        key_buffer = self.kv_pool.get_key_buffer(layer_id)
        commit_page_bounds(key_buffer, self.kv_pool.get_value_buffer(layer_id), key_buffer, self.req_to_token, commits)
