"""SGLang hooks that make the host tier's row holes safe and turn freed slots into admissions.

See docs/host-tier.md; ``plugin._hook_table`` names their targets and imports this module at the
first call of one of them. Every hook is a no-op unless the pool belongs to a ZoomR decode backend
(``runtime.runtime_of``) whose host tier is on, except the insert cap below pasted reasoning and
the two memory checks (the fine levels' page bounds take pool slots, tier or not), which need
only the backend.
- Release: a request's insert into SGLang's stock tree stops at its first hole (that tree must
  never own a hole's padding slot) and, while it runs, below its pasted reasoning; the ranges
  SGLang frees skip the holes (their slots were freed when the thought left the device).
- Decode memory check: the next step's possible zoom-ins and page bounds count as required
  tokens, so SGLang evicts its tree or retracts before either could find the pool empty.
- Busy leak check: SGLang's own count of a running request's device slots, corrected for holes
  and page bounds.
- Admission: a ZoomR request is charged what it will keep on the device (``admission.py``, the
  ``admission`` key of ``ZOOMR_CONFIG``), not its output length, through the prefill budget that
  SGLang's allocator makes for each ``PrefillAdder`` (``ZoomRPrefillBudget``), and the "batch is
  full" latch reopens when the tier frees slots.
Each hook that SGLang 0.5.23's public seams cannot replace says why (docs/sglang-integration.md,
"Hooks without a public seam").
"""

from __future__ import annotations

from typing import Dict

from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from zoomr_sglang.algo.working_set import subtract_ranges
from zoomr_sglang.attention_backend.admission import HostRoom, new_request_charge, running_charge
from zoomr_sglang.runtime import runtime_of


def _tiering_of(req_to_token_pool):
    runtime = runtime_of(req_to_token_pool)
    return None if runtime is None else runtime.controller.tiering


def around_checkpoint(original, cache, req, *args, up_to, **kwargs):
    runtime = runtime_of(cache.req_to_token_pool)
    if runtime is not None:
        up_to = runtime.tree_port.checkpoint_limit(req, up_to, holes_allowed=False, leaving=req.finished())
    return original(cache, req, *args, up_to=up_to, **kwargs)


def around_free_kv_row(original, cache, kv, ranges, *args, **kwargs):
    tiering = _tiering_of(cache.req_to_token_pool)
    if tiering is not None and kv.req_pool_idx is not None:
        tiering.drain_row(kv.req_pool_idx)  # no copy out may still read a slot SGLang frees now
        holes = tiering.holes(kv.req_pool_idx)
        if holes:
            ranges = subtract_ranges(ranges, holes)
    return original(cache, kv, ranges, *args, **kwargs)


def after_uncached_sizes(result, checker, *args, **kwargs):
    """SGLang's busy leak check counts each running request's positions from its tree-owned prefix
    to its allocated length as its device slots; correct that by the row's holes, by inherited
    thoughts it zoomed into and by its page bounds (``ZoomRController.uncounted_device_tokens``).

    No public seam: the public ``self_check_during_busy`` sums these counts and asserts in one call,
    and the per-request count it sums (``kv_private_tokens``) is handed a request's KV record only,
    not the pool that would find the tier."""
    runtime = runtime_of(checker.tree_cache.req_to_token_pool)
    if runtime is None:
        return result
    full, swa = result
    for req in checker._requests_owning_rows():
        if req.kv.req_pool_idx is not None:
            full += runtime.controller.uncounted_device_tokens(req.kv.req_pool_idx, req.kv.cache_protected_len)
    return full, swa


def after_new_tokens_required(result, batch, selected_indices=None, *args, **kwargs):
    runtime = runtime_of(batch.req_to_token_pool)
    if runtime is None:
        return result
    reqs = batch.reqs if selected_indices is None else [batch.reqs[i] for i in selected_indices]
    return result + sum(runtime.controller.device_headroom(r.kv.req_pool_idx) for r in reqs
                        if r.kv.req_pool_idx is not None)


