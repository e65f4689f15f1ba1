#!/usr/bin/env python
"""What the fine levels' token weights cost against the attention they follow, per layer.

    python benchmarks/token_weights.py          # about a minute on the CPU

At an observed step zoomr's token level sums, per attended position, the attention each query head
gave it. Three timings per working-set size, stepped in turn so that drift hits them alike, one
layer of a batch whose every request observes (the worst step):

* ``attention``: the CPU backend's decode attention over the working sets (``gather_decode_attention``:
  SGLang ``torch_native``'s per-request SDPA; on CUDA the same torch call, not FlashInfer);
* ``pass``: the batched token-weight pass the backend runs (``algo/token_weights.py``), one call
  for the whole batch;
* ``per_request``: what the host observers did before it, request by request: a float64 softmax
  over the request's keys summed over heads, added into its per-position sums.

Shapes: a Llama-3.1-8B layer (32 query heads over 8 KV heads of 128), fp32 on the CPU, bf16 on
CUDA; each request's working set is drawn at random from one shared pool of slots. Medians over
``--repeats``. Last stdout line, one JSON object: ``{"device": ..., "batch": int,
"pass_over_attention": {"<working set>": ratio, ...}, "per_request_over_attention": {...}}``.
``--results FILE`` also writes the settings and every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ON_CUDA  # noqa: E402  (process environment first)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from testbed.attention_baselines import attention_weights  # noqa: E402
from zoomr_sglang.algo.token_weights import accumulate_token_weights, lane_entries  # noqa: E402
from zoomr_sglang.algo.torch_attention import gather_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _timed(fn) -> float:
    if ON_CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if ON_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(working_set: int, batch: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(working_set)
    pool = batch * working_set * 2
    keys = torch.randn(pool, KV_HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    values = torch.randn(pool, KV_HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    kv_indptr = torch.arange(0, (batch + 1) * working_set, working_set, dtype=torch.int32)
    kv_indices = torch.randperm(pool, generator=generator)[: batch * working_set].to(device, torch.int32)
    scaling = HEAD_DIM ** -0.5
    _, lse = gather_decode_attention(query, keys, values, kv_indptr, kv_indices, scaling)
    lanes = np.arange(batch, dtype=np.int64)
    entries, lengths = lane_entries(kv_indptr.numpy(), lanes)
    lanes_d, entries_d = torch.from_numpy(lanes).to(device), torch.from_numpy(entries).to(device)
    valid = torch.arange(entries.shape[1], device=device)[None, :] < torch.from_numpy(lengths).to(device)[:, None]
    weights = torch.zeros(entries.shape, dtype=torch.float32, device=device)
    key_rows = keys.new_empty((entries.size, KV_HEADS, HEAD_DIM))  # as the backend keeps it across layers
    positions = torch.arange(working_set, device=device)

    def attention():
        gather_decode_attention(query, keys, values, kv_indptr, kv_indices, scaling)

    def batched():
        accumulate_token_weights(query, lse, keys, kv_indices, lanes_d, entries_d, valid, weights, scaling,
                                 key_rows=key_rows)

    def per_request():
        for b in range(batch):
            slots = kv_indices[b * working_set:(b + 1) * working_set].long()
            sums = torch.zeros(working_set, dtype=torch.float64, device=device)
            sums.index_add_(0, positions, attention_weights(query[b].float(), keys[slots].float(), scaling))

    runs = {"attention": attention, "pass": batched, "per_request": per_request}
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
    return dict(working_set=working_set, batch=batch, **{f"{name}_ms": v for name, v in ms.items()},
                pass_over_attention=ms["pass"] / ms["attention"],
                per_request_over_attention=ms["per_request"] / ms["attention"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--working-sets", default="512,2048,8192", help="tokens per request (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", help="also write the settings and the rows to this JSON file")
    args = parser.parse_args()
    sizes = [int(x) for x in args.working_sets.split(",")]
    if not sizes or min(sizes) < 1 or args.batch < 1 or args.repeats < 1:
        parser.error(f"--working-sets {args.working_sets!r}, --batch {args.batch}, --repeats {args.repeats}:"
                     " allowed: positive integers")
    device, dtype = ("cuda", torch.bfloat16) if ON_CUDA else ("cpu", torch.float32)
    print(f"device {device}, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, {dtype}, batch {args.batch}, one layer")
    print(" working set  attention ms  pass ms  per-request ms  pass/attn  per-request/attn")
    rows = []
    for size in sizes:
        row = measure(size, args.batch, args.repeats, device, dtype)
        rows.append(row)
        print(f"{size:>12} {row['attention_ms']:>13.2f} {row['pass_ms']:>8.2f} {row['per_request_ms']:>15.2f}"
              f" {row['pass_over_attention']:>10.3f} {row['per_request_over_attention']:>17.3f}", flush=True)
    summary = {"device": device, "batch": args.batch,
               "pass_over_attention": {str(r["working_set"]): round(r["pass_over_attention"], 3) for r in rows},
               "per_request_over_attention": {str(r["working_set"]): round(r["per_request_over_attention"], 3)
                                              for r in rows}}
    if args.results:
        settings = dict(date=date.today().isoformat(), argv=sys.argv[1:], dtype=str(dtype), heads=HEADS,
                        kv_heads=KV_HEADS, head_dim=HEAD_DIM, repeats=args.repeats, torch=torch.__version__)
        Path(args.results).write_text(json.dumps({**settings, "rows": rows, "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
