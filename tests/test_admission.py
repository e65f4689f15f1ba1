"""Admission charges (``attention_backend/admission.py``): what each ``admission`` rule
reserves for new and running requests, and what the host tier's room turns back into device tokens;
and SGLang 0.5.23's own ``PrefillAdder``, with the plug-in's hooks applied, charging them through
zoomr's prefill budget (``host_tier_hooks.ZoomRPrefillBudget``)."""

from types import SimpleNamespace

import pytest

from zoomr_sglang.attention_backend.admission import (
    SUMMARY_PRIOR_TOKENS, SUMMARY_SHARE_PRIOR, HostRoom, device_tokens_per_request, new_request_charge, running_charge)
from zoomr_sglang.config import ZoomRConfig

TINY = dict(sink=4, window=64, max_thought_tokens=48)


def _state(steps: int, summary_tokens: int, resident_last: int, own_from: int = 16, bound_slots: int = 0):
    return SimpleNamespace(stats=SimpleNamespace(steps=steps, resident_last=resident_last),
                           summary_tokens=summary_tokens, own_from=own_from, bound_slots=bound_slots)


def test_bound_reserves_the_whole_working_set_and_observed_scales_it_by_sglangs_ratio():
    bound = ZoomRConfig(**TINY, admission="bound")
    observed = ZoomRConfig(**TINY, admission="observed")
    working_set = device_tokens_per_request(bound)
    assert working_set == 4 + 64 + (2 + 2 * 2 + 2) * 48
    summaries = int(1500 * SUMMARY_SHARE_PRIOR)
    assert new_request_charge(bound, 1500, ratio=0.1).device == working_set + summaries
    assert new_request_charge(observed, 1500, ratio=0.1).device == int(working_set * 0.1) + summaries
    assert new_request_charge(observed, 1500, ratio=0.7).device == int(working_set * 0.7) + summaries
    # Never more than SGLang's own charge; what is not reserved on the device goes to the host tier.
    short = new_request_charge(bound, 100, ratio=1.0)
    assert short.device == 100 and short.host == 0
    charge = new_request_charge(observed, 1500, ratio=0.1)
    assert charge.device + charge.host == 1500


def test_running_charge_follows_what_the_request_keeps():
    config = ZoomRConfig(**TINY, admission="observed")
    working_set = device_tokens_per_request(config)
    prior = SUMMARY_SHARE_PRIOR * SUMMARY_PRIOR_TOKENS
    # A fresh request is charged the prior share; the request's own share (here 30%) takes over.
    fresh = running_charge(config, _state(steps=0, summary_tokens=0, resident_last=16), 1000, ratio=0.5)
    assert fresh.device == int(working_set * 0.5) + int(1000 * SUMMARY_SHARE_PRIOR)
    shares = []
    for steps in (100, 1000, 100_000):
        charge = running_charge(config, _state(steps=steps, summary_tokens=steps * 3 // 10,
                                               resident_last=16 + 200), 1000, ratio=0.5)
        shares.append(charge.device - int((working_set - 200) * 0.5))
        assert charge.host == 1000 - shares[-1]
    assert shares[0] == int(1000 * (30 + prior) / (100 + SUMMARY_PRIOR_TOKENS))
    assert shares[0] < shares[1] < shares[2] <= 300
    # A request already at its bound adds only its summaries.
    full = running_charge(config, _state(steps=1000, summary_tokens=0, resident_last=16 + 2 * working_set), 500, 1.0)
    prior = SUMMARY_SHARE_PRIOR * SUMMARY_PRIOR_TOKENS
    assert full.device == int(500 * prior / (1000 + SUMMARY_PRIOR_TOKENS)) and full.device + full.host == 500


def test_a_request_with_page_bounds_is_charged_a_slot_per_page_it_will_complete():
    config = ZoomRConfig(**TINY, admission="observed")
    plain = running_charge(config, _state(steps=1000, summary_tokens=0, resident_last=300), 500, 0.5)
    bounded = running_charge(config, _state(steps=1000, summary_tokens=0, resident_last=300, bound_slots=20), 500, 0.5)
    assert bounded.device == plain.device + 32 and bounded.host == plain.host  # 500 tokens: 32 pages of 16


@pytest.mark.parametrize("free, expected", [(10_000, [50, 50, 50]), (1_500, [50, 50 + 500, 50 + 1000]), (0, [1050] * 3)])
def test_host_room_turns_what_does_not_fit_back_into_device_tokens(free, expected):
    room = HostRoom(free)
    charges = [SimpleNamespace(device=50, host=1000) for _ in range(3)]
    assert [room.device_tokens(c) for c in charges] == expected
    assert room.free_tokens == max(0, free - 3000)


# SGLang's PrefillAdder, driven for real: a pool whose runtime has the host tier on, one running
# request whose KV the tier moves, and a new one of 200 prompt tokens asking for 3,000 more.
NEW_TOKEN_RATIO = 0.3
HOST_BLOCKS = 1000  # free host-tier blocks of 32 tokens: room for every host part here


