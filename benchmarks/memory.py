#!/usr/bin/env python
"""Device-resident KV tokens per request vs output length: ZoomR with the host tier against dense
attention, in SGLang itself.

One ``launch_server --attention-backend zoomr`` gets one batched greedy ``ignore_eos`` ``/generate``
with one request per output length (``--lengths``), all running at once (the pool holds them all
whole). Each request's counters come from SGLang's server info
(``internal_states[0]["zoomr"]["finished"][rid]``): ``resident_last`` (its device-resident tokens
at its last decode step: sequence length minus the tokens whose device slots the host tier gave
back), ``resident_max`` and ``dense_last`` (its sequence length at that step, which is what dense
attention keeps resident). The script checks that ``dense_last`` equals prompt + output - 1 (the
last sampled token's KV is never written); ``benchmarks/concurrency.py`` reads a dense server's
pool from SGLang's own gauges instead.

Then a plot (resident tokens vs output length, dense vs zoomr) and the full results as JSON next to
it. The last stdout line is one JSON object (other tools read it):
``{"resident_ratio": {"<output_len>": dense_resident / zoomr_resident, ...}}`` (at the last step).

With the tiny local model (default; random weights, it writes "\\n\\n" often, so thoughts close) the
ZoomR settings are ``ZOOMR_SINK=4 ZOOMR_WINDOW=64 ZOOMR_MAX_THOUGHT_TOKENS=48`` unless the environment
or ``--zoomr-env`` says otherwise. On a CPU machine ``bench_setup`` sets up SGLang's CPU engine with
one OpenMP thread (spinning OpenMP threads made each decode step over ten times slower there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402  (imports bench_setup first: CPU engine set-up)
    GREEDY, ON_CUDA, PROMPT_LEN, add_model_arguments, check_zoomr_env, context_length_for,
    finish_run, launch_server, log, machine, prompt, save_figure, start_run, zoomr_state)
from bench_setup import REPO  # noqa: E402

import requests  # noqa: E402

DEFAULT_LENGTHS = "1024,4096,16384,32768" if ON_CUDA else "1024,2048,4096,8192"
GENERATE_TIMEOUT = 3600  # seconds; the CPU defaults generate for under a minute on 2 cores


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"output lengths, comma-separated (default here: {DEFAULT_LENGTHS})")
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "memory.png"),
                        help="PNG path; the full results go next to it as .json")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lengths={args.lengths!r}: comma-separated integers >= 2 allowed")
    if not args.lengths or min(args.lengths) < 2:
        parser.error(f"--lengths={args.lengths}: output lengths >= 2 needed")
    check_zoomr_env(parser, args.zoomr_env)
    return args


def generate_all(url: str, prompts: List[List[int]], lengths: List[int]) -> Tuple[List[dict], dict, float]:
    """One batched ``/generate`` (all requests start together), then the backend's counters."""
    started = time.time()
    reply = requests.post(f"{url}/generate", timeout=GENERATE_TIMEOUT, json={
        "input_ids": prompts, "sampling_params": [{**GREEDY, "max_new_tokens": n} for n in lengths]})
    reply.raise_for_status()
    generated = time.time() - started
    return reply.json(), zoomr_state(url), generated


def resident_rows(outputs: List[dict], state: dict, lengths: List[int], prompts: List[List[int]]) -> List[dict]:
    rows = []
    for out, length, p in zip(outputs, lengths, prompts):
        s = state["finished"][out["meta_info"]["id"]]
        produced = len(out["output_ids"])
        rows.append(dict(
            output_len=length, produced=produced, prompt_len=len(p), dense_resident=s["dense_last"],
            dense_check=s["dense_last"] == len(p) + produced - 1, zoomr_resident_last=s["resident_last"],
            zoomr_resident_max=s["resident_max"], offloaded_last=s["offloaded_last"],
            ratio_last=s["dense_last"] / s["resident_last"], ratio_max=s["dense_last"] / s["resident_max"],
            attended_last=s["attended_last"], bound_last=s["bound_last"], over_bound_steps=s["over_bound_steps"],
            thoughts_closed=s["thoughts_closed"], summaries=s["summaries"], steps=s["steps"],
        ))
    return rows


