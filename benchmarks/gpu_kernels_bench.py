#!/usr/bin/env python
"""Kernel-level ZoomR benchmark on one GPU, without SGLang or FlashInfer (torch + triton only).

Three sections, timed side by side in one run:

* ``attention``: one decode step of one layer, dense (every position) vs ZoomR sparse (a working
  set of 10% / 20% of the sequence built like ZoomR's: sinks, zoomed-in thought spans, the recent
  window). Both gather K/V by slot and call ``torch.nn.functional.scaled_dot_product_attention``
  on the gathered KV; the sparse step also builds its slot list with ``ranges_to_kv_indices``.
  Batch 16, 32 query heads / 8 KV heads, head_dim 128, seq lens 4K/16K/32K, fp16 and bf16.
  Rows: ``total`` (wall clock per step, host work included: the sparse index build on the host and
  device, gather, SDPA), ``sdpa`` (SDPA alone on pre-gathered KV), and
  ``loop`` (``gather_decode_attention``, the per-request loop the CPU backend runs).
* ``kv_indices``: the Triton ``ranges_to_kv_indices`` against the gather it replaced in
  ``ZoomRController.plan_decode`` (positions built on the host, copied, advanced indexing), both
  end to end per step (host work + copy + kernel, wall clock) and device-only (CUDA events).
* ``scoring``: the index-key work per decode step and layer: adding the committed keys to their
  entries, and for every voting request the mean index keys, ``score_thoughts`` and
  ``head_votes`` (exactly what ``ZoomRController.after_attention`` runs), plus x num_layers.

Before timing it checks correctness on the same device (Triton vs torch indices, sparse output vs
the float64 masked reference, the algorithm on the device vs the CPU); ``--check`` runs only the
checks. ``--smoke`` runs everything with tiny sizes (CPU is fine; CI uses it). Prints a table and
ends with one JSON line ``{"device": ..., "results": [...], ...}``; ``--json PATH`` also writes it.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare checkout

from zoomr_sglang.algo.index_keys import IndexKeyStore  # noqa: E402
from zoomr_sglang.algo.reference import gather_decode_attention, masked_decode_reference  # noqa: E402
from zoomr_sglang.algo.voting import head_votes, score_thoughts  # noqa: E402
from zoomr_sglang.algo.working_set import ranges_to_positions  # noqa: E402
from zoomr_sglang.kernels import kv_indices as kvi  # noqa: E402

Range = Tuple[int, int]

FULL = dict(
    batch=16, num_heads=32, num_kv_heads=8, head_dim=128, seq_lens=[4096, 16384, 32768],
    dtypes=["float16", "bfloat16"], fractions=[0.10, 0.20], warmup=5, iters=30,
    kv_batches=[16, 128], kv_seq_lens=[4096, 32768], kv_fraction=0.15,
    num_layers=32, n_thoughts=[64, 256], topk=2, sink=64, window=512, thought_len=(128, 512),
)
SMOKE = dict(
    batch=2, num_heads=4, num_kv_heads=2, head_dim=16, seq_lens=[64, 96],
    dtypes=["float32"], fractions=[0.2], warmup=1, iters=2,
    kv_batches=[3], kv_seq_lens=[96], kv_fraction=0.3,
    num_layers=2, n_thoughts=[5], topk=2, sink=4, window=8, thought_len=(5, 12),
)


# -- timing --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn, measured with CUDA events on a GPU (device time), wall clock on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def try_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> Optional[float]:
    """time_device, or None (with the traceback printed) when fn fails, e.g. on an older torch."""
    try:
        return time_device(fn, device, warmup, iters)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return None


def time_wall(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall-clock milliseconds of fn followed by a device sync (host work included)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- workloads -----------------------------------------------------------------------------------
def working_set(rng: random.Random, seq_len: int, budget: int, sink: int, window: int,
                thought_len: Tuple[int, int]) -> List[Range]:
    """Sorted disjoint ranges of exactly ``budget`` positions: sinks, the recent window and random
    whole thoughts (spans of ``thought_len`` tokens) from the middle, the last one cut to fit."""
    budget = max(1, min(budget, seq_len))
    sink = min(sink, budget)
    window = min(window, budget - sink, seq_len - sink)
    ranges = [(0, sink)] if sink else []
    if window:
        ranges.append((seq_len - window, seq_len))
    thoughts, cursor = [], sink
    while cursor < seq_len - window:
        end = min(cursor + rng.randint(*thought_len), seq_len - window)
        thoughts.append((cursor, end))
        cursor = end
    rng.shuffle(thoughts)
    remaining = budget - sink - window
    for start, end in thoughts:
        if remaining <= 0:
            break
        take = min(end - start, remaining)
        ranges.append((start, start + take))
        remaining -= take
    return sorted(ranges)


def slot_table(batch: int, seq_len: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """req_to_token ``[batch, seq_len]`` int32: every request's slots scattered over the pool (slot 0
    is SGLang's padding slot and never used), as after a while of serving."""
    slots = torch.randperm(batch * seq_len, generator=gen, device="cpu") + 1
    return slots.view(batch, seq_len).to(torch.int32).to(device)


