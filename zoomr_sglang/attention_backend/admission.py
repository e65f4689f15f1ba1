"""How many device KV tokens a ZoomR request may still need: what SGLang's admission charges it.

With the host tier on, a request's device footprint is bounded by its working set, not by its
output length; the plug-in's admission hooks (``host_tier_hooks.py``) charge these numbers.
"""

from __future__ import annotations

from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.config import ZoomRConfig

# Share of output tokens assumed to be summaries before a request has shown its own.
SUMMARY_SHARE_PRIOR = 0.1


def device_tokens_per_request(config: ZoomRConfig) -> int:
    """Output tokens a request keeps on the device besides its summaries: sinks, window, the
    open region, the selection and the zoom cache, plus headroom for one round of zoom-ins."""
    thoughts = 2 + 2 * config.num_thoughts + config.zoom_cache
    return config.sink + config.window + thoughts * config.max_thought_tokens


def future_device_tokens(config: ZoomRConfig, state: RequestState, remaining: int) -> int:
    """Device tokens a running request may still add: up to the per-request bound, plus its
    summaries at the share they took so far (a prior of 10% until it has written 512 tokens)."""
    written = state.stats.steps
    summary_share = state.summary_tokens / written if written >= 512 else SUMMARY_SHARE_PRIOR
    resident_output = max(state.stats.resident_last - state.own_from, 0)
    return max(0, device_tokens_per_request(config) - resident_output) + int(remaining * summary_share)


def reservation_for_new_request(config: ZoomRConfig, max_new_tokens: int) -> int:
    return min(max_new_tokens, device_tokens_per_request(config) + int(max_new_tokens * SUMMARY_SHARE_PRIOR))
