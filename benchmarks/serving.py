#!/usr/bin/env python
"""End-to-end serving throughput: dense attention against ZoomR, measured with SGLang's own
``bench_serving`` against a local ``launch_server``.

For the dense backend (``torch_native`` on CPU, ``flashinfer`` on CUDA; ``--dense-backend``) and
then ``zoomr``, with the same settings: start one server (the tiny local model unless
``--model-path``), then for each ``--concurrency`` value run ``python -m sglang.benchmark.serving
--backend sglang`` (the module ``sglang.bench_serving`` forwards to) with its ``random-ids``
dataset: ``rounds x concurrency`` prompts of exactly ``--input-len`` random token ids
(``--tokenize-prompt``, ``--random-range-ratio 1``), each asking for exactly ``--output-len``
tokens. bench_serving sends ``ignore_eos`` by default, so every request generates its full output;
the script checks that from the run's own counts. ``--max-concurrency`` caps the requests in
flight; bench_serving warms up with one short request first. The output token throughput is read
from each run's ``--output-file`` JSON.

After the throughput runs, two checks on the same servers: ``--probe`` greedy requests sent to both
servers, to zoomr with ``custom_params`` ``zoomr_policy: "full"`` (zoomr's whole planning, upload
and decode path, CUDA graphs included, over every position: its tokens must equal dense's, bit for
bit), and zoomr's self-check counters (``ZOOMR_SELF_CHECK_INTERVAL``: sampled steps compared with a
float64 dense reference over the same working set inside the server).

Prints a table (output tokens/s per backend and concurrency, their ratio) and writes the details
to ``--results`` (JSON). The last stdout line is one JSON object (other tools read it):
``{"device": "cpu"|"cuda", "output_throughput": {"dense": {"<concurrency>": tok_per_s, ...},
"zoomr": {...}}, "throughput_ratio": {"<concurrency>": zoomr / dense, ...}}``.

ZoomR settings for the tiny model: ``ZOOMR_SINK=4 ZOOMR_WINDOW=64 ZOOMR_MAX_THOUGHT_TOKENS=48``
unless the environment or ``--zoomr-env`` says otherwise. On CPU both servers get a KV pool that
holds the largest concurrency's requests whole (``--max-total-tokens`` overrides it); on CUDA
SGLang sizes the pool itself unless ``--max-total-tokens`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402  (imports bench_setup first: CPU engine set-up)
    ON_CUDA, add_model_arguments, check_zoomr_env, context_length_for, finish_run, launch_server, log,
    machine, start_run, zoomr_state)
from bench_setup import REPO  # noqa: E402

DEFAULT_DENSE = "flashinfer" if ON_CUDA else "torch_native"
RESULT_KEYS = ("output_throughput", "duration", "completed", "total_output_tokens", "request_throughput",
               "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "mean_e2e_latency_ms")


def positive_ints(parser, name: str, text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        parser.error(f"--{name}={text!r}: distinct comma-separated integers >= 1 allowed")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16", help="--max-concurrency values, comma-separated")
    parser.add_argument("--input-len", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=1024, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="requests per level = rounds x concurrency")
    parser.add_argument("--dense-backend", default=DEFAULT_DENSE, help="SGLang attention backend to compare with")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="KV pool size of both servers (default on CPU: the largest level's requests whole)")
    parser.add_argument("--seed", type=int, default=1, help="bench_serving's random seed (prompts)")
    parser.add_argument("--prefill-backend", default=None,
                        help="prefill attention backend of both servers (SGLang's hybrid routing); default: the decode one")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra launch_server argument for both servers (repeatable, e.g. --server-arg=--load-format=dummy)")
    parser.add_argument("--probe", type=int, default=4, help="greedy requests of the full-policy check (0: off)")
    parser.add_argument("--bench-timeout", type=float, default=900, help="seconds one bench_serving run may take")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "serving.json"),
                        help="JSON path for the full results")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.concurrency = positive_ints(parser, "concurrency", args.concurrency)
    for name in ("input_len", "output_len", "rounds", "max_total_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if args.probe < 0:
        parser.error(f"--probe={args.probe}: must be >= 0")
    if args.bench_timeout <= 0:
        parser.error(f"--bench-timeout={args.bench_timeout}: must be > 0")
    check_dense_backend(parser, args.dense_backend)
    check_zoomr_env(parser, args.zoomr_env)
    return args


def check_dense_backend(parser, backend: str) -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    allowed = [name for name in ATTENTION_BACKEND_CHOICES if name != "zoomr"]
    if backend not in allowed:
        parser.error(f"--dense-backend={backend!r} is not allowed; SGLang's attention backends: {', '.join(allowed)}")


def check_bench_serving_installed() -> None:
    """Fail before any server starts: ``sglang.benchmark.serving`` imports Hugging Face ``datasets``,
    which SGLang's CPU requirements leave out."""
    if importlib.util.find_spec("datasets") is None:
        raise SystemExit("sglang.benchmark.serving needs the `datasets` package: pip install datasets")