@pytest.fixture
def scheduler_context():
    """SGLang's default server arguments published for the test (the adder reads them), then the
    previous ones restored; every hook of the plug-in applied, as SGLang's own loading does."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import get_context

    load_plugins()
    with get_context().override_server_args():
        yield


def _adder(mode: str, available: int, accepts_holes=lambda req: True):
    from unittest.mock import MagicMock

    import torch
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from zoomr_sglang.runtime import attach

    config = ZoomRConfig(**TINY, admission=mode)
    pool = object()  # SGLang's ReqToTokenPool, as far as the runtime registry sees it
    planner = SimpleNamespace(states={0: _running_state()}, accepts_holes=accepts_holes)
    host = SimpleNamespace(free_blocks=HOST_BLOCKS, block_tokens=32)
    attach(pool, SimpleNamespace(config=config, planner=planner, tiering=SimpleNamespace(host=host)))
    tree = MagicMock(req_to_token_pool=pool, disable=False, buffer_pipeline=None)
    tree.supports_mamba.return_value = False
    tree.evictable_size.return_value = 0
    allocator = TokenToKVPoolAllocator(available, torch.float32, "cpu", None, False)
    running = SimpleNamespace(reqs=[_req("running", 100, 4000, output=600, row=0)])
    adder = PrefillAdder(page_size=1, tree_cache=tree, token_to_kv_pool_allocator=allocator, running_batch=running,
                         new_token_ratio=NEW_TOKEN_RATIO, rem_input_tokens=100_000, rem_chunk_tokens=None)
    return adder, config


def _running_state():
    return SimpleNamespace(tiered=True, stats=SimpleNamespace(steps=300, resident_last=500), summary_tokens=30,
                           own_from=16, bound_slots=0)


def _req(rid: str, prompt: int, max_new_tokens: int, output: int = 0, row=None):
    from unittest.mock import MagicMock

    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid=rid, origin_input_text="", origin_input_ids=list(range(prompt)),
              sampling_params=SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    req.full_untruncated_fill_ids = list(range(prompt))
    req.prefix_indices = torch.empty(0, dtype=torch.int64)
    req.last_node = MagicMock()
    req.output_ids = list(range(output))
    req.kv.req_pool_idx = row
    return req


def _add(adder, req):
    return adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)


@pytest.mark.parametrize("mode", ["observed", "bound"])
def test_sglangs_prefill_adder_charges_zoomrs_reservation_through_the_budget(scheduler_context, mode):
    """The running request is charged what it keeps, the new one its reservation, both out of one
    host room; the pool (2,000 slots) fits that, not SGLang's whole outputs."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    from zoomr_sglang.host_tier_hooks import ZoomRPrefillBudget

    adder, config = _adder(mode, available=2000)
    budget = adder.memory_budget
    assert isinstance(budget, ZoomRPrefillBudget)
    room = HostRoom(HOST_BLOCKS * 32)
    running = room.device_tokens(running_charge(config, _running_state(), 4000 - 600, NEW_TOKEN_RATIO))
    assert running < 3400 * NEW_TOKEN_RATIO  # SGLang's own running charge
    assert budget.total_offset == running
    new = _req("new", 200, 3000)
    assert _add(adder, new) is AddReqResult.CONTINUE and new in adder.can_run_list
    reservation = room.device_tokens(new_request_charge(config, 3000, NEW_TOKEN_RATIO))
    assert 0 < reservation < 3000 and budget.admitting is None  # only while add_one_req runs
    assert (budget.total_offset, budget.current_offset) == (running + 201 + reservation, 201)
    assert budget.host_room.free_tokens == room.free_tokens  # both host parts taken from the room


def test_a_request_the_tier_cannot_move_and_the_sglang_rule_keep_sglangs_charges(scheduler_context):
    from sglang.srt.managers.schedule_policy import AddReqResult
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    adder, _ = _adder("observed", available=20_000, accepts_holes=lambda req: False)
    before = adder.memory_budget.total_offset
    assert _add(adder, _req("dense", 200, 3000)) is AddReqResult.CONTINUE
    assert adder.memory_budget.total_offset == before + 201 + 3000
    adder, _ = _adder("sglang", available=2000)
    assert type(adder.memory_budget) is PrefillBudget  # SGLang's own budget
    assert adder.memory_budget.total_offset == 3400 * NEW_TOKEN_RATIO
    assert _add(adder, _req("new", 200, 3000)) is AddReqResult.NO_TOKEN  # its whole output does not fit


def test_the_tier_freeing_slots_reopens_sglangs_full_batch_latch():
    """``Scheduler.get_new_batch_prefill`` (hooked) clears ``batch_is_full`` before SGLang reads it,
    once per release of slots by the tier."""
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.plugins import load_plugins

    from zoomr_sglang.runtime import attach

    load_plugins()
    pool, tiering = object(), SimpleNamespace(freed_since_admission=64)
    attach(pool, SimpleNamespace(tiering=tiering))
    scheduler = Scheduler.__new__(Scheduler)  # only what get_new_batch_prefill reads
    scheduler.prefill_delayer, scheduler.req_to_token_pool = None, pool
    seen = []

    def prefill_raw(running_batch, **kwargs):  # SGLang's step that reads the latch
        seen.append(running_batch.batch_is_full)
        return None, running_batch

    scheduler._get_new_batch_prefill_raw = prefill_raw
    batch = SimpleNamespace(batch_is_full=True)
    scheduler.get_new_batch_prefill(batch)
    batch.batch_is_full = True
    scheduler.get_new_batch_prefill(batch)
    assert seen == [False, True] and tiering.freed_since_admission == 0
