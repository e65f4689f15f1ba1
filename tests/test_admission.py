"""Admission charges (``attention_backend/admission.py``): what each ``ZOOMR_ADMISSION`` rule
reserves for new and running requests, and what the host tier's room turns back into device tokens."""

from types import SimpleNamespace

import pytest

from zoomr_sglang.attention_backend.admission import (
    SUMMARY_PRIOR_TOKENS, SUMMARY_SHARE_PRIOR, HostRoom, device_tokens_per_request, new_request_charge, running_charge)
from zoomr_sglang.config import ZoomRConfig

TINY = dict(sink=4, window=64, max_thought_tokens=48)


def _state(steps: int, summary_tokens: int, resident_last: int, own_from: int = 16):
    return SimpleNamespace(stats=SimpleNamespace(steps=steps, resident_last=resident_last),
                           summary_tokens=summary_tokens, own_from=own_from)


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


@pytest.mark.parametrize("free, expected", [(10_000, [50, 50, 50]), (1_500, [50, 50 + 500, 50 + 1000]), (0, [1050] * 3)])
def test_host_room_turns_what_does_not_fit_back_into_device_tokens(free, expected):
    room = HostRoom(free)
    charges = [SimpleNamespace(device=50, host=1000) for _ in range(3)]
    assert [room.device_tokens(c) for c in charges] == expected
    assert room.free_tokens == max(0, free - 3000)
