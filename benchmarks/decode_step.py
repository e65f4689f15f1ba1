#!/usr/bin/env python
"""One whole decode step, dense attention vs ZoomR, measured side by side in one run.

    python benchmarks/decode_step.py            # no arguments: under 10 minutes

A step is every layer's decode attention plus, for ZoomR, everything ZoomR adds: the host plan
(segmenting the new tokens, working sets, packed ranges), the upload and sparse KV list, and per
layer the index-key updates and every request's vote. Every step is a refresh step for every
request (the worst step: all of them vote at every layer). Three timings per (context, batch):

* ``dense``: all positions (sequence lengths on the host, one KV list per request, attention);
* ``zoomr``: the ZoomR step through the real controller (``attention_backend/controller.py``);
* ``attention``: ZoomR's attention alone over the same working sets (no plan, no index, no vote).

``selection_overhead`` is the share of the ZoomR step spent on everything but attention: on the CPU
the host plan, the upload and the per-layer index and vote work, timed directly (the CPU runs them
in line); on CUDA ``1 - attention / zoomr`` (the layers replay as one graph).

Requests write synthetic reasoning: thoughts of 150-350 tokens in sentences, a blank line, a
12-token summary. On CUDA: a Llama-3.1-8B-shaped attention (32 layers, 32 query / 8 KV heads,
head_dim 128, bf16), FlashInfer's paged decode (what SGLang's backends call), every layer of a step
captured in one CUDA graph per variant and replayed after the host work, as SGLang does. On the
CPU: the same heads on 8 layers, fp32, through the torch path (SGLang ``torch_native``'s
per-request SDPA). KV slots are drawn at random from one shared pool (256K tokens on CUDA, 32K on
the CPU): 64 requests x 32K tokens would not fit in memory, and every variant reads the same way.

Last stdout line, one JSON object: ``{"device": "cpu"|"cuda", "step_ratio": {"<context>":
dense_time / zoomr_time, ...}, "selection_overhead": float, "batch": int}`` for the largest batch
(the overhead is its largest over contexts).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ON_CUDA  # noqa: E402  (process environment first)

import torch  # noqa: E402

from zoomr_sglang.algo.reference import gather_decode_attention  # noqa: E402
from zoomr_sglang.attention_backend.controller import ZoomRController  # noqa: E402
from zoomr_sglang.config import ZoomRConfig  # noqa: E402
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
    pool: int  # KV slots shared by every request (batch x context would not fit in memory)
    iters: int
    warmup: int


SHAPES = {
    "cuda": Shape(32, 32, 8, 128, torch.bfloat16, (4096, 16384, 32768), (1, 16, 64), 262_144, 20, 3),
    # Llama-3.1-8B's attention heads on 8 layers (CPU time), fp32 (the CPU's fastest SDPA).
    "cpu": Shape(8, 32, 8, 128, torch.float32, (2048, 8192, 16384), (1, 4, 8), 32_768, 5, 1),
}
# Every step is a refresh step (the worst step); the rest are the server defaults.
CONFIG = ZoomRConfig(refresh_interval=1)
VOCAB = [" w", ".", "\n\n", CONFIG.summary_begin, CONFIG.summary_end, " s"]
WORD, STOP, BLANK, BEGIN, END, SUMMARY = range(len(VOCAB))
PROMPT = 256


def reasoning_tokens(rng: random.Random, n: int) -> List[int]:
    """Thoughts of 150-350 words in sentences of 10-30, a blank line, a 10-word summary, a blank line."""
    out: List[int] = []
    while len(out) < n:
        body = rng.randint(150, 350)
        while body > 0:
            sentence = min(body, rng.randint(10, 30))
            out += [WORD] * sentence + [STOP]
            body -= sentence
        out += [BLANK, BEGIN] + [SUMMARY] * 10 + [END, BLANK]
    return out[:n]


def kv_pool(shape: Shape, device: str):
    """Every layer's K and V buffers ``[pool, kv_heads, head_dim]``, random."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [tuple(torch.randn(shape.pool, shape.kv_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
                  for _ in range(2)) for _ in range(shape.layers)]