def build_indices(table: torch.Tensor, rows: List[int], ranges: List[List[Range]]):
    """Controller-style: host flatten, one stacked copy, the dispatcher."""
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = kvi.flatten_ranges(rows, ranges)
    packed = torch.stack([range_rows, range_starts, range_lens, out_offsets]).to(table.device, non_blocking=True)
    return kv_indptr, kvi.ranges_to_kv_indices(table, packed[0], packed[1], packed[2], packed[3], int(kv_indptr[-1]))


def old_gather_indices(table: torch.Tensor, rows: List[int], ranges: List[List[Range]]):
    """The per-position gather ``plan_decode`` ran before: positions on the host, copied, indexed."""
    lengths = torch.tensor([sum(e - s for s, e in r) for r in ranges], dtype=torch.int64)
    positions = torch.cat([ranges_to_positions(r) for r in ranges])
    row_of_position = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    return table[row_of_position.to(table.device, non_blocking=True),
                 positions.to(table.device, non_blocking=True)].to(torch.int32)


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """query ``[bs, H, 1, D]``, keys/values ``[bs, G, n, D]`` -> ``[bs, H, 1, D]`` (GQA when G < H)."""
    if query.shape[1] == keys.shape[1]:
        return scaled_dot_product_attention(query, keys, values, scale=scaling)
    try:
        return scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa
        group = query.shape[1] // keys.shape[1]
        return scaled_dot_product_attention(query, keys.repeat_interleave(group, 1),
                                            values.repeat_interleave(group, 1), scale=scaling)


