#!/usr/bin/env python
"""Concurrent requests at one fixed ``--max-total-tokens``: ZoomR with the host tier against dense
attention, in SGLang itself, under each admission rule.

HTTP servers one after the other with the same KV pool (``--attention-backend torch_native``, then
``zoomr`` once per ``--rules`` entry, each with that ``admission`` in ``ZOOMR_CONFIG``) each get ``--requests``
concurrent greedy ``ignore_eos`` requests of ``--max-new-tokens`` tokens. ``GET /metrics`` is polled every
``--poll`` seconds; the peaks of SGLang's own gauges ``sglang:num_running_reqs`` and
``sglang:num_used_tokens`` are recorded until every request finished. zoomr's host-tier counters
come from ``/server_info`` afterwards (``zoom_in_failures`` must be 0).

Then a plot (running requests over time, dense vs zoomr) and the full results as JSON next to it.
The last stdout line is one JSON object (other tools read it):
``{"concurrent_dense": int, "concurrent_zoomr": int}`` (peaks of ``sglang:num_running_reqs``; zoomr:
under the default rule ``observed``, which the rules must include; the others are in the JSON file).

``--tp N`` serves every server with N tensor-parallel ranks (on CPU, SGLang's engine over gloo; the
settings it needs are in ``testbed/process_env.py``): ``--max-total-tokens`` is then each rank's
pool, whose tokens hold that rank's share of the KV heads, and zoomr's per-rank counts are checked
to agree (``ranks_agree`` in the JSON; docs/tensor-parallel.md).

ZoomR settings as in ``benchmarks/memory.py`` (tiny model: ``ZOOMR_SINK=4 ZOOMR_WINDOW=64
ZOOMR_MAX_THOUGHT_TOKENS=48`` unless the environment or ``--zoomr-env`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402  (imports bench_setup first: CPU engine set-up)
    GREEDY, PROMPT_LEN, add_model_arguments, check_zoomr_env, context_length_for,
    finish_run, launch_server, log, machine, prompt, save_figure, start_run, read_metrics, zoomr_state)
from bench_setup import REPO  # noqa: E402
from testbed.process_env import zoomr_environment  # noqa: E402
from zoomr_sglang.config import ADMISSION_MODES  # noqa: E402

import requests  # noqa: E402

# Admission into SGLang's pool does not depend on the attention kernel; torch_native runs anywhere.
DENSE_BACKEND = "torch_native"
ZOOMR_TREE = ("--radix-cache-backend", "zoomr")
METRICS = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens", "sglang:token_usage",
           "sglang:kv_available_tokens", "sglang:num_retracted_reqs", "sglang:num_retracted_requests_total")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-total-tokens", type=int, default=12000,
                        help="SGLang's KV pool size (tokens) of every server")
    parser.add_argument("--requests", type=int, default=48, help="concurrent requests sent to each server")
    parser.add_argument("--max-new-tokens", type=int, default=3000, help="output tokens of each request")
    parser.add_argument("--rules", default=",".join(ADMISSION_MODES),
                        help=f"zoomr servers' admission rules, comma-separated (allowed: {ADMISSION_MODES})")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of every server (--tp-size)")
    parser.add_argument("--plot", default=None,
                        help="PNG path; the full results go next to it as .json (default: benchmarks/results/"
                             "concurrency.png, concurrency_tp<N>.png with --tp N > 1)")
    parser.add_argument("--poll", type=float, default=0.3, help="seconds between two GET /metrics")
    parser.add_argument("--server-timeout", type=float, default=300,
                        help="seconds a load may run before the rest is abandoned (reported)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("max_total_tokens", "requests", "max_new_tokens", "tp"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    args.rules = [r for r in args.rules.split(",") if r]
    if args.plot is None:
        args.plot = str(REPO / "benchmarks" / "results" / f"concurrency{'' if args.tp == 1 else f'_tp{args.tp}'}.png")
    if "observed" not in args.rules or not set(args.rules) <= set(ADMISSION_MODES):
        parser.error(f"--rules={','.join(args.rules)}: allowed: values of {ADMISSION_MODES}, including observed")
    if args.poll <= 0 or args.server_timeout <= 0:
        parser.error(f"--poll={args.poll} and --server-timeout={args.server_timeout}: both must be > 0")
    check_zoomr_env(parser, args.zoomr_env)
    return args


def retracted(peaks: Dict[str, float]) -> Optional[int]:
    """Retractions SGLang counted: its counter (exported from the first retraction on), else the peak
    of its per-interval gauge (0: none seen); None when neither is exported."""
    for name in ("sglang:num_retracted_requests_total", "sglang:num_retracted_reqs"):
        if name in peaks:
            return int(peaks[name])
    return None


def send_requests(url: str, args) -> tuple:
    """Start ``--requests`` concurrent requests in threads; ``(threads, results, errors)``."""
    results: List[Optional[dict]] = [None] * args.requests
    errors: List[str] = []

    def one(n: int) -> None:
        try:
            reply = requests.post(f"{url}/generate", timeout=args.server_timeout + 60, json={
                "input_ids": prompt(100 + n), "sampling_params": {**GREEDY, "max_new_tokens": args.max_new_tokens}})
            reply.raise_for_status()
            results[n] = reply.json()
        except Exception as exc:  # reported, never fatal for the others
            errors.append(f"request {n}: {exc}")

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(args.requests)]
    for t in threads:
        t.start()
    return threads, results, errors


def load_server(url: str, args, backend: str) -> dict:
    """Send the requests and record the peaks of SGLang's gauges until all finish."""
    start = time.time()
    threads, results, errors = send_requests(url, args)
    peaks: Dict[str, float] = {}
    samples = []
    while any(t.is_alive() for t in threads) and time.time() - start < args.server_timeout:
        values = read_metrics(url, METRICS)
        if values:
            samples.append((round(time.time() - start, 2), values.get("sglang:num_running_reqs"),
                            values.get("sglang:num_used_tokens")))
        for name, value in values.items():
            peaks[name] = max(peaks.get(name, value), value)
        time.sleep(args.poll)
    elapsed = time.time() - start
    for name, value in read_metrics(url, METRICS).items():  # the counters after the last request
        peaks[name] = max(peaks.get(name, value), value)
    finished = sum(r is not None and len(r.get("output_ids", [])) == args.max_new_tokens for r in results)
    out = dict(backend=backend, seconds=round(elapsed, 1), finished=finished, errors=errors[:5],
               peak_running=int(peaks.get("sglang:num_running_reqs", 0)),
               peak_used_tokens=int(peaks.get("sglang:num_used_tokens", 0)),
               peak_token_usage=peaks.get("sglang:token_usage"),
               retracted=retracted(peaks), peaks=peaks, samples=samples)
    zoomr = zoomr_state(url)
    if zoomr is not None:
        finished_stats = zoomr["finished"].values()
        out["host_tier"] = zoomr["host_tier"]
        out["pools_after"] = zoomr["pools"]
        out["resident_max_per_request"] = max((s["resident_max"] for s in finished_stats), default=None)
        out["over_bound_steps"] = sum(s["over_bound_steps"] for s in finished_stats)
        if "ranks" in zoomr:  # TP > 1: every rank's pool, tree, host tier and index counts
            out["ranks_agree"] = all(rank == zoomr["ranks"][0] for rank in zoomr["ranks"])
    return out