def build(shape: Shape, kv, context: int, batch: int, device: str):
    """Request rows over the shared pool, requests with ``context`` tokens of history, and a
    controller that has read them."""
    gen = torch.Generator().manual_seed(context + batch)
    rows, max_len = batch + 1, context + shape.warmup + shape.iters + 2
    table = torch.randint(1, shape.pool, (rows, max_len), generator=gen, dtype=torch.int32)
    pools = SimpleNamespace(req_to_token=table.to(device), req_generation=torch.zeros(rows, dtype=torch.int64))
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer: kv[layer][0], get_value_buffer=lambda layer: kv[layer][1])
    controller = ZoomRController(
        config=CONFIG, token_texts=VOCAB, req_to_token_pool=pools, token_to_kv_pool=kv_pool, num_layers=shape.layers,
        num_heads=shape.heads, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim, device=device,
        index_capacity=batch * (context // 100 + 64), max_voters=batch)
    rng = random.Random(batch)
    reqs = [SimpleNamespace(rid=f"r{i}", origin_input_ids=[WORD] * PROMPT, prefix_len=0, output_ids=reasoning_tokens(rng, max_len),
                            sampling_params=SimpleNamespace(custom_params=None, max_new_tokens=max_len)) for i in range(batch)]
    for row, req in enumerate(reqs, start=1):
        controller.note_request(row, req)
        controller.planner.plan([req.rid], [PROMPT + 1], [])  # the request's first decode step
        controller.planner.plan([req.rid], [context], [])  # reads its history
    return controller, reqs


class Attention:
    """Every layer's decode attention for one batch: FlashInfer (CUDA) or torch_native's SDPA loop."""

    def __init__(self, shape: Shape, kv, batch: int, device: str):
        self.shape, self.kv, self.batch, self.device = shape, kv, batch, device
        self.query = torch.randn(batch, shape.heads, shape.head_dim, device=device).to(shape.dtype)
        self.scaling = shape.head_dim ** -0.5
        self.selection_seconds = 0.0  # ZoomR's per-layer work, timed in line (CPU)
        if device == "cuda":
            import flashinfer

            self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
            self.indices = torch.zeros(batch * (max(shape.contexts) + 64), dtype=torch.int32, device=device)
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
        for layer, (keys, values) in enumerate(self.kv):
            if self.device == "cuda":
                out, lse = self.wrapper.run(self.query, (keys, values), return_lse=True)
                lse = lse * 0.6931471805599453  # FlashInfer's log-sum-exp is base 2
            else:
                out, lse = gather_decode_attention(self.query, keys, values, *kv_lists, self.scaling)
            if controller is not None:
                started = time.perf_counter()
                controller.after_attention(layer, self.query, lse, self.scaling)
                self.selection_seconds += time.perf_counter() - started


def dense_lists(table: torch.Tensor, seq_lens: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a dense backend builds: indptr from the host lengths, every position's slot."""
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).to(torch.int32)])
    n = len(seq_lens)
    args = [t.to(table.device) for t in (torch.arange(1, n + 1), torch.zeros(n, dtype=torch.int64), lens, indptr[:-1].long())]
    return indptr, args


