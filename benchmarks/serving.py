#!/usr/bin/env python
"""Serving that answers a user's question: dense attention against ZoomR through real SGLang
servers, at long contexts and batch sizes, and how many requests each runs at once in the same
GPU memory.

    python benchmarks/serving.py --preset gpu|rehearsal --part probe|timing [--model-path MODEL]
        [--results FILE.json] [--log-dir DIR] [--time-budget SECONDS]

Presets (``serving_presets.py``): ``gpu`` serves a Llama-3.1-8B-shaped random-weight model
(``--load-format dummy``) on one H100/H200, prefill ``triton`` and decode ``flashinfer`` (dense) or
``zoomr``; ``rehearsal`` runs the same command lines at CPU sizes. Without ``--model-path`` the
preset's shaped model (``testbed/shaped_model.py``) is written under ``--log-dir``.

The load (``serving_load.py``): a random-weight model writes no blank line, summary or sentence
end, so the reasoning is in the prompt: each is a question and then thoughts of 200 word ids, a
blank line and a 10-token summary between the markers, up to the cell's context; ZoomR segments it
as pasted reasoning and indexes, votes on and tiers its thoughts like generated ones. In the output
a thought closes at the 256-token cap and a refresh (a vote) comes every 30 tokens
(``refresh_interval``). Both servers get the same token ids and run nothing extra. Not
chosen: forcing the pattern into the output with a custom logit processor (``testbed/forcing.py``),
which reaches a 16K context only by generating 16K tokens (minutes per request) and costs both
servers a Python pass over the batch at every step that no user's server pays.

``--part timing`` (self-checks off): one server per backend in turn, dense first, each warmed up
by one untimed request; then per cell ``(context, batch)`` of the preset, ``batch`` requests of
``context`` prompt tokens sent at once, greedy, ``ignore_eos``, streamed. Per cell and backend:
``output_throughput``, output tokens/s while every request was decoding (null when the server
never ran them all at once); ``e2e_output_throughput`` (prefill and queueing included); the most
requests SGLang ran at once (``sglang:num_running_reqs`` of ``/metrics``, sampled every 0.25 s) and
ZoomR's activity (refreshes, thoughts, host-tier moves). ``--time-budget``: the dense server gets
half the time left after its start (less zoomr's expected start); no cell starts that its
prediction says would not end in its backend's share, and no request runs past the budget.

``--part probe``: ``probe_requests`` greedy requests to dense, then to zoomr with its ``full``
policy (its whole planning and decode path over every position: its tokens must equal dense's),
then with its own policy while ``self_check_interval`` in ``ZOOMR_CONFIG`` compares sampled steps with a float64
reference over the same working set (the interval exceeds the full-policy run's steps, so none of
those steps ran eagerly).

``--results`` is rewritten after every cell; server logs go to ``--log-dir``. The last stdout line
is one JSON object, the results' ``summary``. Timing: ``{"device", "output_throughput": {"dense"|
"zoomr": {"<context>x<batch>": tok/s}}, "throughput_ratio": {cell: zoomr/dense}, "capacity": {cell:
{"dense"|"zoomr": {"running", "output_throughput" (end to end)}}}}``. Probe: ``{"device",
"probe_identical", "full_policy_self_checks", "self_checks": {"compared", "max_error"}, "ok"}``.
Exit status 1 when a server or request failed or the probe found a difference.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ON_CUDA, check_zoomr_env, log, machine, read_metrics, serve, zoomr_state  # noqa: E402
from bench_setup import REPO  # noqa: E402
from serving_load import (  # noqa: E402
    cell_stats, generate, reasoning_prompt, run_requests, vocabulary, zoomr_activity)
from serving_presets import (  # noqa: E402
    BACKENDS, BODY_TOKENS, PARTS, PRESETS, QUESTION_TOKENS, SUMMARY_TOKENS, Preset, server_command, zoomr_env)


def cell_key(context: int, batch: int) -> str:
    return f"{context}x{batch}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if ON_CUDA else "rehearsal")
    parser.add_argument("--part", choices=PARTS, default="timing")
    parser.add_argument("--model-path", default=None, help="a shaped model; default: the preset's, under --log-dir")
    parser.add_argument("--results", default=None, help="JSON path (default benchmarks/results/serving-<part>.json)")
    parser.add_argument("--log-dir", default=None, help="server logs, kept (default: a new temporary folder)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds from start the run may take")
    parser.add_argument("--cells", default=None, help="timing cells CONTEXTxBATCH,... (default: the preset's)")
    parser.add_argument("--zoomr-env", nargs="*", default=[], metavar="ZOOMR_X=VALUE",
                        help="ZoomR settings over the preset's (the environment's ZOOMR_* are not passed on)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if (preset.device == "cuda") != ON_CUDA:
        parser.error(f"--preset {args.preset} runs on {preset.device}; this machine "
                     f"{'has' if ON_CUDA else 'has no'} CUDA GPU")
    check_zoomr_env(parser, args.zoomr_env)
    args.zoomr_overrides = dict(item.split("=", 1) for item in args.zoomr_env)
    try:
        zoomr_env(preset, args.part, args.zoomr_overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget={args.time_budget}: must be > 0")
    try:
        args.cell_list = ([tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")] if args.cells
                          else list(preset.cells))
    except ValueError:
        parser.error(f"--cells={args.cells!r}: CONTEXTxBATCH,... allowed (e.g. 16384x16)")
    if any(len(c) != 2 or min(c) < 1 for c in args.cell_list):
        parser.error(f"--cells={args.cells!r}: CONTEXTxBATCH,... of positive integers allowed")
    return args


class Results:
    """The results JSON, rewritten whole (then renamed into place) whenever something is added,
    so a run stopped at any point leaves everything it measured."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = path, data
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(partial, self.path)


