#!/usr/bin/env python
"""One whole decode step, dense attention vs ZoomR, measured side by side in one run.

    python benchmarks/decode_step.py            # no arguments: under 10 minutes on the CPU

A step is every layer's decode attention plus, for ZoomR, everything ZoomR adds: the host plan
(segmenting the new tokens, the host tier's moves, working sets, packed ranges), the upload and
sparse KV list, and per layer the index-key updates and the votes. Three timings per (context,
batch), stepped in turn so that drift hits them alike:

* ``dense``: all positions (sequence lengths on the host, one KV list per request, attention);
* ``zoomr``: the ZoomR step through the real controller (``attention_backend/controller.py``);
* ``attention``: ZoomR's attention alone over the same working sets (no plan, no index, no vote).

The history is realistic: requests write synthetic reasoning (thoughts of 150-350 tokens in
sentences of 10-30, a blank line, a 12-token summary; with ``--no-summaries``, as a model that
writes none, no summary: zoomr keeps each thought's mean key instead) and reach the measured context
through real steps of the controller (64 tokens each), so
index keys hold the history's keys, candidate tables are filled, votes are cast and applied, and
with the host tier on (the default server setting) cold thoughts sit in the host tier and their
device slots went back to the allocator. Timed steps refresh where the text does (sentence ends,
thought ends, every ``refresh_interval`` tokens): ``step_ratio`` and ``selection_overhead``
are means over those steps. The worst step (every request votes at every layer) is measured too.

When the host tier cannot hold a cell's history (``--host-gb``), that cell runs with the tier off
and every position's KV slot drawn at random from one shared pool (``slots: shared`` in the table),
as 64 requests x 32K tokens would not fit in device memory either. Dense always reads slots drawn
at random from the same pool (a dense server could not hold these batches whole).

``selection_overhead`` is the share of the ZoomR step spent on everything but attention: on the CPU
the host plan, the upload and the per-layer index and vote work, timed directly (the CPU runs them
in line); on CUDA ``1 - attention / zoomr`` (the layers replay as one graph).
``host_us_per_request`` is the planner's host time (``ZoomRController.begin_decode``, median) per
request per step at batch 64 over the same stream with the host tier on, on a tiny KV shape so that
the tier's copies (on a GPU a side stream's work) do not count (``plan us/r`` in the table includes
them on the CPU); ``tier_copy_gbps`` is ``benchmarks/tier_copy.py``'s whole-thought move at
Llama-3.1-8B shapes. ZoomR's settings are the server's: the ``ZOOMR_*`` variables, as a server
reads them (none set: the defaults), e.g. ``ZOOMR_BUDGET=0.2`` for a budget of a fifth of each
sequence.

On CUDA: a Llama-3.1-8B-shaped attention (32 layers, 32 query / 8 KV heads, head_dim 128, bf16),
FlashInfer's paged decode (what SGLang's backends call), every layer of a step captured in one CUDA
graph per variant and replayed after the host work, as SGLang does. On the CPU: the same heads on 8
layers, fp32, through the torch path (SGLang ``torch_native``'s per-request SDPA).

Last stdout line, one JSON object: ``{"device": "cpu"|"cuda", "step_ratio": {"<context>":
dense_time / zoomr_time, ...}, "selection_overhead": float, "batch": int, "host_us_per_request":
float, "tier_copy_gbps": float, "worst_step_ratio": {...}, "worst_selection_overhead": float}`` for
the largest batch (an overhead is its largest over contexts). ``--results FILE`` also writes every
cell's row as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ON_CUDA  # noqa: E402  (process environment first)

import torch  # noqa: E402

from tier_copy import measure_tier_copy_gbps  # noqa: E402
from zoomr_sglang.algo.torch_attention import gather_decode_attention  # noqa: E402
from zoomr_sglang.attention_backend.controller import ZoomRController  # noqa: E402
from zoomr_sglang.attention_backend.host_tier import HostKVTier  # noqa: E402
from zoomr_sglang.attention_backend.tiering import ThoughtTiering  # noqa: E402
from zoomr_sglang.config import load_config  # noqa: E402
from zoomr_sglang.kernels.kv_indices import ranges_to_kv_indices  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    contexts: Tuple[int, ...]
    batches: Tuple[int, ...]
    iters: int
    warmup: int
    host_gb: float  # host tier per cell; a history that does not fit runs on shared slots, tier off
    pool_gb: float  # device KV pool per cell


SHAPES = {
    "cuda": Shape(32, 32, 8, 128, torch.bfloat16, (4096, 16384, 32768), (1, 16, 64), 24, 3, 40.0, 32.0),
    # Llama-3.1-8B's attention heads on 8 layers (CPU time), fp32 (the CPU's fastest SDPA).
    "cpu": Shape(8, 32, 8, 128, torch.float32, (2048, 8192, 16384), (1, 4, 8), 12, 2, 10.0, 4.0),
}
# The planner's host time is measured apart, at batch 64 on a tiny KV shape: what it costs per
# request does not depend on the KV's size, except the tier's copies (on a GPU a side stream's work,
# measured as tier_copy_gbps), which this keeps negligible.
PLANNER = dict(batch=64, context=2048, steps=200, shape=Shape(2, 4, 2, 16, torch.float32, (2048,), (64,), 200, 20,
                                                              1.0, 1.0))
CONFIG = load_config()  # the server's settings (host tier sized per cell here)
VOCAB = [" w", ".", "\n\n", CONFIG.summary_begin, CONFIG.summary_end, " s"]
WORD, STOP, BLANK, BEGIN, END, SUMMARY = range(len(VOCAB))
PROMPT = 256
HISTORY_STEP = 64  # tokens a history step feeds per request (commits past a step's slots are added at once)
WORST_ITERS = 3  # timed worst steps per cell (every request votes)


def reasoning_tokens(rng: random.Random, n: int, summaries: bool = True) -> List[int]:
    """Thoughts of 150-350 words in sentences of 10-30, a blank line, then (``summaries``) a
    10-word summary and a blank line."""
    out: List[int] = []
    while len(out) < n:
        body = rng.randint(150, 350)
        while body > 0:
            sentence = min(body, rng.randint(10, 30))
            out += [WORD] * sentence + [STOP]
            body -= sentence
        out += ([BLANK, BEGIN] + [SUMMARY] * 10 + [END, BLANK]) if summaries else [BLANK]
    return out[:n]


class SlotAllocator:
    """SGLang's token-slot allocator reduced to what the host tier calls: ``alloc``/``free`` of
    int64 slot tensors over ``[1, size)`` (slot 0 is the padding slot)."""

    def __init__(self, size: int) -> None:
        self.free_slots = torch.randperm(size - 1, generator=torch.Generator().manual_seed(size)) + 1
        self.num_free = size - 1

    def alloc(self, n: int) -> Optional[torch.Tensor]:
        if n > self.num_free:
            return None
        self.num_free -= n
        return self.free_slots[self.num_free:self.num_free + n].clone()

    def free(self, slots: torch.Tensor) -> None:
        self.free_slots[self.num_free:self.num_free + slots.numel()] = slots.cpu()
        self.num_free += slots.numel()


class Cell:
    """Requests with ``context`` tokens of history in one (context, batch) cell, a controller that
    has run their history, and the dense table every position's slot is drawn from."""

    def __init__(self, shape: Shape, context: int, batch: int, device: str, summaries: bool = True) -> None:
        self.shape, self.batch, self.device = shape, batch, device
        rows, self.max_len = batch + 1, context + shape.warmup + shape.iters + WORST_ITERS + 2
        token_bytes = HostKVTier.bytes_per_token(shape.layers, shape.kv_heads, shape.head_dim, shape.head_dim, shape.dtype)
        # The host tier hands out whole blocks: room for every position plus each thought's block tail.
        host_tokens = batch * self.max_len * 9 // 8 + 1024
        self.tiered = host_tokens * token_bytes <= shape.host_gb * (1 << 30)
        # Tiered: ZoomR's resident set (prompt, summaries, a few thoughts, the window) per request,
        # and a slot per 16 tokens for the page bounds of a request without summaries.
        per_request = self.max_len
        if self.tiered:
            per_request = min(self.max_len, 4096 + context // 8) + self.max_len // 16
        self.pool = min(batch * per_request + 1, int(shape.pool_gb * (1 << 30)) // token_bytes)
        gen = torch.Generator(device=device).manual_seed(context + batch)
        self.kv = [tuple(torch.randn(self.pool, shape.kv_heads, shape.head_dim, generator=gen, device=device,
                                     dtype=shape.dtype) for _ in range(2)) for _ in range(shape.layers)]
        table_gen = torch.Generator().manual_seed(context + batch)
        self.dense_table = torch.randint(1, self.pool, (rows, self.max_len), generator=table_gen,
                                         dtype=torch.int32).to(device)
        table = self.dense_table.clone() if not self.tiered else torch.zeros_like(self.dense_table)
        self.pools = SimpleNamespace(req_to_token=table, req_generation=torch.zeros(rows, dtype=torch.int64))
        kv_pool = SimpleNamespace(get_key_buffer=lambda layer: self.kv[layer][0],
                                  get_value_buffer=lambda layer: self.kv[layer][1])
        # Without the tier the slots it hands out (the page bounds') also hold history: timing is all that counts.
        self.allocator = SlotAllocator(self.pool)
        tiering = None
        if self.tiered:
            host = HostKVTier(num_layers=shape.layers, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                              v_head_dim=shape.head_dim, dtype=shape.dtype, capacity_tokens=host_tokens,
                              pin_memory=device == "cuda")
            tiering = ThoughtTiering(config=CONFIG, host_tier=host, allocator=self.allocator,
                                     req_to_token_pool=self.pools, kv_pool=kv_pool, page_size=1)
        self.controller = ZoomRController(
            config=CONFIG, token_texts=VOCAB, req_to_token_pool=self.pools, token_to_kv_pool=kv_pool,
            num_layers=shape.layers, num_heads=shape.heads, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
            device=device, index_capacity=batch * (context // 100 + 64), max_voters=batch, allocator=self.allocator,
            tiering=tiering)
        rng = random.Random(batch)
        self.reqs = [SimpleNamespace(rid=f"r{i}", origin_input_ids=[WORD] * PROMPT, prefix_len=0,
                                     output_ids=reasoning_tokens(rng, self.max_len, summaries),
                                     sampling_params=SimpleNamespace(custom_params=None, max_new_tokens=self.max_len))
                     for i in range(batch)]
        self.query = torch.randn(batch, shape.heads, shape.head_dim, device=device).to(shape.dtype)
        self.scaling = shape.head_dim ** -0.5
        self.filled = 0  # positions of every row that hold a slot
        for row, req in enumerate(self.reqs, start=1):
            self.controller.note_request(row, req)
        for seq_len in [*range(PROMPT + 1, context, HISTORY_STEP), context]:
            self.history_step(seq_len)

    def give_slots(self, seq_len: int) -> None:
        """Slots for every row's positions below ``seq_len`` (SGLang's allocation before a step)."""
        if self.tiered and seq_len > self.filled:
            slots = self.allocator.alloc(self.batch * (seq_len - self.filled))
            if slots is None:
                raise RuntimeError(f"decode_step: the device pool of {self.pool} slots is full (tier evicts too little)")
            rows = self.pools.req_to_token[1:, self.filled:seq_len]
            rows.copy_(slots.view(self.batch, -1).to(rows))
        self.filled = max(self.filled, seq_len)

    def decoded(self, seq_len: int) -> torch.Tensor:
        """``[batch]`` the tokens a step at ``seq_len`` decodes, on the device."""
        tokens = [req.output_ids[seq_len - 1 - PROMPT] for req in self.reqs]
        return torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)

    def history_step(self, seq_len: int) -> float:
        """A controller step without attention: plan, upload, every layer's commits and votes.
        Returns the plan's wall seconds (``begin_decode``)."""
        self.give_slots(seq_len)
        controller = self.controller
        controller.finish_step()  # the last step's fine-level passes, not the plan's time
        started = time.perf_counter()
        controller.begin_decode([r.rid for r in self.reqs], [seq_len] * self.batch)
        planned = time.perf_counter() - started
        controller.load(self.batch, self.decoded(seq_len))
        lse = torch.full((self.batch, self.shape.heads), float(seq_len), device=self.device).log_()
        for layer in range(self.shape.layers):
            controller.after_attention(layer, self.query, lse, self.scaling)
        return planned

    def counters(self) -> dict:
        tiering = self.controller.tiering
        return {} if tiering is None else {**tiering.counters.as_dict(), "host_used_tokens": tiering.host.num_used}


class Attention:
    """Every layer's decode attention for one batch: FlashInfer (CUDA) or torch_native's SDPA loop."""

    def __init__(self, cell: Cell, max_context: int):
        shape, device, batch = cell.shape, cell.device, cell.batch
        self.cell, self.shape, self.device = cell, shape, device
        self.selection_seconds = 0.0  # ZoomR's per-layer work, timed in line (CPU)
        if device == "cuda":
            import flashinfer

            self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
            self.indices = torch.zeros(batch * (max_context + 64), dtype=torch.int32, device=device)
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                torch.empty(512 << 20, dtype=torch.uint8, device=device), "NHD", use_cuda_graph=True,
                use_tensor_cores=shape.heads // shape.kv_heads >= 4, paged_kv_indptr_buffer=self.indptr,
                paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=torch.ones(batch, dtype=torch.int32, device=device))
            self.planned = False

    def plan(self, kv_indptr: torch.Tensor) -> None:
        """FlashInfer's host plan (the first one full, later ones as SGLang's replays do)."""
        if self.device != "cuda":
            return
        from flashinfer.decode import fast_decode_plan

        args = (self.indices, self.wrapper._paged_kv_last_page_len_buf, self.shape.heads, self.shape.kv_heads,
                self.shape.head_dim, 1)
        kwargs = dict(q_data_type=self.shape.dtype, kv_data_type=self.shape.dtype, non_blocking=True)
        if not self.planned:
            self.wrapper.plan(kv_indptr, *args, **kwargs)
            self.planned = True
        else:
            self.indptr.copy_(kv_indptr.pin_memory(), non_blocking=True)
            fast_decode_plan(self.wrapper, self.indptr, *args, **kwargs, global_override_indptr_cpu=kv_indptr)

    def layers(self, controller=None, kv_lists=None) -> None:
        """All layers; with ``controller``, ZoomR's per-layer work after each attention."""
        query, scaling = self.cell.query, self.cell.scaling
        for layer, (keys, values) in enumerate(self.cell.kv):
            if self.device == "cuda":
                out, lse = self.wrapper.run(query, (keys, values), return_lse=True)
                lse = lse * 0.6931471805599453  # FlashInfer's log-sum-exp is base 2
            else:
                out, lse = gather_decode_attention(query, keys, values, *kv_lists, scaling)
            if controller is not None:
                started = time.perf_counter()
                controller.after_attention(layer, query, lse, scaling)
                self.selection_seconds += time.perf_counter() - started


def dense_lists(table: torch.Tensor, seq_lens: List[int], out) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a dense backend builds: indptr from the host lengths, every position's slot."""
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).to(torch.int32)])
    n = len(seq_lens)
    args = [t.to(table.device) for t in (torch.arange(1, n + 1), torch.zeros(n, dtype=torch.int64), lens, indptr[:-1].long())]
    return indptr, ranges_to_kv_indices(table, *args, int(indptr[-1]), out=out)