def batched_sdpa(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """query ``[bs, H, D]``; slots ``[bs, n]`` (same n per request): gather then one SDPA call."""
    bs, n = slots.shape
    keys = k_cache[slots.reshape(-1)].view(bs, n, *k_cache.shape[1:]).transpose(1, 2)
    values = v_cache[slots.reshape(-1)].view(bs, n, *v_cache.shape[1:]).transpose(1, 2)
    return sdpa(query.unsqueeze(2), keys, values, scaling).squeeze(2)


# -- checks --------------------------------------------------------------------------------------
def run_checks(device: torch.device, p: dict) -> List[dict]:
    """Correctness on ``device``; each entry ``{"name", "ok", "detail"}``."""
    checks: List[dict] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            checks.append(dict(name=name, ok=True, detail=detail))
        except Exception as exc:  # noqa: BLE001 - report every failure, keep going
            checks.append(dict(name=name, ok=False, detail=f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()

    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)

    def kv_indices_odd_sizes() -> str:
        table = torch.randint(0, 2**31 - 1, (5, 300), generator=gen, dtype=torch.int32).to(device)
        rows = [4, 1, 2]
        ranges = [[(0, 1), (5, 102), (102, 110), (299, 300)], [(7, 7), (200, 300)], [(0, 300)]]
        _, got = build_indices(table, rows, ranges)
        expected = torch.cat([table[r, s:e] for r, rr in zip(rows, ranges) for s, e in rr])
        assert got.dtype == torch.int32 and torch.equal(got, expected), "mismatch"
        return f"impl={impl_name(device)} n={got.numel()}"

    def kv_indices_random() -> str:
        n_cases = 0
        for seq_len in p["kv_seq_lens"]:
            for batch in p["kv_batches"]:
                table = slot_table(batch, seq_len, device, gen)
                ranges = [working_set(rng, seq_len, int(seq_len * p["kv_fraction"]), p["sink"], p["window"],
                                      p["thought_len"]) for _ in range(batch)]
                rows = list(range(batch))
                _, got = build_indices(table, rows, ranges)
                assert torch.equal(got, old_gather_indices(table, rows, ranges)), f"mismatch bs={batch} seq={seq_len}"
                n_cases += 1
        return f"{n_cases} cases"

    def sparse_attention_vs_reference() -> str:
        dims = dict(H=p["num_heads"], G=p["num_kv_heads"], D=p["head_dim"])
        bs, seq_len = 3, p["seq_lens"][0]
        worst = 0.0
        for dtype_name in p["dtypes"]:
            dtype = getattr(torch, dtype_name)
            table = slot_table(bs, seq_len, device, gen)
            k_cache = torch.randn(bs * seq_len + 1, dims["G"], dims["D"], generator=gen).to(dtype).to(device)
            v_cache = torch.randn(bs * seq_len + 1, dims["G"], dims["D"], generator=gen).to(dtype).to(device)
            query = torch.randn(bs, dims["H"], dims["D"], generator=gen).to(dtype).to(device)
            ranges = [working_set(rng, seq_len, max(1, int(seq_len * f)), p["sink"], p["window"], p["thought_len"])
                      for f in (0.1, 0.2, 1.0)]
            kv_indptr, kv_indices = build_indices(table, list(range(bs)), ranges)
            scaling = dims["D"] ** -0.5
            out = gather_decode_attention(query, k_cache, v_cache, kv_indptr, kv_indices, scaling)
            tol = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype_name]
            for i in range(bs):
                slots = table[i].long()
                keep = torch.zeros(seq_len, dtype=torch.bool, device=device)
                for s, e in ranges[i]:
                    keep[s:e] = True
                expected = masked_decode_reference(query[i], k_cache[slots], v_cache[slots], keep, scaling)
                err = float((out[i].double() - expected).abs().max())
                assert err <= tol, f"{dtype_name} request {i}: max error {err:.3g} > {tol}"
                worst = max(worst, err / tol)
            # The batched path the benchmark times equals the loop (same working-set size per request).
            same = [working_set(rng, seq_len, seq_len // 5, p["sink"], p["window"], p["thought_len"]) for _ in range(bs)]
            kv_indptr, kv_indices = build_indices(table, list(range(bs)), same)
            loop = gather_decode_attention(query, k_cache, v_cache, kv_indptr, kv_indices, scaling)
            batched = batched_sdpa(query, k_cache, v_cache, kv_indices.long().view(bs, -1), scaling)
            torch.testing.assert_close(batched.float(), loop.float(), rtol=tol, atol=tol)
        return f"worst error / tolerance = {worst:.3f}"

    def algorithm_on_device_vs_cpu() -> str:
        G, D, H = p["num_kv_heads"], p["head_dim"], p["num_heads"]
        cpu_store = IndexKeyStore(2, G, D, "cpu", initial_capacity=2)
        dev_store = IndexKeyStore(2, G, D, device, initial_capacity=2)
        ids = [cpu_store.alloc() for _ in range(p["n_thoughts"][0])]
        assert [dev_store.alloc() for _ in ids] == ids
        for layer in range(2):
            entries = torch.tensor(ids)[torch.randint(0, len(ids), (200,), generator=gen)]
            keys = torch.randn(200, G, D, generator=gen).to(torch.bfloat16)
            cpu_store.add(layer, entries, keys)
            dev_store.add(layer, entries.to(device), keys.to(device))
        id_t = torch.tensor(ids)
        cpu_means = cpu_store.means(1, id_t)
        dev_means = dev_store.means(1, id_t.to(device))
        torch.testing.assert_close(dev_means.cpu(), cpu_means, rtol=1e-5, atol=1e-5)
        query = torch.randn(H, D, generator=gen).to(torch.bfloat16)
        dev_scores = score_thoughts(query.to(device), dev_means)
        torch.testing.assert_close(dev_scores.cpu(), score_thoughts(query, cpu_means), rtol=1e-3, atol=2e-2)
        dev_votes, dev_sums = head_votes(dev_scores, p["topk"])
        cpu_votes, cpu_sums = head_votes(dev_scores.cpu(), p["topk"])
        assert torch.equal(dev_votes.cpu(), cpu_votes), "votes differ"
        torch.testing.assert_close(dev_sums.cpu(), cpu_sums, rtol=1e-5, atol=1e-4)
        return f"{len(ids)} thoughts"

    check("kv_indices_odd_sizes", kv_indices_odd_sizes)
    check("kv_indices_vs_old_gather", kv_indices_random)
    check("sparse_attention_vs_masked_reference", sparse_attention_vs_reference)
    check("algorithm_on_device_vs_cpu", algorithm_on_device_vs_cpu)
    return checks


def impl_name(device: torch.device) -> str:
    """What ranges_to_kv_indices runs on this device."""
    if kvi.triton_available() and (device.type == "cuda" or kvi.triton_interpreted()):
        return "triton-interpreter" if kvi.triton_interpreted() else "triton"
    return "torch"


# -- benchmarks ----------------------------------------------------------------------------------
def bench_attention(device: torch.device, p: dict, results: List[dict]) -> None:
    H, G, D, bs = p["num_heads"], p["num_kv_heads"], p["head_dim"], p["batch"]
    scaling = D**-0.5
    for seq_len in p["seq_lens"]:
        gen = torch.Generator(device=device).manual_seed(seq_len)
        table = slot_table(bs, seq_len, device, torch.Generator().manual_seed(seq_len))
        rng = random.Random(seq_len)
        sets = {f: [working_set(rng, seq_len, int(round(seq_len * f)), p["sink"], p["window"], p["thought_len"])
                    for _ in range(bs)] for f in p["fractions"]}
        for dtype_name in p["dtypes"]:
            dtype = getattr(torch, dtype_name)
            k_cache = torch.randn(bs * seq_len + 1, G, D, device=device, generator=gen, dtype=dtype)
            v_cache = torch.randn(bs * seq_len + 1, G, D, device=device, generator=gen, dtype=dtype)
            query = torch.randn(bs, H, D, device=device, generator=gen, dtype=dtype)
            dense_slots = table.long()
            dense_indptr = torch.arange(0, bs * seq_len + 1, seq_len, dtype=torch.int32)
            dense_flat = table.reshape(-1)
            base = dict(section="attention", seq_len=seq_len, dtype=dtype_name, batch=bs, heads=f"{H}/{G}", head_dim=D)

            def dense_total():
                return batched_sdpa(query, k_cache, v_cache, table.long(), scaling)

            k_dense = k_cache[dense_slots.reshape(-1)].view(bs, seq_len, G, D).transpose(1, 2)
            v_dense = v_cache[dense_slots.reshape(-1)].view(bs, seq_len, G, D).transpose(1, 2)

            def dense_sdpa():
                return sdpa(query.unsqueeze(2), k_dense, v_dense, scaling)

            dense = dict(base, mode="dense", fraction=1.0, attended=seq_len,
                         total_ms=time_wall(dense_total, device, p["warmup"], p["iters"]),
                         sdpa_ms=time_device(dense_sdpa, device, p["warmup"], p["iters"]),
                         loop_ms=try_time(lambda: gather_decode_attention(query, k_cache, v_cache, dense_indptr,
                                                                           dense_flat, scaling),
                                          device, p["warmup"], max(1, p["iters"] // 3)))
            del k_dense, v_dense
            results.append(dense)
            for fraction, ranges in sets.items():
                rows = list(range(bs))
                kv_indptr, kv_indices = build_indices(table, rows, ranges)
                per_request = int(kv_indptr[1])
                sparse_slots = kv_indices.long().view(bs, per_request)
                k_sparse = k_cache[sparse_slots.reshape(-1)].view(bs, per_request, G, D).transpose(1, 2)
                v_sparse = v_cache[sparse_slots.reshape(-1)].view(bs, per_request, G, D).transpose(1, 2)

                def sparse_total():
                    _, idx = build_indices(table, rows, ranges)
                    return batched_sdpa(query, k_cache, v_cache, idx.long().view(bs, per_request), scaling)

                def sparse_sdpa():
                    return sdpa(query.unsqueeze(2), k_sparse, v_sparse, scaling)

                row = dict(base, mode="sparse", fraction=fraction, attended=per_request,
                           ranges_per_request=round(sum(len(r) for r in ranges) / bs, 1),
                           total_ms=time_wall(sparse_total, device, p["warmup"], p["iters"]),
                           sdpa_ms=time_device(sparse_sdpa, device, p["warmup"], p["iters"]),
                           loop_ms=try_time(lambda: gather_decode_attention(query, k_cache, v_cache, kv_indptr,
                                                                             kv_indices, scaling),
                                            device, p["warmup"], max(1, p["iters"] // 3)))
                row["speedup_total"] = round(dense["total_ms"] / row["total_ms"], 2)
                row["speedup_sdpa"] = round(dense["sdpa_ms"] / row["sdpa_ms"], 2)
                if dense["loop_ms"] is not None and row["loop_ms"] is not None:
                    row["speedup_loop"] = round(dense["loop_ms"] / row["loop_ms"], 2)
                results.append(row)
                del k_sparse, v_sparse
            del k_cache, v_cache
            if device.type == "cuda":
                torch.cuda.empty_cache()


def bench_kv_indices(device: torch.device, p: dict, results: List[dict]) -> None:
    for seq_len in p["kv_seq_lens"]:
        for batch in p["kv_batches"]:
            table = slot_table(batch, seq_len, device, torch.Generator().manual_seed(batch + seq_len))
            rng = random.Random(batch * seq_len)
            ranges = [working_set(rng, seq_len, int(seq_len * p["kv_fraction"]), p["sink"], p["window"],
                                  p["thought_len"]) for _ in range(batch)]
            rows = list(range(batch))
            range_rows, range_starts, range_lens, out_offsets, kv_indptr = kvi.flatten_ranges(rows, ranges)
            total = int(kv_indptr[-1])
            dev_args = [t.to(device) for t in (range_rows, range_starts, range_lens, out_offsets)]
            lengths = torch.tensor([sum(e - s for s, e in r) for r in ranges], dtype=torch.int64)
            rows_d = torch.repeat_interleave(torch.tensor(rows), lengths).to(device)
            pos_d = torch.cat([ranges_to_positions(r) for r in ranges]).to(device)
            row = dict(section="kv_indices", seq_len=seq_len, batch=batch, fraction=p["kv_fraction"], nnz=total,
                       n_ranges=int(range_rows.numel()), impl=impl_name(device))
            row["new_step_ms"] = time_wall(lambda: build_indices(table, rows, ranges), device, p["warmup"], p["iters"])
            row["old_step_ms"] = time_wall(lambda: old_gather_indices(table, rows, ranges), device, p["warmup"], p["iters"])
            row["host_flatten_ms"] = time_wall(lambda: kvi.flatten_ranges(rows, ranges), torch.device("cpu"),
                                               p["warmup"], p["iters"])
            row["kernel_ms"] = time_device(lambda: kvi.ranges_to_kv_indices(table, *dev_args, total), device,
                                           p["warmup"], p["iters"])
            row["torch_ref_ms"] = time_device(lambda: kvi.ranges_to_kv_indices_torch(table, *dev_args, total), device,
                                              p["warmup"], p["iters"])
            row["torch_gather_ms"] = time_device(lambda: table[rows_d, pos_d].to(torch.int32), device,
                                                 p["warmup"], p["iters"])
            row["speedup_step"] = round(row["old_step_ms"] / row["new_step_ms"], 2)
            results.append(row)


def bench_scoring(device: torch.device, p: dict, results: List[dict]) -> None:
    G, D, H, bs = p["num_kv_heads"], p["head_dim"], p["num_heads"], p["batch"]
    gen = torch.Generator(device=device).manual_seed(1)
    for n_thoughts in p["n_thoughts"]:
        layers = 2  # per-layer cost does not depend on the layer; x num_layers below
        store = IndexKeyStore(layers, G, D, device, initial_capacity=64)
        candidates = []
        for _ in range(bs):
            ids = [store.alloc() for _ in range(n_thoughts)]
            candidates.append(torch.tensor(ids, dtype=torch.int64, device=device))
        all_ids = torch.cat(candidates)
        for layer in range(layers):  # every entry holds some keys
            store.add(layer, all_ids.repeat(4), torch.randn(4 * all_ids.numel(), G, D, device=device, generator=gen,
                                                            dtype=torch.bfloat16))
        query = torch.randn(bs, H, D, device=device, generator=gen, dtype=torch.bfloat16)
        commit_entries = all_ids[torch.randint(0, all_ids.numel(), (bs,), device=device, generator=gen)]
        commit_keys = torch.randn(bs, G, D, device=device, generator=gen, dtype=torch.bfloat16)
        votes = [torch.zeros(n_thoughts, dtype=torch.int64, device=device) for _ in range(bs)]
        sums = [torch.zeros(n_thoughts, dtype=torch.float32, device=device) for _ in range(bs)]

        def commit():
            store.add(1, commit_entries, commit_keys)

        def vote_all():  # ZoomRController.after_attention's loop, every request voting
            for i in range(bs):
                keys = store.means(1, candidates[i])
                scores = score_thoughts(query[i].float(), keys)
                v, s = head_votes(scores, p["topk"])
                votes[i] += v
                sums[i] += s

        row = dict(section="scoring", batch=bs, n_thoughts=n_thoughts, heads=f"{H}/{G}", head_dim=D,
                   topk=p["topk"], num_layers=p["num_layers"])
        row["commit_layer_ms"] = time_device(commit, device, p["warmup"], p["iters"])
        row["vote_layer_ms"] = time_device(vote_all, device, p["warmup"], p["iters"])
        row["vote_layer_wall_ms"] = time_wall(vote_all, device, p["warmup"], p["iters"])
        row["vote_step_ms"] = round(row["vote_layer_wall_ms"] * p["num_layers"], 3)
        row["commit_step_ms"] = round(row["commit_layer_ms"] * p["num_layers"], 3)
        results.append(row)


# -- output --------------------------------------------------------------------------------------
def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(rows: List[dict], columns: List[str], title: str) -> None:
    if not rows:
        return
    print(f"\n== {title}")
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU; for CI)")
    parser.add_argument("--check", action="store_true", help="correctness checks only, no timing")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--sections", default="attention,kv_indices,scoring",
                        help="comma-separated subset of attention,kv_indices,scoring")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    parser.add_argument("--json", default=None, help="also write the final JSON object to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = dict(SMOKE if args.smoke else FULL)
    if args.iters is not None:
        p["iters"] = max(1, args.iters)
    mode = "check" if args.check else ("smoke" if args.smoke else "full")
    started = time.perf_counter()
    triton_version = None
    if kvi.triton_available():
        import triton

        triton_version = triton.__version__
    print(f"device: {device_name(device)}  torch {torch.__version__}  triton {triton_version}  mode {mode}"
          f"  kv_indices impl: {impl_name(device)}", flush=True)

    checks = run_checks(device, p)
    for c in checks:
        print(f"check {c['name']}: {'ok' if c['ok'] else 'FAILED'} ({c['detail']})", flush=True)

    results: List[dict] = []
    errors: List[str] = []
    if not args.check:
        sections = {"attention": bench_attention, "kv_indices": bench_kv_indices, "scoring": bench_scoring}
        for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
            t0 = time.perf_counter()
            try:
                sections[name](device, p, results)
            except Exception as exc:  # noqa: BLE001 - keep the other sections' numbers
                traceback.print_exc()
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
        print_table([r for r in results if r["section"] == "attention"],
                    ["seq_len", "dtype", "mode", "fraction", "attended", "ranges_per_request", "total_ms", "sdpa_ms",
                     "loop_ms", "speedup_total", "speedup_sdpa", "speedup_loop"],
                    "decode attention, one layer (total: index build + gather + SDPA; sdpa: SDPA on gathered KV;"
                    " loop: gather_decode_attention)")
        print_table([r for r in results if r["section"] == "kv_indices"],
                    ["seq_len", "batch", "nnz", "n_ranges", "impl", "new_step_ms", "old_step_ms", "speedup_step",
                     "host_flatten_ms", "kernel_ms", "torch_ref_ms", "torch_gather_ms"],
                    "kv_indices per step (new: flatten_ranges + copy + ranges_to_kv_indices; old: host positions +"
                    " copy + gather; *_step wall clock, kernel/ref/gather device time)")
        print_table([r for r in results if r["section"] == "scoring"],
                    ["batch", "n_thoughts", "heads", "topk", "commit_layer_ms", "vote_layer_ms", "vote_layer_wall_ms",
                     "num_layers", "commit_step_ms", "vote_step_ms"],
                    "index keys per decode step (every request commits one key and votes; *_step = x num_layers)")

    results = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    ok = all(c["ok"] for c in checks) and not errors
    summary = dict(device=device_name(device), results=results, checks=checks, errors=errors, ok=ok, mode=mode,
                   torch=torch.__version__, triton=triton_version, kv_indices_impl=impl_name(device),
                   params={k: v for k, v in p.items()}, elapsed_s=round(time.perf_counter() - started, 1))
    line = json.dumps(summary)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