@contextlib.contextmanager
def started(args, preset: Preset, backend: str, model_path: str, log_dir: Path, results: Results, deadline: float):
    """The preset's server for ``backend`` in ``args.part``; what it was started with and its KV
    pool go into the results."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOOMR_")}
    if backend == "zoomr":
        env.update(zoomr_env(preset, args.part, args.zoomr_overrides))
    record = results.data["servers"].setdefault(backend, {"log": str(log_dir / f"{args.part}-{backend}.log")})
    record["zoomr_env"] = {k: v for k, v in env.items() if k.startswith("ZOOMR_")}

    def command(port: int) -> List[str]:
        record["command"] = server_command(preset, args.part, backend, model_path, port)
        return record["command"]

    timeout = min(preset.startup_timeout, max(1.0, deadline - time.time()))
    with serve(command, backend, env=env, timeout=timeout, log_path=Path(record["log"])) as server:
        pool = read_metrics(server.url, ["sglang:max_total_num_tokens"]).get("sglang:max_total_num_tokens")
        record.update(startup_seconds=server.startup_seconds, max_total_num_tokens=None if pool is None else int(pool))
        results.write()
        log(f"  {backend}: up in {server.startup_seconds:.0f} s, KV pool {record['max_total_num_tokens']} tokens")
        yield server


# -- timing ----------------------------------------------------------------------------------------
def predicted_seconds(cell: Tuple[int, int], done: Dict[Tuple[int, int], dict], dense: Optional[dict]) -> float:
    """A cell's expected duration from measured ones: zoomr's, 1.1 x dense's on it; dense's, the
    largest done cell's, its time to the last first token scaled by prompt tokens (prefill) and
    the rest (decode) kept; 0 before any."""
    if dense is not None:
        return 1.1 * dense["seconds"]
    if not done:
        return 0.0
    (context, batch), ref = max(done.items(), key=lambda item: item[0][0] * item[0][1])
    return ref["prefill_seconds"] * cell[0] * cell[1] / (context * batch) + ref["seconds"] - ref["prefill_seconds"]


def measure_cell(url: str, backend: str, cell: Tuple[int, int], preset: Preset, vocab, deadline: float) -> dict:
    key = cell_key(*cell)
    prompts = [reasoning_prompt(cell[0], f"{key}/{i}", vocab) for i in range(cell[1])]
    rids = [f"{backend}-{key}-{i}" for i in range(cell[1])]
    before = zoomr_state(url)
    streams, sampler = run_requests(url, rids, prompts, preset.output_len, deadline)
    result = cell_stats(streams)
    result.update(peak_running=sampler.peak("sglang:num_running_reqs"), peak_queued=sampler.peak("sglang:num_queue_reqs"),
                  peak_token_usage=sampler.peak("sglang:token_usage"))
    if before is not None:
        result["zoomr"] = zoomr_activity(zoomr_state(url), rids, before)
    return result


def run_timing(args, preset: Preset, model_path: str, vocab, log_dir: Path, results: Results, deadline: float) -> bool:
    cells, ok = results.data["cells"], True
    measured: Dict[str, Dict[Tuple[int, int], dict]] = {}
    for backend in BACKENDS:
        todo = args.cell_list if backend == "dense" else [c for c in args.cell_list if c in measured["dense"]]
        measured[backend] = {}
        if not todo:
            break
        try:
            with started(args, preset, backend, model_path, log_dir, results, deadline) as server:
                run_requests(server.url, [f"{backend}-warmup"], [reasoning_prompt(preset.warmup_context, "warmup", vocab)],
                             16, deadline)
                share_end = deadline
                if backend == "dense":  # half of what is left once zoomr has started (about as long as dense)
                    share_end = time.time() + max(0.0, deadline - time.time() - 1.25 * server.startup_seconds - 20) / 2
                for cell in todo:
                    key = cell_key(*cell)
                    dense = measured["dense"].get(cell) if backend == "zoomr" else None
                    if time.time() + predicted_seconds(cell, measured[backend], dense) > share_end:
                        results.data["skipped"][backend].append(key)
                        log(f"  {backend}: {key} skipped (time budget)")
                        continue
                    entry = cells.setdefault(key, {"context": cell[0], "batch": cell[1]})
                    try:
                        entry[backend] = measure_cell(server.url, backend, cell, preset, vocab, deadline)
                    except Exception as error:  # the budget ran out, or the server may be gone: stop here
                        out_of_time = time.time() >= deadline - 1
                        entry[backend] = {"stopped": "time budget"} if out_of_time else {"error": repr(error)[:2000]}
                        ok = ok and out_of_time
                        results.write()
                        break
                    measured[backend][cell] = entry[backend]
                    results.data["summary"] = summarize(cells)
                    results.write()
                    log(f"  {backend}: {key}: {entry[backend]['output_throughput']} tok/s all decoding, "
                        f"{entry[backend]['e2e_output_throughput']} end to end, at most {entry[backend]['peak_running']} running")
        except Exception as error:  # start-up or warm-up failed
            results.data["errors"].append(f"{backend}: {error!r}"[:3000])
            ok = False
    results.data["summary"] = summarize(cells)
    return ok


def summarize(cells: dict) -> dict:
    both = {key: cell for key, cell in cells.items()
            if all("seconds" in cell.get(b, {}) for b in BACKENDS)}
    throughput = {b: {key: cell[b]["output_throughput"] for key, cell in both.items()} for b in BACKENDS}
    ratio = {key: (round(throughput["zoomr"][key] / throughput["dense"][key], 3)
                   if throughput["zoomr"][key] and throughput["dense"][key] else None) for key in both}
    capacity = {key: {b: {"running": cell[b]["peak_running"], "output_throughput": cell[b]["e2e_output_throughput"]}
                      for b in BACKENDS} for key, cell in both.items()}
    return {"device": "cuda" if ON_CUDA else "cpu", "output_throughput": throughput, "throughput_ratio": ratio,
            "capacity": capacity}


def print_table(summary: dict) -> None:
    header = (f"{'cell':>12} {'dense tok/s':>12} {'zoomr tok/s':>12} {'ratio':>7} {'dense run':>9} "
              f"{'zoomr run':>9} {'dense e2e':>10} {'zoomr e2e':>10}")
    log("\n" + header + "\n" + "-" * len(header))
    for key, capacity in summary["capacity"].items():
        d, z = capacity["dense"], capacity["zoomr"]
        log(f"{key:>12} {summary['output_throughput']['dense'][key]!s:>12} {summary['output_throughput']['zoomr'][key]!s:>12} "
            f"{summary['throughput_ratio'][key]!s:>7} {d['running']!s:>9} {z['running']!s:>9} "
            f"{d['output_throughput']:>10} {z['output_throughput']:>10}")


# -- probe -----------------------------------------------------------------------------------------
def run_probe(args, preset: Preset, model_path: str, vocab, log_dir: Path, results: Results, deadline: float) -> bool:
    prompts = [reasoning_prompt(preset.probe_context, f"probe/{i}", vocab) for i in range(preset.probe_requests)]
    full_rids = [f"probe-full-{i}" for i in range(len(prompts))]
    own_rids = [f"probe-zoomr-{i}" for i in range(len(prompts))]
    outputs, state = {}, None
    try:
        for backend in BACKENDS:
            with started(args, preset, backend, model_path, log_dir, results, deadline) as server:
                rids = [f"probe-dense-{i}" for i in range(len(prompts))] if backend == "dense" else full_rids
                outputs[backend] = generate(server.url, prompts, preset.probe_full_tokens, rids, deadline,
                                            None if backend == "dense" else "full")
                if backend == "zoomr":
                    generate(server.url, prompts, preset.probe_sparse_tokens, own_rids, deadline)
                    state = zoomr_state(server.url)
    except Exception as error:
        results.data["errors"].append(repr(error)[:3000])
        results.data["summary"] = {"device": "cuda" if ON_CUDA else "cpu", "ok": False}
        return False
    identical = [a == b for a, b in zip(outputs["dense"], outputs["zoomr"])]
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                        for a, b in zip(outputs["dense"], outputs["zoomr"])]
    full_checks = zoomr_activity(state, full_rids, None)["self_checks"]
    own = zoomr_activity(state, own_rids, None)
    summary = {"device": "cuda" if ON_CUDA else "cpu", "probe_identical": identical,
               "full_policy_self_checks": full_checks,
               "self_checks": {"compared": own["self_checks"], "max_error": own["self_check_max_error"]}}
    summary["ok"] = all(identical) and full_checks == 0 and own["self_checks"] > 0
    results.data.update(summary=summary, first_difference=first_difference, zoomr_own_policy=own)
    log(f"  zoomr's full policy gave dense's greedy tokens on {sum(identical)} of {len(identical)} requests "
        f"(first differences {first_difference}); self-checks {summary['self_checks']}")
    return summary["ok"]


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.time()
    deadline = began + (args.time_budget or 24 * 3600)
    preset = PRESETS[args.preset]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="zoomr-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.model_path is None:
        from testbed.shaped_model import shape_overrides, write_shaped_model

        args.model_path = str(write_shaped_model(log_dir / "model", **shape_overrides(*preset.model_shape)))
    vocab = vocabulary(args.model_path)
    path = Path(args.results or REPO / "benchmarks" / "results" / f"serving-{args.part}.json")
    results = Results(path, {
        "part": args.part, "preset": preset.name, "date": datetime.date.today().isoformat(), "machine": machine(),
        "model": args.model_path, "time_budget": args.time_budget,
        "workload": {"question_tokens": QUESTION_TOKENS, "thought_body_tokens": BODY_TOKENS,
                     "summary_tokens": SUMMARY_TOKENS, "output_len": preset.output_len},
        "servers": {}, "errors": [], "summary": {}, "argv": sys.argv[1:] if argv is None else list(argv)})
    log(f"ZoomR serving, {args.part} part, preset {preset.name}, {results.data['date']}, {machine()}; "
        f"model {args.model_path}; logs {log_dir}; results {path}")
    if args.part == "timing":
        results.data.update(cells_planned=[cell_key(*c) for c in args.cell_list], cells={},
                            skipped={b: [] for b in BACKENDS})
        ok = run_timing(args, preset, args.model_path, vocab, log_dir, results, deadline)
        print_table(results.data["summary"])
    else:
        ok = run_probe(args, preset, args.model_path, vocab, log_dir, results, deadline)
    results.data["seconds"] = round(time.time() - began, 1)
    results.write()
    log(f"total {results.data['seconds']:.0f} s; errors: {results.data['errors'] or 'none'}")
    print(json.dumps(results.data["summary"]), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