def measure(shape: Shape, context: int, batch: int, device: str, summaries: bool = True) -> Dict[str, float]:
    """Mean seconds per step of each variant over realistic steps, then over worst steps."""
    cell = Cell(shape, context, batch, device, summaries)
    controller = cell.controller
    attention = Attention(cell, max(shape.contexts))
    kv_out = attention.indices if device == "cuda" else None
    step = {"len": context, "zoomr": None, "worst": False, "plan": 0.0}

    def dense_host():
        indptr, indices = dense_lists(cell.dense_table, [step["len"]] * batch, kv_out)
        attention.plan(indptr)
        return indptr, indices

    def zoomr_host():
        seq_len = step["len"]
        started = time.perf_counter()
        controller.finish_step()  # the last step's fine-level passes: selection work, not the plan's
        planned = time.perf_counter()
        controller.begin_decode([r.rid for r in cell.reqs], [seq_len] * batch)
        step["plan"] = time.perf_counter() - planned
        if step["worst"]:  # the host asks every request that can vote to vote at this step
            controller.next_plan.votes[:, 3] = 1
        step["zoomr"] = controller.load(batch, cell.decoded(seq_len), kv_indices_out=kv_out)
        attention.selection_seconds = time.perf_counter() - started
        attention.plan(step["zoomr"][0])
        return step["zoomr"]

    def zoomr_lists():  # ZoomR's attention alone reuses the step's working sets (already planned)
        attention.plan(step["zoomr"][0])
        return step["zoomr"]

    variants = {"dense": (dense_host, lambda lists: attention.layers(kv_lists=lists)),
                "zoomr": (zoomr_host, lambda lists: attention.layers(controller, kv_lists=lists)),
                "attention": (zoomr_lists, lambda lists: attention.layers(kv_lists=lists))}
    if device == "cuda":
        step["len"] += 1
        cell.give_slots(step["len"])
        graphs = {name: capture(host, layers) for name, (host, layers) in variants.items()}
    else:
        graphs = {}
    names = (*variants, "selection", "plan")
    samples: Dict[str, Dict[str, List[float]]] = {kind: {name: [] for name in names} for kind in ("real", "worst")}
    schedule = ["warmup"] * shape.warmup + ["real"] * shape.iters + ["worst"] * WORST_ITERS
    for kind in schedule:
        step["len"] += 1
        step["worst"] = kind == "worst"
        cell.give_slots(step["len"])
        for name, (host, layers) in variants.items():
            started = time.perf_counter()
            lists = host()
            if name in graphs:
                graphs[name].replay()
                torch.cuda.synchronize()
            else:
                layers(lists)
            if kind != "warmup":
                elapsed = time.perf_counter() - started
                samples[kind][name].append(elapsed)
                if name == "zoomr":
                    samples[kind]["selection"].append(attention.selection_seconds / elapsed)
                    samples[kind]["plan"].append(step["plan"] / batch)
    times = {f"{kind}_{name}": statistics.fmean(values) for kind, by in samples.items() for name, values in by.items()}
    for kind in ("real", "worst"):
        if device == "cuda":  # in-graph work cannot be timed in line: the difference of two replays
            times[f"{kind}_selection"] = 1 - times[f"{kind}_attention"] / times[f"{kind}_zoomr"]
    times["kv_tokens_zoomr"] = int(step["zoomr"][0][-1]) / batch
    times["tiered"] = cell.tiered
    times["counters"] = cell.counters()
    return times