def report(name: str, run: dict, args) -> None:
    log(f"    {name:14} ({run['backend']}): peak running {run['peak_running']:>3}, peak used tokens "
        f"{run['peak_used_tokens']:>6} of {args.max_total_tokens}, finished {run['finished']}/{args.requests} "
        f"in {run['seconds']:.0f} s (server start {run['startup_seconds']:.0f} s), retracted {run['retracted']}"
        + (f", errors: {run['errors']}" if run["errors"] else ""))
    if "host_tier" not in run:
        return
    host = run["host_tier"] or {}
    log(f"           host tier: {json.dumps(host)}; per-request resident max "
        f"{run.get('resident_max_per_request')}; over-bound steps {run.get('over_bound_steps')}"
        + (f"; ranks' counts agree: {run['ranks_agree']}" if "ranks_agree" in run else ""))
    if run.get("ranks_agree") is False:
        log("    WARNING: the tensor-parallel ranks' counts differ (must agree)")
    if host.get("zoom_in_failures"):
        log(f"    WARNING: {host['zoom_in_failures']} zoom-ins found SGLang's pool empty (must be 0)")
    if host.get("host_full"):
        log(f"    note: the host tier was full {host['host_full']} times (those thoughts stayed on the device; "
            f"ZOOMR_HOST_POOL_GB sizes it, default eight device pools)")


