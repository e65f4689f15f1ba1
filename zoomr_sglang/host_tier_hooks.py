"""SGLang hooks that make the host tier's row holes safe and turn freed slots into admissions.

See docs/host-tier.md; ``plugin._hook_table`` names their targets and imports this module at the
first call of one of them. Every hook is a no-op unless the pool belongs to a ZoomR decode backend
(``runtime.runtime_of``) whose host tier is on, except the insert cap below pasted reasoning,
which needs only the backend.
- Release: a request's insert into SGLang's stock tree stops at its first hole (that tree must
  never own a hole's padding slot) and, while it runs, below its pasted reasoning; the ranges
  SGLang frees skip the holes (their slots were freed when the thought left the device).
- Decode memory check: the next step's possible zoom-ins count as required tokens, so SGLang
  evicts its tree or retracts before a zoom-in could find the pool empty.
- Busy leak check: SGLang's own count of a running request's device slots, corrected for holes.
- Admission: a ZoomR request is charged what it will keep on the device (``admission.py``,
  ``ZOOMR_ADMISSION``), not its output length, and the "batch is full" latch reopens when the tier
  frees slots.
"""

from __future__ import annotations

from typing import Dict

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
    to its allocated length as its device slots; correct that by the row's holes and by inherited
    thoughts it zoomed into (``ThoughtTiering.uncounted_device_tokens``)."""
    tiering = _tiering_of(checker.tree_cache.req_to_token_pool)
    if tiering is None:
        return result
    full, swa = result
    for req in checker._requests_owning_rows():
        if req.kv.req_pool_idx is not None:
            full += tiering.uncounted_device_tokens(req.kv.req_pool_idx, req.kv.cache_protected_len)
    return full, swa


def after_new_tokens_required(result, batch, selected_indices=None, *args, **kwargs):
    tiering = _tiering_of(batch.req_to_token_pool)
    if tiering is None:
        return result
    reqs = batch.reqs if selected_indices is None else [batch.reqs[i] for i in selected_indices]
    return result + sum(tiering.zoom_headroom(r.kv.req_pool_idx) for r in reqs if r.kv.req_pool_idx is not None)


class _AdmissionPass:
    """One ``PrefillAdder``'s view of the host tier: its free room, handed to the running requests'
    charges (each charged once, however often SGLang asks) and then to the new ones'; and the
    request being admitted when the host tier may move its KV."""

    def __init__(self, controller) -> None:
        host = controller.tiering.host
        self.host_room = HostRoom(host.free_blocks * host.block_tokens)  # thoughts take whole blocks
        self.running: Dict[int, int] = {}
        self.admitting = None

    def reservation(self, config, max_new_tokens: int, ratio: float, take: bool) -> int:
        """At most ``max_new_tokens``: the charge's device and host parts add up to it."""
        return self.host_room.device_tokens(new_request_charge(config, max_new_tokens, ratio), take)


def _admission_runtime(adder):
    """The runtime of the adder's pool when zoomr charges its admissions (host tier on, not
    ``ZOOMR_ADMISSION=sglang``), else None."""
    runtime = runtime_of(adder.tree_cache.req_to_token_pool)
    if runtime is None or runtime.controller.tiering is None or runtime.controller.config.admission == "sglang":
        return None
    return runtime


def _admission_pass(adder, runtime) -> _AdmissionPass:
    admission_pass = runtime.admission_passes.get(adder)
    if admission_pass is None:
        admission_pass = runtime.admission_passes[adder] = _AdmissionPass(runtime.controller)
    return admission_pass


def after_running_offset(result, adder, req, *args, **kwargs):
    runtime = _admission_runtime(adder)
    if runtime is None or req.kv.req_pool_idx is None:
        return result
    controller = runtime.controller
    state = controller.planner.states.get(req.kv.req_pool_idx)
    if state is None or not state.tiered:
        return result  # a policy whose KV never leaves the device keeps SGLang's own charge
    admission_pass = _admission_pass(adder, runtime)
    if id(req) not in admission_pass.running:
        remaining = max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
        charge = running_charge(controller.config, state, remaining, adder.new_token_ratio)
        admission_pass.running[id(req)] = admission_pass.host_room.device_tokens(charge)
    return min(result, admission_pass.running[id(req)])


def around_admitting(original, adder, req, *args, **kwargs):
    """``PrefillAdder.add_one_req`` and ``add_chunked_req``: the two hooks below lower the charge
    of the request being admitted when the host tier may move its KV."""
    runtime = _admission_runtime(adder)
    if runtime is None:
        return original(adder, req, *args, **kwargs)
    admission_pass = _admission_pass(adder, runtime)
    admission_pass.admitting = req if runtime.controller.planner.accepts_holes(req) else None
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        admission_pass.admitting = None


def _admitting(adder, req=None):
    """``(controller, admission pass)`` while ``req`` (default: any request) is being admitted
    with a lowered charge, else None."""
    runtime = _admission_runtime(adder)
    admission_pass = None if runtime is None else runtime.admission_passes.get(adder)
    if admission_pass is None or admission_pass.admitting is None:
        return None
    if req is not None and req is not admission_pass.admitting:
        return None
    return runtime.controller, admission_pass


def before_check_prefill_budget(adder, req, *args, **kwargs):
    """SGLang admits a request only while its prompt plus its whole remaining output
    (``total_tokens``) is below the free room; count the reservation instead of that output."""
    admitting = _admitting(adder, req)
    if admitting is None or "total_tokens" not in kwargs:
        return None
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    controller, admission_pass = admitting
    max_new = min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)
    reserved = admission_pass.reservation(controller.config, max_new, adder.new_token_ratio, take=False)
    kwargs["total_tokens"] -= max_new - reserved
    return (adder, req, *args), kwargs


def before_update_prefill_budget(adder, *args, **kwargs):
    """Lower the admitted request's reservation (``max_new_tokens``, third argument)."""
    admitting = _admitting(adder)
    if admitting is None:
        return None
    controller, admission_pass = admitting

    def reservation(max_new_tokens: int) -> int:
        return admission_pass.reservation(controller.config, max_new_tokens, adder.new_token_ratio, take=True)

    if "max_new_tokens" in kwargs:
        kwargs["max_new_tokens"] = reservation(kwargs["max_new_tokens"])
    elif len(args) >= 3:
        args = (*args[:2], reservation(args[2]), *args[3:])
    return (adder, *args), kwargs


def before_prefill_admission(scheduler, *args, **kwargs):
    tiering = _tiering_of(scheduler.req_to_token_pool)
    if tiering is not None and tiering.freed_since_admission > 0:
        tiering.freed_since_admission = 0
        running_batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
        if running_batch is not None:
            running_batch.batch_is_full = False
    return None