def planner_us_per_request(device: str, summaries: bool = True) -> float:
    """Median ``begin_decode`` wall time per request per step, ``PLANNER``'s batch and stream, host tier on."""
    shape, batch = PLANNER["shape"], PLANNER["batch"]
    cell = Cell(shape, PLANNER["context"], batch, device, summaries)
    assert cell.tiered, "the planner measurement runs with the host tier on"
    seconds = [cell.history_step(PLANNER["context"] + 1 + step) for step in range(shape.warmup + shape.iters)]
    return 1e6 * statistics.median(seconds[shape.warmup:]) / batch


def capture(host, layers) -> "torch.cuda.CUDAGraph":
    """One CUDA graph of every layer, captured after a warm-up run (Triton compiles there)."""
    lists = host()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layers(lists)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers(lists)
    return graph


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", help="comma-separated context lengths (default: the device's)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: the device's)")
    parser.add_argument("--iters", type=int, help="timed realistic steps per measurement")
    parser.add_argument("--host-gb", type=float, help="host tier per cell, GiB (default: the device's)")
    parser.add_argument("--results", help="write every finished cell's row to this JSON file")
    parser.add_argument("--no-summaries", action="store_true",
                        help="the history of a model that writes no summaries (thoughts end at a blank line)")
    args = parser.parse_args(argv)
    shape = SHAPES["cuda" if ON_CUDA else "cpu"]
    for name in ("contexts", "batches"):
        raw = getattr(args, name)
        if raw is not None:
            least = PROMPT + 2 * HISTORY_STEP if name == "contexts" else 1
            try:
                values = tuple(int(x) for x in raw.split(",") if x)
            except ValueError:
                values = ()
            if not values or min(values) < least:
                parser.error(f"--{name}={raw!r}: comma-separated integers, each >= {least}")
            shape = replace(shape, **{name: values})
    if args.iters is not None:
        if args.iters < 1:
            parser.error(f"--iters={args.iters}: must be >= 1")
        shape = replace(shape, iters=args.iters)
    if args.host_gb is not None:
        if args.host_gb < 0:
            parser.error(f"--host-gb={args.host_gb}: must be >= 0")
        shape = replace(shape, host_gb=args.host_gb)
    return args, shape