def print_rows(rows: List[dict]) -> None:
    log("    dense resident = the request's sequence length at its last decode step (= prompt + output - 1: "
        "the last sampled token's KV is never written); checked for every request: "
        + ("yes" if all(r["dense_check"] for r in rows) else "NO, see dense_check in the JSON"))
    header = (f"{'output':>7} {'dense resident':>14} {'zoomr last':>10} {'zoomr max':>9} {'ratio (last)':>12} "
              f"{'ratio (max)':>11} {'thoughts':>8}")
    log(header)
    log("-" * len(header))
    for r in rows:
        log(f"{r['output_len']:>7} {r['dense_resident']:>14} {r['zoomr_resident_last']:>10} "
            f"{r['zoomr_resident_max']:>9} {r['ratio_last']:>11.2f}x {r['ratio_max']:>10.2f}x {r['thoughts_closed']:>8}")


def resident_vs_length(args, model_path: str) -> Tuple[List[dict], dict]:
    lengths = args.lengths
    prompts = [prompt(n) for n in range(len(lengths))]
    # Room for every request whole, so all of them run at once from the first step.
    pool = sum(len(p) + n for p, n in zip(prompts, lengths)) + 256 * len(lengths)
    context = context_length_for(model_path, PROMPT_LEN + max(lengths) + 8)
    log(f"\nresident KV tokens per request: one zoomr server, {len(lengths)} concurrent requests "
        f"(prompt {PROMPT_LEN} tokens, outputs {lengths}), --max-total-tokens {pool}"
        + (f", --context-length {context}" if context else ""))
    start = time.time()
    with launch_server(model_path, "zoomr", max_total_tokens=pool, tiny=args.model_path is None,
                       context_length=context) as server:
        outputs, state, generated = generate_all(server.url, prompts, lengths)
    rows = resident_rows(outputs, state, lengths, prompts)
    host = state["host_tier"] or {}
    log(f"    server up and done in {time.time() - start:.0f} s ({generated:.0f} s generating); "
        f"host tier: {json.dumps(host)}")
    print_rows(rows)
    if any(r["produced"] != r["output_len"] for r in rows):
        raise RuntimeError(f"a request stopped early: {[(r['output_len'], r['produced']) for r in rows]}")
    return rows, host


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = [r["output_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lengths, [r["dense_resident"] for r in rows], "o-", label="dense attention (whole sequence)")
    ax.plot(lengths, [r["zoomr_resident_last"] for r in rows], "s-", label="zoomr + host tier, last step")
    ax.plot(lengths, [r["zoomr_resident_max"] for r in rows], "s--", alpha=0.6, label="zoomr + host tier, peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("output tokens per request")
    ax.set_ylabel("device-resident KV tokens per request")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.time()
    settings, model_path, model_name, today = start_run(args, "memory benchmark")

    rows, host = resident_vs_length(args, model_path)

    plot_path = Path(args.plot)
    plot(rows, plot_path, f"ZoomR host tier vs dense: device-resident KV per request\n{model_name}, {machine()}, {today}")
    summary = {"resident_ratio": {str(r["output_len"]): round(r["ratio_last"], 3) for r in rows}}
    full = dict(summary=summary, date=today, machine=machine(), model=model_path, zoomr_settings=settings,
                prompt_len=PROMPT_LEN, resident=rows, resident_host_tier=host,
                seconds=round(time.time() - began, 1), argv=sys.argv[1:])
    log(f"\nplot: {plot_path}")
    finish_run(plot_path.with_suffix(".json"), summary, full, began)


if __name__ == "__main__":
    main()