def measure(shape: Shape, kv, context: int, batch: int, device: str) -> Dict[str, float]:
    """Median seconds per step of each variant, stepped in turn so that drift hits them alike."""
    controller, reqs = build(shape, kv, context, batch, device)
    attention = Attention(shape, kv, batch, device)
    table = controller.req_to_token_pool.req_to_token
    kv_out = attention.indices if device == "cuda" else None
    step = {"len": context, "zoomr": None}

    def dense_host():
        indptr, args = dense_lists(table, [step["len"]] * batch)
        indices = ranges_to_kv_indices(table, *args, int(indptr[-1]), out=kv_out)
        attention.plan(indptr)
        return indptr, indices

    def zoomr_host():
        seq_len = step["len"]
        started = time.perf_counter()
        controller.begin_decode([r.rid for r in reqs], [seq_len] * batch)
        tokens = [r.output_ids[seq_len - 1 - PROMPT] for r in reqs]  # what this step decodes
        input_ids = torch.tensor(tokens, dtype=torch.int64).to(device, non_blocking=True)
        step["zoomr"] = controller.load(batch, input_ids, kv_indices_out=kv_out)
        attention.selection_seconds = time.perf_counter() - started
        attention.plan(step["zoomr"][0])
        return step["zoomr"]

    def zoomr_lists():  # ZoomR's attention alone reuses the step's working sets (already planned)
        attention.plan(step["zoomr"][0])
        return step["zoomr"]

    variants = {"dense": (dense_host, lambda lists: attention.layers(kv_lists=lists)),
                "zoomr": (zoomr_host, lambda lists: attention.layers(controller, kv_lists=lists)),
                "attention": (zoomr_lists, lambda lists: attention.layers(kv_lists=lists))}
    graphs = {name: capture(host, layers) for name, (host, layers) in variants.items()} if device == "cuda" else {}
    samples: Dict[str, List[float]] = {name: [] for name in (*variants, "selection")}
    for i in range(shape.warmup + shape.iters):
        step["len"] = context + 1 + i
        for name, (host, layers) in variants.items():
            started = time.perf_counter()
            lists = host()
            if name in graphs:
                graphs[name].replay()
                torch.cuda.synchronize()
            else:
                layers(lists)
            if i >= shape.warmup:
                samples[name].append(time.perf_counter() - started)
                if name == "zoomr":
                    samples["selection"].append(attention.selection_seconds / samples[name][-1])
    times = {name: statistics.median(values) for name, values in samples.items()}
    if device == "cuda":  # in-graph work cannot be timed in line: the difference of two replays
        times["selection"] = 1 - times["attention"] / times["zoomr"]
    times["kv_tokens_zoomr"] = int(step["zoomr"][0][-1]) / batch
    return times


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", help="comma-separated context lengths (default: the device's)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: the device's)")
    parser.add_argument("--iters", type=int, help="timed steps per measurement")
    args = parser.parse_args(argv)
    device = "cuda" if ON_CUDA else "cpu"
    shape = SHAPES[device]
    for name in ("contexts", "batches"):
        raw = getattr(args, name)
        if raw is not None:
            values = tuple(int(x) for x in raw.split(",") if x)
            if not values or min(values) < (PROMPT + 16 if name == "contexts" else 1):
                parser.error(f"--{name}={raw!r}: each value must be >= {PROMPT + 16 if name == 'contexts' else 1}")
            shape = replace(shape, **{name: values})
    if args.iters is not None:
        if args.iters < 1:
            parser.error(f"--iters={args.iters}: must be >= 1")
        shape = replace(shape, iters=args.iters)
    # Small runs need no more slots than their requests could fill.
    shape = replace(shape, pool=min(shape.pool, max(shape.batches) * (max(shape.contexts) + 64)))
    print(f"device {device}: {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, head_dim {shape.head_dim}, "
          f"{str(shape.dtype).replace('torch.', '')}; every step votes (refresh_interval=1)", flush=True)
    print(f"{'context':>8} {'batch':>5} {'dense ms':>9} {'zoomr ms':>9} {'attn ms':>8} {'ratio':>6} {'overhead':>8} "
          f"{'kv/request':>10}", flush=True)
    rows, kv = [], kv_pool(shape, device)
    for batch in shape.batches:
        for context in shape.contexts:
            t = measure(shape, kv, context, batch, device)
            row = dict(context=context, batch=batch, dense=t["dense"], zoomr=t["zoomr"], attention=t["attention"],
                       ratio=t["dense"] / t["zoomr"], overhead=t["selection"],
                       kv_tokens=t["kv_tokens_zoomr"])
            rows.append(row)
            print(f"{context:>8} {batch:>5} {1e3 * row['dense']:>9.2f} {1e3 * row['zoomr']:>9.2f} "
                  f"{1e3 * row['attention']:>8.2f} {row['ratio']:>5.2f}x {row['overhead']:>8.3f} "
                  f"{row['kv_tokens']:>10.0f}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    largest = max(shape.batches)
    mine = [r for r in rows if r["batch"] == largest]
    result = {"device": device, "step_ratio": {str(r["context"]): round(r["ratio"], 3) for r in mine},
              "selection_overhead": round(max(r["overhead"] for r in mine), 4), "batch": largest}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