def main(argv=None) -> dict:
    args, shape = parse_args(argv)
    device = "cuda" if ON_CUDA else "cpu"
    print(f"device {device}: {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, head_dim {shape.head_dim}, "
          f"{str(shape.dtype).replace('torch.', '')}; ZoomR settings {_settings_text()} (refresh where the text "
          f"does); {'no summaries' if args.no_summaries else 'summaries'}; worst step: every request votes", flush=True)
    print(f"{'context':>8} {'batch':>5} {'slots':>6} {'dense ms':>9} {'zoomr ms':>9} {'attn ms':>8} {'ratio':>6} "
          f"{'overhead':>8} {'plan us/r':>9} {'worst':>6} {'w.ovh':>6} {'kv/request':>10}", flush=True)
    tier_gbps = measure_tier_copy_gbps(device)  # first, in a fresh process (as tier_copy.py alone)
    rows = []
    for batch in shape.batches:
        for context in shape.contexts:
            t = measure(shape, context, batch, device, not args.no_summaries)
            row = dict(context=context, batch=batch, slots="tiered" if t["tiered"] else "shared",
                       dense=t["real_dense"], zoomr=t["real_zoomr"], attention=t["real_attention"],
                       ratio=t["real_dense"] / t["real_zoomr"], overhead=t["real_selection"],
                       plan_us=1e6 * t["real_plan"], worst_ratio=t["worst_dense"] / t["worst_zoomr"],
                       worst_overhead=t["worst_selection"], kv_tokens=t["kv_tokens_zoomr"], tier=t["counters"])
            rows.append(row)
            print(f"{context:>8} {batch:>5} {row['slots']:>6} {1e3 * row['dense']:>9.2f} {1e3 * row['zoomr']:>9.2f} "
                  f"{1e3 * row['attention']:>8.2f} {row['ratio']:>5.2f}x {row['overhead']:>8.3f} {row['plan_us']:>9.1f} "
                  f"{row['worst_ratio']:>5.2f}x {row['worst_overhead']:>6.3f} {row['kv_tokens']:>10.0f}", flush=True)
            if args.results:
                write_results(args.results, device, shape, rows)
            if device == "cuda":
                torch.cuda.empty_cache()
    largest = max(shape.batches)
    mine = [r for r in rows if r["batch"] == largest]
    result = {"device": device, "step_ratio": {str(r["context"]): round(r["ratio"], 3) for r in mine},
              "selection_overhead": round(max(r["overhead"] for r in mine), 4), "batch": largest,
              "host_us_per_request": round(planner_us_per_request(device, not args.no_summaries), 2),
              "tier_copy_gbps": round(tier_gbps, 2),
              "worst_step_ratio": {str(r["context"]): round(r["worst_ratio"], 3) for r in mine},
              "worst_selection_overhead": round(max(r["worst_overhead"] for r in mine), 4)}
    if args.results:
        write_results(args.results, device, shape, rows, result)
    print(json.dumps(result))
    return result


def _settings_text() -> str:
    """The ``ZOOMR_*`` variables this run was given, or "the defaults"."""
    given = {k: v for k, v in os.environ.items() if k.startswith("ZOOMR_")}
    return json.dumps(given) if given else "the defaults"


def write_results(path: str, device: str, shape: Shape, rows: List[dict], summary: Optional[dict] = None) -> None:
    """The run so far: its date, arguments and sizes, ZoomR's settings (as the server reads them),
    every finished cell's row and, at the end, the last-line JSON."""
    settings = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "device": device,
                "shape": {**shape.__dict__, "dtype": str(shape.dtype)}, "zoomr_config": CONFIG.__dict__}
    Path(path).write_text(json.dumps({**settings, "rows": rows, "summary": summary}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
