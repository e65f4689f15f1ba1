"""What SGLang's admission charges a ZoomR request whose KV the host tier may move.

SGLang charges a running request the output it may still write (``max_new_tokens`` minus its
output) and a new one its whole ``max_new_tokens``. With the host tier on, a request's device
footprint is its working set plus its summaries, not its output. The ``admission`` key of
``ZOOMR_CONFIG`` chooses what is charged instead (``host_tier_hooks.ZoomRPrefillBudget``, SGLang's
prefill budget, applies it; docs/host-tier.md):

- ``observed`` (default): the growth expected from what the request really keeps: its summaries
  at the share they took so far, plus SGLang's ``new_token_ratio`` (its own over-admission
  estimate, lowered while nothing is retracted and raised by every retraction) times the room
  left below the working-set bound. A retraction is the safety valve; through the zoomr tree a
  retracted request keeps its thought structure, so it keeps its saving.
- ``bound``: the whole room below the working-set bound plus the summaries: admitted requests can
  never need a retraction for their working set.
- ``sglang``: SGLang's own charge.

What leaves the device must fit in the host tier: the output a request will still send there
(its remaining tokens less its summaries) is taken from the tier's free room, and whatever does
not fit stays charged to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoomr_sglang.algo.page_bounds import PAGE_TOKENS
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.config import ZoomRConfig

# Share of output tokens assumed to be summaries before a request has shown its own, and how many
# output tokens that assumption weighs against what the request has written.
SUMMARY_SHARE_PRIOR = 0.1
SUMMARY_PRIOR_TOKENS = 512


def device_tokens_per_request(config: ZoomRConfig) -> int:
    """The working-set bound: output tokens a request keeps on the device besides its summaries:
    sinks, window, the open region, the selection and the zoom cache, plus one round of zoom-ins."""
    thoughts = 2 + 2 * config.num_thoughts + config.zoom_cache
    return config.sink + config.window + thoughts * config.max_thought_tokens


def summary_share(state: RequestState) -> float:
    """The request's share of summary tokens so far, starting from the prior."""
    prior = SUMMARY_SHARE_PRIOR * SUMMARY_PRIOR_TOKENS
    return (state.summary_tokens + prior) / (state.stats.steps + SUMMARY_PRIOR_TOKENS)


@dataclass
class Charge:
    """One request's admission charge: ``device`` tokens it may still add to SGLang's pool, of
    which ``host`` may leave for the host tier instead (if the tier has room)."""

    device: int
    host: int


def working_set_room(config: ZoomRConfig, resident_output: int, ratio: float) -> int:
    """The share of the room left below the working-set bound that admission reserves."""
    room = max(0, device_tokens_per_request(config) - resident_output)
    return room if config.admission == "bound" else int(room * ratio)


def running_charge(config: ZoomRConfig, state: RequestState, remaining: int, ratio: float) -> Charge:
    """A running request with ``remaining`` output tokens to write; ``ratio``: SGLang's
    ``new_token_ratio``. A request whose pages hold key bounds (``state.bound_slots``: the fine
    levels) takes one more device slot per page it completes, whatever the tier moves."""
    share = summary_share(state)
    resident_output = max(state.stats.resident_last - state.own_from, 0)
    summaries = int(remaining * share)
    bounds = -(-remaining // PAGE_TOKENS) if state.bound_slots else 0
    return Charge(device=working_set_room(config, resident_output, ratio) + summaries + bounds,
                  host=remaining - summaries)


def new_request_charge(config: ZoomRConfig, max_new_tokens: int, ratio: float) -> Charge:
    """A request being admitted: nothing of its output is resident yet."""
    summaries = int(max_new_tokens * SUMMARY_SHARE_PRIOR)
    device = min(max_new_tokens, working_set_room(config, 0, ratio) + summaries)
    return Charge(device=device, host=max_new_tokens - device)


class HostRoom:
    """The host tier's free tokens, handed out to one admission pass's charges in turn."""

    def __init__(self, free_tokens: int) -> None:
        self.free_tokens = free_tokens

    def device_tokens(self, charge: Charge, take: bool = True) -> int:
        """Device tokens to charge: ``charge.device`` plus the part of ``charge.host`` that the
        host tier has no room left for (it would stay on the device); ``take``: that room is
        handed out (else only asked about)."""
        fits = min(charge.host, self.free_tokens)
        if take:
            self.free_tokens -= fits
        return charge.device + charge.host - fits