def pool_size(args) -> Optional[int]:
    """Both servers' ``--max-total-tokens``: on CPU room for the largest level's requests whole
    (plus 64 tokens of slack each), so dense is never throttled by admission; on CUDA SGLang's own."""
    if args.max_total_tokens is not None or ON_CUDA:
        return args.max_total_tokens
    return max(args.concurrency) * (args.input_len + args.output_len + 64)


def bench_command(url: str, args, concurrency: int, output_file: Path) -> List[str]:
    return [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", url,
            "--dataset-name", "random-ids", "--tokenize-prompt", "--random-range-ratio", "1",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.rounds * concurrency), "--max-concurrency", str(concurrency),
            "--seed", str(args.seed), "--disable-tqdm", "--output-file", str(output_file)]


def run_bench(url: str, args, concurrency: int, workdir: Path, backend: str) -> dict:
    """One bench_serving run; its result (``RESULT_KEYS``) after checking every request gave its
    whole output, plus zoomr's host-tier counters from the server info bench_serving recorded."""
    output_file = workdir / f"{backend}-c{concurrency}.jsonl"
    proc = subprocess.run(bench_command(url, args, concurrency, output_file), capture_output=True, text=True,
                          timeout=args.bench_timeout)
    if proc.returncode != 0 or not output_file.exists():
        raise RuntimeError(f"bench_serving failed ({backend}, concurrency {concurrency}, exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(output_file.read_text().splitlines()[-1])
    n_requests = args.rounds * concurrency
    if result["completed"] != n_requests or result["total_output_tokens"] != n_requests * args.output_len:
        raise RuntimeError(f"{backend}, concurrency {concurrency}: {result['completed']}/{n_requests} requests "
                           f"completed, {result['total_output_tokens']} output tokens (want {n_requests * args.output_len})")
    run = {key: result[key] for key in RESULT_KEYS}
    zoomr = ((result.get("server_info") or {}).get("internal_states") or [{}])[0].get("zoomr")
    if zoomr is not None:
        run["host_tier_after"] = zoomr["host_tier"]
    return run


def measure_backend(backend: str, model_path: str, args, workdir: Path) -> dict:
    """One server, every concurrency level in order, then the probe requests;
    ``{"startup_seconds", "levels": {c: run}, "probe": [output ids], "self_checks"?}``."""
    context = context_length_for(model_path, args.input_len + args.output_len + 8)
    with launch_server(model_path, backend, max_total_tokens=pool_size(args), tiny=args.model_path is None,
                       context_length=context, prefill_backend=args.prefill_backend,
                       extra_args=args.server_arg) as server:
        log(f"    {backend}: server up in {server.startup_seconds:.0f} s")
        levels = {}
        for concurrency in args.concurrency:
            levels[concurrency] = run = run_bench(server.url, args, concurrency, workdir, backend)
            log(f"    {backend}: concurrency {concurrency:>3}: {run['output_throughput']:8.1f} output tok/s "
                f"({run['completed']} requests in {run['duration']:.1f} s, mean TPOT {run['mean_tpot_ms']:.1f} ms)")
        measured = dict(startup_seconds=server.startup_seconds, levels=levels, probe=probe(server.url, args, backend))
        if backend == "zoomr":
            measured["self_checks"] = self_check_counters(zoomr_state(server.url))
    return measured


def probe(url: str, args, backend: str) -> List[List[int]]:
    """Greedy outputs of ``--probe`` prompts; zoomr serves them with its ``full`` policy."""
    params = {"temperature": 0, "max_new_tokens": min(args.output_len, 256), "ignore_eos": True}
    if backend == "zoomr":
        params["custom_params"] = {"zoomr_policy": "full"}
    prompts = [[1] + [(37 * i + 101 * n) % 400 + 6 for i in range(args.input_len)] for n in range(args.probe)]
    if not prompts:
        return []
    reply = requests.post(f"{url}/generate", json={"input_ids": prompts, "sampling_params": params}, timeout=600)
    reply.raise_for_status()
    return [out["output_ids"] for out in reply.json()]


def self_check_counters(state: dict) -> dict:
    """Sampled steps zoomr compared with the dense float64 reference over the same working set."""
    finished = state["finished"].values()
    return {"compared": sum(s["self_checks"] for s in finished),
            "max_error": max((s["self_check_max_error"] for s in finished), default=0.0)}


def print_table(runs: Dict[str, dict], dense_backend: str) -> None:
    header = (f"{'concurrency':>11} {dense_backend + ' tok/s':>18} {'zoomr tok/s':>12} {'zoomr/dense':>11} "
              f"{'dense TPOT ms':>13} {'zoomr TPOT ms':>13}")
    log("\n" + header)
    log("-" * len(header))
    for concurrency, dense in runs["dense"]["levels"].items():
        zoomr = runs["zoomr"]["levels"][concurrency]
        log(f"{concurrency:>11} {dense['output_throughput']:>18.1f} {zoomr['output_throughput']:>12.1f} "
            f"{throughput_ratio(runs, concurrency):>10.2f}x {dense['mean_tpot_ms']:>13.2f} {zoomr['mean_tpot_ms']:>13.2f}")


def throughput_ratio(runs: Dict[str, dict], concurrency: int) -> float:
    """zoomr's output tokens/s over dense's at one concurrency."""
    return (runs["zoomr"]["levels"][concurrency]["output_throughput"]
            / runs["dense"]["levels"][concurrency]["output_throughput"])


def summarize(runs: Dict[str, dict]) -> dict:
    throughput = {name: {str(c): round(run["output_throughput"], 2) for c, run in runs[name]["levels"].items()}
                  for name in ("dense", "zoomr")}
    ratio = {str(c): round(throughput_ratio(runs, c), 3) for c in runs["dense"]["levels"]}
    return {"device": "cuda" if ON_CUDA else "cpu", "output_throughput": throughput, "throughput_ratio": ratio}


def main(argv=None) -> None:
    args = parse_args(argv)
    check_bench_serving_installed()
    began = time.time()
    settings, model_path, model_name, today = start_run(args, "serving benchmark")
    log(f"bench_serving: random-ids, {args.input_len} prompt + {args.output_len} output tokens per request, "
        f"{args.rounds} x concurrency requests per level, --max-concurrency {args.concurrency}, "
        f"--max-total-tokens {pool_size(args) or 'SGLang default'}")

    runs = {}
    with tempfile.TemporaryDirectory(prefix="zoomr-serving-") as workdir:
        for name, backend in (("dense", args.dense_backend), ("zoomr", "zoomr")):
            runs[name] = dict(backend=backend, **measure_backend(backend, model_path, args, Path(workdir)))
    print_table(runs, args.dense_backend)
    identical = [a == b for a, b in zip(runs["dense"]["probe"], runs["zoomr"]["probe"])]
    log(f"zoomr with its full policy gave dense's greedy tokens on {sum(identical)} of {len(identical)} probe requests;"
        f" self-check: {runs['zoomr']['self_checks']}")

    summary = summarize(runs)
    full = dict(summary=summary, probe_identical=identical, date=today, machine=machine(), model=model_path,
                zoomr_settings=settings, prefill_backend=args.prefill_backend, server_args=args.server_arg,
                input_len=args.input_len, output_len=args.output_len, rounds=args.rounds, seed=args.seed,
                max_total_tokens=pool_size(args), **runs, seconds=round(time.time() - began, 1), argv=sys.argv[1:])
    finish_run(Path(args.results), summary, full, began)


if __name__ == "__main__":
    main()