class ZoomRPrefillBudget(PrefillBudget):
    """The prefill budget of a pool whose host tier zoomr charges (docs/host-tier.md, "Admission").

    SGLang's allocator makes one per ``PrefillAdder`` (one scheduling round), and the adder asks it
    whether each new request fits (``check_prefill``) and reserves through it (``reserve``). Like
    SGLang's ``SWAPrefillBudget``, which charges a request its window rather than its output, this
    one counts a request whose KV the tier may move at what it will keep on the device
    (``admission.py``) instead of its whole output. It also holds the round's view of the tier: its
    free room, handed to the running requests' charges (each charged once, however often SGLang
    asks) and then to the new ones'.
    """

    def __init__(self, allocator, tree_cache, controller, *, num_mixed_decode_tokens: int = 0) -> None:
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        self.controller = controller
        host = controller.tiering.host
        self.host_room = HostRoom(host.free_blocks * host.block_tokens)  # thoughts take whole blocks
        self.running: Dict[int, int] = {}  # id(req) -> its charge this round
        self.admitting = None  # the request being admitted, while the tier may move its KV
        self.new_token_ratio = 1.0  # the adder's, set with ``admitting``

    def charge_running(self, req, sglang_charge: float, new_token_ratio: float) -> float:
        """What a running request may still add to the pool: at most SGLang's own charge."""
        state = None if req.kv.req_pool_idx is None else self.controller.planner.states.get(req.kv.req_pool_idx)
        if state is None or not state.tiered:
            return sglang_charge  # a policy whose KV never leaves the device keeps SGLang's own charge
        if id(req) not in self.running:
            remaining = max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
            charge = running_charge(self.controller.config, state, remaining, new_token_ratio)
            self.running[id(req)] = self.host_room.device_tokens(charge)
        return min(sglang_charge, self.running[id(req)])

    def _reservation(self, max_new_tokens: int, take: bool) -> int:
        """At most ``max_new_tokens``: the charge's device and host parts add up to it."""
        charge = new_request_charge(self.controller.config, max_new_tokens, self.new_token_ratio)
        return self.host_room.device_tokens(charge, take)

    def check_prefill(self, *, total_tokens: int, max_new_tokens: int, **kwargs):
        """SGLang admits a request only while its prompt plus its whole remaining output
        (``max_new_tokens``, within ``total_tokens``) is below the free room; count the reservation
        instead of that output."""
        if self.admitting is not None:
            total_tokens -= max_new_tokens - self._reservation(max_new_tokens, take=False)
        return super().check_prefill(total_tokens=total_tokens, max_new_tokens=max_new_tokens, **kwargs)

    def reserve(self, extend_input_len: int, max_new_tokens: int, **kwargs) -> None:
        """Reserve the admitted request's reservation and take its host room."""
        if self.admitting is not None:
            max_new_tokens = self._reservation(max_new_tokens, take=True)
        super().reserve(extend_input_len, max_new_tokens, **kwargs)


def around_create_prefill_budget(original, allocator, tree_cache, **kwargs):
    """``BaseTokenToKVPoolAllocator.create_prefill_budget``, the allocator's public seam that every
    ``PrefillAdder`` calls: a zoomr budget when zoomr charges the pool's admissions (host tier on,
    not the ``sglang`` admission rule). Allocators with budgets of their own (sliding window, hybrid
    pools: models zoomr refuses) override the method and never reach this hook."""
    runtime = runtime_of(tree_cache.req_to_token_pool)
    controller = None if runtime is None else runtime.controller
    if controller is None or controller.tiering is None or controller.config.admission == "sglang":
        return original(allocator, tree_cache, **kwargs)
    return ZoomRPrefillBudget(allocator, tree_cache, controller, **kwargs)


def after_running_offset(result, adder, req, *args, **kwargs):
    """``PrefillAdder._get_running_request_total_token_offset``: a running request's charge.

    No public seam: the adder, not its budget, computes each running request's charge here and adds
    the sum to the budget's ``total_offset`` (priority preemption subtracts the same figure), and
    the budget is never handed the running requests."""
    budget = adder.memory_budget
    if not isinstance(budget, ZoomRPrefillBudget):
        return result
    return budget.charge_running(req, result, adder.new_token_ratio)


def around_admitting(original, adder, req, *args, **kwargs):
    """``PrefillAdder.add_one_req`` and ``add_chunked_req``, the adder's entry points for one
    request: tells the budget which request it is charging.

    No public seam: the budget is handed each admission's token counts, never the request, and
    whether the tier may move a request's KV is the request's own (its policy settings), as is the
    adder's ``new_token_ratio`` that the charge scales by."""
    budget = adder.memory_budget
    if not isinstance(budget, ZoomRPrefillBudget):
        return original(adder, req, *args, **kwargs)
    budget.admitting = req if budget.controller.planner.accepts_holes(req) else None
    budget.new_token_ratio = adder.new_token_ratio
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        budget.admitting = None


def before_prefill_batch(scheduler, running_batch, *args, **kwargs):
    """``Scheduler.get_new_batch_prefill``: reopens the "batch is full" latch when the tier freed
    slots since the last round.

    No public seam besides this scheduler step: the latch is read before any ``PrefillAdder`` (and
    so any budget) exists, and SGLang clears it only when a request leaves."""
    tiering = _tiering_of(scheduler.req_to_token_pool)
    if tiering is not None and tiering.freed_since_admission > 0:
        tiering.freed_since_admission = 0
        running_batch.batch_is_full = False
    return None
