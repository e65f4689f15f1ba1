"""A request whose step zoomr cannot plan fails alone: through the CPU backend with SGLang's real
pools, the step still runs, the failing request is reported for abort with its error (the plug-in
finishes it with HTTP 500), the other requests decode exactly as they do without it, and every
count (KV slots, host tier, index entries) returns when the rows are released."""

from __future__ import annotations

import random

import torch

from backend_harness import Harness, scripted_tokens
from zoomr_sglang.config import ZoomRConfig

CONFIG = ZoomRConfig(sink=2, window=8, max_thought_tokens=24, refresh_interval=8, num_thoughts=1)
STEPS = 60


def run(fail_at: int = -1):
    """Three requests for STEPS steps; with ``fail_at`` >= 0 the second one's segmenter raises from
    that step on. Returns the outputs of requests 0 and 2, the failures reported, the counts at the
    start and after release, and the second request's id."""
    harness = Harness(CONFIG, seed=3, host_tier_tokens=4096)
    start = (harness.allocator.available_size(), harness.controller.index_keys.num_live)
    for prompt_len in (5, 9, 7):
        harness.add_request(prompt_len)
    harness_rid = harness.reqs[1].rid
    scripts = [scripted_tokens(random.Random(seed), STEPS, summaries=True) for seed in range(3)]
    outputs, failures = [], []
    for step in range(STEPS):
        if step == fail_at:
            def broken(*args, **kwargs):
                raise RuntimeError("segmenter state corrupted")

            segmenter = harness.states[harness.rows[1]].segmenter
            segmenter.feed_quiet = segmenter.feed = segmenter.extend_body = broken  # full and quiet steps
        _, layers = harness.decode_step([script[step] for script in scripts])
        failures += [(req.rid, message) for req, message in harness.plan.failed]
        outputs.append(torch.stack([out[[0, 2]] for *_, out in layers]))
    tier = harness.controller.tiering
    harness.release_all()
    counts = (harness.allocator.available_size(), harness.controller.index_keys.num_live, tier.host.num_used)
    return torch.stack(outputs), failures, start, counts, harness_rid


def test_a_request_whose_planning_raises_fails_alone():
    reference, none, start, counts, _ = run()
    assert none == [] and counts == (*start, 0)
    outputs, failures, start, counts, failing = run(fail_at=30)
    assert [rid for rid, _ in failures] == [failing]  # once: its next step starts from a fresh state
    assert all("RuntimeError: segmenter state corrupted" in message for _, message in failures)
    torch.testing.assert_close(outputs, reference, rtol=0, atol=0)  # the others: bit for bit
    assert counts == (*start, 0)