def concurrency(args, model_path: str) -> Dict[str, dict]:
    context = context_length_for(model_path, PROMPT_LEN + args.max_new_tokens + 8)
    log(f"\nconcurrent requests at --max-total-tokens {args.max_total_tokens} (--tp {args.tp}): {args.requests} "
        f"requests of {PROMPT_LEN} + {args.max_new_tokens} tokens per server, peaks of SGLang's /metrics gauges")
    parallel = ("--tp-size", str(args.tp)) if args.tp > 1 else ()
    # zoomr servers use the zoomr radix cache: a request SGLang retracts keeps its thoughts.
    servers = [("dense", DENSE_BACKEND, {}, parallel)] + [
        (f"zoomr {rule}", "zoomr", zoomr_environment(admission=rule), ZOOMR_TREE + parallel) for rule in args.rules]
    runs = {}
    for name, backend, env, extra_args in servers:
        with launch_server(model_path, backend, max_total_tokens=args.max_total_tokens, tiny=args.model_path is None,
                           context_length=context, env=env, extra_args=extra_args) as server:
            runs[name] = load_server(server.url, args, backend)
        runs[name]["startup_seconds"] = server.startup_seconds
        report(name, runs[name], args)
    dense = runs["dense"]
    per_dense = dense["peak_used_tokens"] / max(dense["peak_running"], 1)
    log(f"    dense check from SGLang's pool: {per_dense:.0f} used tokens per running request at the peak "
        f"(a request holds at most {PROMPT_LEN + args.max_new_tokens - 1})")
    for name, run in runs.items():
        log(f"    concurrent requests, {name}: {run['peak_running']} "
            f"({run['peak_running'] / max(dense['peak_running'], 1):.2f}x dense)")
    return runs


def plot(runs: Dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        points = [(t, running) for t, running, _ in run["samples"] if running is not None]
        ax.step([p[0] for p in points], [p[1] for p in points], where="post",
                label=f"{name} ({run['backend']}), peak {run['peak_running']}")
    ax.set_xlabel("seconds since the requests were sent")
    ax.set_ylabel("running requests (sglang:num_running_reqs)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.time()
    settings, model_path, model_name, today = start_run(args, "concurrency benchmark")

    runs = concurrency(args, model_path)

    plot_path = Path(args.plot)
    plot(runs, plot_path, f"Running requests at --max-total-tokens {args.max_total_tokens}, --tp {args.tp}, "
                          f"{args.requests} x {args.max_new_tokens} tokens\n{model_name}, {machine()}, {today}")
    summary = {"concurrent_dense": runs["dense"]["peak_running"],
               "concurrent_zoomr": runs["zoomr observed"]["peak_running"]}
    full = dict(summary=summary, date=today, machine=machine(), model=model_path, zoomr_settings=settings,
                prompt_len=PROMPT_LEN, max_total_tokens=args.max_total_tokens, tp=args.tp, requests=args.requests,
                max_new_tokens=args.max_new_tokens, **runs, seconds=round(time.time() - began, 1), argv=sys.argv[1:])
    log(f"\nplot: {plot_path}")
    finish_run(plot_path.with_suffix(".json"), summary, full, began)


if __name__ == "__main__":
    main()
