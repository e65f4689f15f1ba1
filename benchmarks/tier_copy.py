#!/usr/bin/env python
"""Host-tier copy speed: one whole thought's KV moved between a device KV pool and the host tier.

    python benchmarks/tier_copy.py                 # a few seconds; on CUDA when a GPU is present
    python benchmarks/tier_copy.py --device cpu

At Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token) a 300-token
thought is evicted (device pool -> host tier, ``HostKVTier.store``) and zoomed into again (host tier
-> device pool, ``HostKVTier.load``). The device pool is SGLang-like, per-layer buffers
``[slots, heads, dim]`` with the thought's device slots drawn at random; the host tier has seen
churn (thoughts of random sizes allocated and half of them freed), so a thought's host slots come
in several runs of whole blocks, as in a server that has run a while.

``tier_copy_gbps``: bytes moved per second of copy time, both directions together (median over the
repeats). On the CPU a copy is synchronous; on CUDA its time runs from issuing it to its event
completing (``Transfer.wait``), and ``issue_us`` is the host time the planning step spends issuing
both copies (what a decode step would see). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zoomr_sglang.attention_backend.host_tier import HostKVTier, contiguous_runs  # noqa: E402

LLAMA_8B = dict(num_layers=32, num_kv_heads=8, head_dim=128)


def _device_pool(slots: int, device: str, dtype: torch.dtype, num_layers: int, num_kv_heads: int, head_dim: int):
    """SGLang's ``MHATokenToKVPool`` buffers: one ``[slots, heads, dim]`` tensor per layer for K and V."""
    keys = [torch.randn(slots, num_kv_heads, head_dim, device=device).to(dtype) for _ in range(num_layers)]
    values = [torch.randn(slots, num_kv_heads, head_dim, device=device).to(dtype) for _ in range(num_layers)]
    return SimpleNamespace(get_key_buffer=keys.__getitem__, get_value_buffer=values.__getitem__)


def _churn(host: HostKVTier, generator: torch.Generator, thought_tokens: int) -> None:
    """Fill the tier with thoughts of random sizes, then free every other one: later thoughts get
    the freed blocks, in several runs."""
    held = []
    while True:
        slots = host.alloc(int(torch.randint(thought_tokens // 4, thought_tokens, (1,), generator=generator)))
        if slots is None:
            break
        held.append(slots)
    for slots in held[::2]:
        host.free(slots)


def _timed(copy, device: str):
    """(seconds until the copy is done, seconds to issue it)."""
    if device == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    transfer = copy()
    issued = time.perf_counter()
    transfer.wait()
    return time.perf_counter() - begin, issued - begin


def measure_tier_copy(device: str, *, thought_tokens: int = 300, repeats: int = 7, pool_tokens: int = 2048,
                      host_tokens: int = 2048, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      **shape) -> dict:
    """Evict and zoom into one ``thought_tokens`` thought ``repeats`` times; medians of the speeds."""
    shape = {**LLAMA_8B, **shape}
    generator = torch.Generator().manual_seed(seed)
    pool = _device_pool(pool_tokens, device, dtype, **shape)
    host = HostKVTier(dtype=dtype, v_head_dim=shape["head_dim"], capacity_tokens=host_tokens,
                      pin_memory=device == "cuda", **shape)
    host.k.zero_(), host.v.zero_()  # every page touched once, as in a server that has run a while
    _churn(host, generator, thought_tokens)
    moved = thought_tokens * host.token_bytes
    both, evict, zoom_in, issue, runs = [], [], [], [], []
    for repeat in range(repeats + 1):  # the first is a warm-up (caches, the side stream)
        order = torch.randperm(pool_tokens, generator=generator).to(device)
        source, target = order[:thought_tokens], order[thought_tokens:2 * thought_tokens]
        host_slots = host.alloc(thought_tokens)
        out_s, out_issue = _timed(lambda: host.store(pool, source, host_slots), device)
        in_s, in_issue = _timed(lambda: host.load(pool, host_slots, target), device)
        host.free(host_slots)
        if repeat:
            both.append(2 * moved / (out_s + in_s) / 1e9)
            evict.append(moved / out_s / 1e9)
            zoom_in.append(moved / in_s / 1e9)
            issue.append((out_issue + in_issue) * 1e6)
            runs.append(len(contiguous_runs(host_slots)))
    return {
        "device": device, "thought_tokens": thought_tokens, "bytes_per_move": moved,
        "tier_copy_gbps": round(statistics.median(both), 2), "evict_gbps": round(statistics.median(evict), 2),
        "zoom_in_gbps": round(statistics.median(zoom_in), 2), "issue_us": round(statistics.median(issue), 1),
        "host_runs_per_thought": statistics.median(runs),
    }


def measure_tier_copy_gbps(device: str, **kwargs) -> float:
    """``tier_copy_gbps`` of :func:`measure_tier_copy` as this script measures it alone, with
    torch's threads for the machine's cores (``benchmarks/decode_step.py`` reports it from a process
    that runs SGLang's CPU engine setting of one thread: on a GPU a copy is the DMA engine's work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return measure_tier_copy(device, **kwargs)["tier_copy_gbps"]
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--thought-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    result = measure_tier_copy(args.device, thought_tokens=args.thought_tokens, repeats=args.repeats)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
