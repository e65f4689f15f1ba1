#!/usr/bin/env python
"""Agent sessions over several turns: what the zoomr radix cache keeps from one turn to the next.

Each of ``--sessions`` concurrent sessions runs ``--turns`` turns in order; a turn's prompt is the
previous turn's prompt, its output and a short new message (a tool result), as in an agent loop.
Three HTTP servers with the same KV pool run the same workload one after the other:

- ``dense_radix``: ``--attention-backend torch_native`` with SGLang's radix cache;
- ``zoomr_stock``: ``--attention-backend zoomr`` with SGLang's radix cache;
- ``zoomr_radix``: ``--attention-backend zoomr --radix-cache-backend zoomr``.

Measured per server: prefill tokens computed (prompt minus SGLang's ``cached_tokens``, summed over
requests), the peak of SGLang's ``sglang:num_used_tokens`` gauge (device KV held by running
requests; the tree's unlocked part is not counted), index entries reused (zoomr's counter), time
to first token and the total time. Then the full-budget check: one session with
``ZOOMR_SINK=0 ZOOMR_WINDOW=100000`` on ``zoomr_radix`` and on zoomr with ``--disable-radix-cache``
must give token-identical greedy outputs on every turn.

A plot and the full results as JSON go to ``--plot``. The last stdout line is one JSON object:
``{"index_entries_reused": int, "identical_outputs": bool, "prefill_tokens": {"dense_radix": int,
"zoomr_stock": int, "zoomr_radix": int}, "resident_peak": {...same keys...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402  (imports bench_setup first: CPU engine set-up)
    GREEDY, add_model_arguments, check_zoomr_env, finish_run, launch_server, log, machine, prompt, read_metrics,
    save_figure, start_run, zoomr_state)
from bench_setup import REPO  # noqa: E402

import requests  # noqa: E402

CONFIGS = {
    "dense_radix": ("torch_native", ()),
    "zoomr_stock": ("zoomr", ()),
    "zoomr_radix": ("zoomr", ("--radix-cache-backend", "zoomr")),
}
FULL_BUDGET = {"ZOOMR_SINK": "0", "ZOOMR_WINDOW": "100000"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4, help="concurrent agent sessions")
    parser.add_argument("--turns", type=int, default=4, help="turns per session")
    parser.add_argument("--max-new-tokens", type=int, default=800, help="output tokens of each turn")
    parser.add_argument("--message-tokens", type=int, default=8, help="tokens of each turn's new message")
    parser.add_argument("--max-total-tokens", type=int, default=16384, help="SGLang's KV pool size (tokens)")
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "agent_workload.png"),
                        help="PNG path; the full results go next to it as .json")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between two GET /metrics")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("sessions", "turns", "max_new_tokens", "message_tokens", "max_total_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.poll <= 0:
        parser.error(f"--poll={args.poll}: must be > 0")
    check_zoomr_env(parser, args.zoomr_env)
    return args


def message(session: int, turn: int, n: int) -> List[int]:
    return [(17 * i + 7 * session + 29 * turn) % 470 + 3 for i in range(n)]


def stream_turn(url: str, input_ids: List[int], max_new_tokens: int) -> dict:
    """One streamed greedy request: output ids, SGLang's ``cached_tokens``, time to first token."""
    start = time.time()
    first = None
    last = None
    with requests.post(f"{url}/generate", stream=True, timeout=600, json={
            "input_ids": input_ids, "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens},
            "stream": True}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            first = first or time.time()
            last = json.loads(line[6:])
    return dict(output_ids=last["output_ids"], prompt_tokens=len(input_ids),
                cached_tokens=last["meta_info"]["cached_tokens"], ttft=first - start, rid=last["meta_info"]["id"])


def run_sessions(url: str, args, sessions: int) -> Dict[str, object]:
    """``sessions`` concurrent sessions of ``args.turns`` turns; the turns in order, with peaks of
    ``sglang:num_used_tokens`` polled meanwhile."""
    turns: List[List[dict]] = [[] for _ in range(sessions)]
    errors: List[str] = []

    def session(s: int) -> None:
        ids = prompt(200 + s)
        try:
            for t in range(args.turns):
                result = stream_turn(url, ids, args.max_new_tokens)
                turns[s].append(result)
                ids = ids + result["output_ids"] + message(s, t, args.message_tokens)
        except Exception as exc:  # reported, never fatal for the other sessions
            errors.append(f"session {s}: {exc}")

    start = time.time()
    threads = [threading.Thread(target=session, args=(s,), daemon=True) for s in range(sessions)]
    for thread in threads:
        thread.start()
    peak_used = 0
    while any(t.is_alive() for t in threads):
        peak_used = max(peak_used, int(read_metrics(url, ["sglang:num_used_tokens"]).get("sglang:num_used_tokens", 0)))
        time.sleep(args.poll)
    flat = [r for per_session in turns for r in per_session]
    return dict(seconds=round(time.time() - start, 1), errors=errors, turns=turns, peak_used_tokens=peak_used,
                prefill_tokens=sum(r["prompt_tokens"] - r["cached_tokens"] for r in flat),
                cached_tokens=sum(r["cached_tokens"] for r in flat),
                ttft_mean=round(sum(r["ttft"] for r in flat) / max(len(flat), 1), 3),
                ttft_later_turns=round(sum(r["ttft"] for s in turns for r in s[1:]) / max(sum(len(s[1:]) for s in turns), 1), 3))


def workload(args, model_path: str) -> Dict[str, dict]:
    runs = {}
    for name, (backend, extra) in CONFIGS.items():
        with launch_server(model_path, backend, max_total_tokens=args.max_total_tokens, tiny=args.model_path is None,
                           extra_args=extra) as server:
            run = run_sessions(server.url, args, args.sessions)
            state = zoomr_state(server.url)
        if state is not None:
            run["index_entries_reused"] = state["index_entries_reused"]
            run["host_tier"] = state["host_tier"]
            run["radix"] = state.get("radix")
            stats = [state["finished"].get(r["rid"]) for s in run["turns"] for r in s]
            run["resident_max_per_request"] = max((s["resident_max"] for s in stats if s), default=None)
        runs[name] = run
        log(f"    {name:12} prefill {run['prefill_tokens']:>6} tokens (cached {run['cached_tokens']}), peak used "
            f"{run['peak_used_tokens']:>6}, index entries reused {run.get('index_entries_reused', '-')}, TTFT "
            f"{run['ttft_mean']:.3f} s (later turns {run['ttft_later_turns']:.3f} s), total {run['seconds']:.0f} s"
            + (f", errors {run['errors']}" if run["errors"] else ""))
    return runs


def full_budget_check(args, model_path: str) -> bool:
    """One session at a budget covering everything: zoomr radix cache vs radix cache off."""
    saved = {k: os.environ.get(k) for k in FULL_BUDGET}
    os.environ.update(FULL_BUDGET)
    outputs = {}
    try:
        for name, extra in (("zoomr_radix", ("--radix-cache-backend", "zoomr")), ("no_radix", ("--disable-radix-cache",))):
            with launch_server(model_path, "zoomr", max_total_tokens=args.max_total_tokens,
                               tiny=args.model_path is None, extra_args=extra) as server:
                run = run_sessions(server.url, args, 1)
            outputs[name] = [r["output_ids"] for r in run["turns"][0]]
            if name == "zoomr_radix":
                hits = [r["cached_tokens"] for r in run["turns"][0][1:]]
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    identical = outputs["zoomr_radix"] == outputs["no_radix"] and len(outputs["no_radix"]) == args.turns
    log(f"    full budget, {args.turns} turns: zoomr radix == radix off: {identical} (turn 2+ cached tokens {hits})")
    return identical


def plot(runs: Dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    panels = (("prefill_tokens", "prefill tokens computed"), ("peak_used_tokens", "peak device KV in use (tokens)"),
              ("ttft_later_turns", "time to first token, turns 2+ (s)"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, (key, label) in zip(axes, panels):
        bars = ax.bar(names, [runs[n][key] for n in names], color=["#888888", "#6a9fd4", "#1f5fa8"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.time()
    settings, model_path, model_name, today = start_run(args, "agent workload benchmark")
    log(f"\n{args.sessions} sessions x {args.turns} turns of {args.max_new_tokens} tokens, "
        f"{args.message_tokens}-token messages, --max-total-tokens {args.max_total_tokens}")
    runs = workload(args, model_path)
    identical = full_budget_check(args, model_path)
    summary = {
        "index_entries_reused": int(runs["zoomr_radix"].get("index_entries_reused", 0)),
        "identical_outputs": identical,
        "prefill_tokens": {name: run["prefill_tokens"] for name, run in runs.items()},
        "resident_peak": {name: run["peak_used_tokens"] for name, run in runs.items()},
    }
    plot_path = Path(args.plot)
    plot(runs, plot_path, f"{args.sessions} agent sessions x {args.turns} turns x {args.max_new_tokens} tokens, "
                          f"{model_name}, {machine()}, {today}")
    details = dict(summary=summary, date=today, machine=machine(), model=model_path, zoomr_settings=settings,
                   sessions=args.sessions, turns=args.turns, max_new_tokens=args.max_new_tokens,
                   message_tokens=args.message_tokens, max_total_tokens=args.max_total_tokens, **runs,
                   seconds=round(time.time() - began, 1), argv=sys.argv[1:])
    log(f"\nplot: {plot_path}")
    finish_run(plot_path.with_suffix(".json"), summary, details, began)


if __name__ == "__main__":
    main()
