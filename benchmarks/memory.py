#!/usr/bin/env python
"""Device-resident KV memory of ZoomR with the host tier against dense attention, in SGLang itself.

Two questions, answered side by side in one run:

1. **Resident KV tokens per request vs output length.** One ``sglang.Engine(attention_backend="zoomr")``
   runs one greedy ``ignore_eos`` request per output length, all at once. Each request's counters come
   from SGLang's server info (``internal_states[0]["zoomr"]["finished"][rid]``): ``resident_last`` (its
   device-resident tokens at its last decode step: sequence length minus the tokens whose device slots
   the host tier gave back), ``resident_max`` and ``dense_last`` (its sequence length at that step,
   which is what dense attention keeps resident). The dense count is not polled from a second
   ``torch_native`` engine (the blocking Engine API cannot poll mid-run); instead the script checks
   that ``dense_last`` equals prompt + output - 1 (the last sampled token's KV is never written), and
   part 2 reads a dense server's pool from SGLang's own ``sglang:num_used_tokens`` gauge.
2. **Concurrent requests at one fixed ``--max-total-tokens``.** Two HTTP servers, one after the other
   (``--attention-backend torch_native``, then ``zoomr``), each get ``--requests`` concurrent greedy
   ``ignore_eos`` requests of ``--max-new-tokens`` tokens. ``GET /metrics`` is polled every
   ``--poll`` seconds; the peaks of SGLang's own gauges ``sglang:num_running_reqs`` and
   ``sglang:num_used_tokens`` are recorded until every request finished. zoomr's host-tier counters
   come from ``/server_info`` afterwards (``zoom_in_failures`` must be 0).

Then a plot (resident tokens vs output length, dense vs zoomr) and the full results as JSON next to it.
The last stdout line is one JSON object (other tools read it):
``{"resident_ratio": {"<output_len>": dense_resident / zoomr_resident, ...}, "concurrent_dense": int,
"concurrent_zoomr": int}``.

With the tiny local model (default; random weights, it writes "\\n\\n" often, so thoughts close) the
ZoomR settings are ``ZOOMR_SINK=4 ZOOMR_WINDOW=64 ZOOMR_MAX_THOUGHT_TOKENS=48`` unless the environment
or ``--zoomr-env`` says otherwise. On a CPU machine the script sets up SGLang's CPU engine itself
(``SGLANG_USE_CPU_ENGINE=1``, ``cpu_shim/`` on ``PYTHONPATH``) and runs SGLang with one OpenMP thread
(``OMP_NUM_THREADS=1`` unless set): on a small shared machine OpenMP's spinning threads made each decode
step over ten times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ON_CUDA, REPO  # noqa: E402  (before sglang: CPU engine set-up)

import torch  # noqa: E402

DEFAULT_LENGTHS = "1024,4096,16384,32768" if ON_CUDA else "1024,2048,4096,8192"
TINY_MODEL_SETTINGS = {"ZOOMR_SINK": "4", "ZOOMR_WINDOW": "64", "ZOOMR_MAX_THOUGHT_TOKENS": "48"}
PROMPT_LEN = 16
GREEDY = {"temperature": 0, "ignore_eos": True}
METRICS = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens", "sglang:token_usage",
           "sglang:kv_available_tokens", "sglang:num_retracted_reqs", "sglang:num_retracted_requests_total")


def log(message: str = "") -> None:
    print(message, flush=True)


# -- set-up ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"output lengths of part 1, comma-separated (default here: {DEFAULT_LENGTHS})")
    parser.add_argument("--max-total-tokens", type=int, default=6000,
                        help="SGLang's KV pool size (tokens) of both servers in part 2")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests sent to each server in part 2")
    parser.add_argument("--max-new-tokens", type=int, default=1500, help="output tokens of each part-2 request")
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "memory.png"),
                        help="PNG path; the full results go next to it as .json")
    parser.add_argument("--zoomr-env", nargs="*", default=[], metavar="ZOOMR_X=VALUE",
                        help="ZoomR settings overriding the benchmark's defaults and the environment")
    parser.add_argument("--model-path", default=None, help="default: the tiny local random-weight model")
    parser.add_argument("--poll", type=float, default=0.3, help="seconds between two GET /metrics")
    parser.add_argument("--server-timeout", type=float, default=300,
                        help="seconds a part-2 load may run before the rest is abandoned (reported)")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not args.lengths or min(args.lengths) < 2:
        parser.error("--lengths needs output lengths >= 2")
    for item in args.zoomr_env:
        if "=" not in item or not item.startswith("ZOOMR_"):
            parser.error(f"--zoomr-env takes ZOOMR_NAME=VALUE items, not {item!r}")
    return args


def apply_zoomr_settings(args) -> Dict[str, str]:
    """Benchmark defaults (tiny model only) < the environment < ``--zoomr-env``; validated here."""
    if args.model_path is None:
        for key, value in TINY_MODEL_SETTINGS.items():
            os.environ.setdefault(key, value)
    for item in args.zoomr_env:
        key, value = item.split("=", 1)
        os.environ[key] = value
    from zoomr_sglang.config import load_config

    args.config = load_config()  # a bad value stops here, naming the variable
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOOMR_")}


def model_max_positions(model_path: str) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(model_path) / "config.json").read_text())
        return config.get("max_position_embeddings")
    return None


def context_length_for(model_path: str, needed: int) -> Optional[int]:
    """A ``context_length`` to pass when the model's own is too short for the longest request."""
    limit = model_max_positions(model_path)
    if limit is None or needed <= limit:
        return None
    os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
    return -(-needed // 1024) * 1024


def per_request_bound(config) -> int:
    """``ZoomRController.device_tokens_per_request`` for ``config`` (it reads only the config)."""
    from types import SimpleNamespace

    from zoomr_sglang.attention_backend.controller import ZoomRController

    return ZoomRController.device_tokens_per_request(SimpleNamespace(config=config))


def machine() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


def prompt(n: int) -> List[int]:
    """A distinct ``PROMPT_LEN``-token prompt per request (only the BOS token is shared)."""
    return [0] + [(13 * i + 31 * n) % 480 + 2 + n % 17 for i in range(PROMPT_LEN - 1)]


def engine_kwargs(tiny: bool) -> dict:
    """tests/engine_utils.py's ENGINE_ARGS on the CPU; on CUDA the tiny model runs in bfloat16."""
    if ON_CUDA:
        return dict(device="cuda", skip_server_warmup=True, **({"dtype": "bfloat16"} if tiny else {}))
    return dict(device="cpu", dtype="float32", mem_fraction_static=0.05, skip_server_warmup=True)


# -- part 1: resident tokens per request ------------------------------------------------------------
def resident_vs_length(args, model_path: str) -> Tuple[List[dict], dict]:
    import sglang

    lengths = args.lengths
    prompts = [prompt(n) for n in range(len(lengths))]
    # Room for every request whole, so all of them run at once from the first step.
    pool = sum(len(p) + n for p, n in zip(prompts, lengths)) + 256 * len(lengths)
    extra = {}
    context = context_length_for(model_path, PROMPT_LEN + max(lengths) + 8)
    if context is not None:
        extra["context_length"] = context
    log(f"\n[1] resident KV tokens per request: one zoomr engine, {len(lengths)} concurrent requests "
        f"(prompt {PROMPT_LEN} tokens, outputs {lengths}), max_total_tokens={pool}"
        + (f", context_length={context}" if context else ""))
    start = time.time()
    eng = sglang.Engine(model_path=model_path, attention_backend="zoomr", max_total_tokens=pool,
                        **engine_kwargs(args.model_path is None), **extra)
    try:
        started = time.time()
        outputs = eng.generate(input_ids=prompts, sampling_params=[{**GREEDY, "max_new_tokens": n} for n in lengths])
        generated = time.time() - started
        state = eng.get_server_info()["internal_states"][0]["zoomr"]
    finally:
        eng.shutdown()
    rows = []
    for out, length, p in zip(outputs, lengths, prompts):
        s = state["finished"][out["meta_info"]["id"]]
        produced = len(out["output_ids"])
        expected_dense = len(p) + produced - 1
        rows.append(dict(
            output_len=length, produced=produced, prompt_len=len(p), dense_resident=s["dense_last"],
            dense_check=s["dense_last"] == expected_dense, zoomr_resident_last=s["resident_last"],
            zoomr_resident_max=s["resident_max"], offloaded_last=s["offloaded_last"],
            ratio_last=s["dense_last"] / s["resident_last"], ratio_max=s["dense_last"] / s["resident_max"],
            attended_last=s["attended_last"], bound_last=s["bound_last"], over_bound_steps=s["over_bound_steps"],
            thoughts_closed=s["thoughts_closed"], summaries=s["summaries"], steps=s["steps"],
        ))
    host = state["host_tier"] or {}
    log(f"    engine up and done in {time.time() - start:.0f} s ({generated:.0f} s generating); "
        f"host tier: {json.dumps(host)}")
    log("    dense resident = the request's sequence length at its last decode step (= prompt + output - 1: "
        "the last sampled token's KV is never written); checked for every request: "
        + ("yes" if all(r["dense_check"] for r in rows) else "NO, see dense_check in the JSON"))
    header = f"{'output':>7} {'dense resident':>14} {'zoomr last':>10} {'zoomr max':>9} {'ratio (last)':>12} {'ratio (max)':>11} {'thoughts':>8}"
    log(header)
    log("-" * len(header))
    for r in rows:
        log(f"{r['output_len']:>7} {r['dense_resident']:>14} {r['zoomr_resident_last']:>10} {r['zoomr_resident_max']:>9} "
            f"{r['ratio_last']:>11.2f}x {r['ratio_max']:>10.2f}x {r['thoughts_closed']:>8}")
    if any(r["produced"] != r["output_len"] for r in rows):
        raise RuntimeError(f"a request stopped early: {[(r['output_len'], r['produced']) for r in rows]}")
    return rows, host


# -- part 2: concurrent requests under one KV budget -------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_metrics(text: str) -> Dict[str, float]:
    """The gauges/counters of ``METRICS`` from Prometheus text (largest value over label sets)."""
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            with contextlib.suppress(ValueError):
                value = float(line.rsplit(" ", 1)[1])
                values[name] = max(values.get(name, value), value)
    return values


@contextlib.contextmanager
def launch_server(model_path: str, backend: str, max_total_tokens: int, context: Optional[int], tiny: bool,
                  timeout: float = 300):
    import requests
    from sglang.srt.utils import kill_process_tree

    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
               "--port", str(port), "--attention-backend", backend, "--max-total-tokens", str(max_total_tokens),
               "--enable-metrics", "--skip-server-warmup"]
    if ON_CUDA:
        command += ["--device", "cuda"] + (["--dtype", "bfloat16"] if tiny else [])
    else:
        command += ["--device", "cpu", "--dtype", "float32", "--mem-fraction-static", "0.05"]
    if context is not None:
        command += ["--context-length", str(context)]
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"zoomr-memory-bench-{backend}-{port}.log"
    err = open(err_path, "w")
    proc = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                err.flush()
                raise RuntimeError(f"{backend} server exited with {proc.returncode}: {err_path.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"{backend} server did not become healthy in {timeout:.0f} s ({err_path})")
            time.sleep(0.5)
        yield url
    finally:
        kill_process_tree(proc.pid)
        err.close()
        with contextlib.suppress(OSError):
            err_path.unlink()


def retracted(peaks: Dict[str, float]) -> Optional[int]:
    """Retractions SGLang counted: its counter (exported from the first retraction on), else the peak
    of its per-interval gauge (0: none seen); None when neither is exported."""
    for name in ("sglang:num_retracted_requests_total", "sglang:num_retracted_reqs"):
        if name in peaks:
            return int(peaks[name])
    return None


def load_server(url: str, args, backend: str) -> dict:
    """Send ``--requests`` concurrent requests and record the peaks of SGLang's gauges until all finish."""
    import requests

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
    start = time.time()
    for t in threads:
        t.start()
    peaks: Dict[str, float] = {}
    samples = []
    while any(t.is_alive() for t in threads) and time.time() - start < args.server_timeout:
        with contextlib.suppress(requests.RequestException):
            values = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
            samples.append((round(time.time() - start, 2), values.get("sglang:num_running_reqs"),
                            values.get("sglang:num_used_tokens")))
            for name, value in values.items():
                peaks[name] = max(peaks.get(name, value), value)
        time.sleep(args.poll)
    elapsed = time.time() - start
    with contextlib.suppress(requests.RequestException):  # the counters after the last request
        for name, value in parse_metrics(requests.get(f"{url}/metrics", timeout=5).text).items():
            peaks[name] = max(peaks.get(name, value), value)
    finished = sum(r is not None and len(r.get("output_ids", [])) == args.max_new_tokens for r in results)
    info = requests.get(f"{url}/server_info", timeout=30).json()
    zoomr = (info.get("internal_states") or [{}])[0].get("zoomr")
    out = dict(backend=backend, seconds=round(elapsed, 1), finished=finished, errors=errors[:5],
               peak_running=int(peaks.get("sglang:num_running_reqs", 0)),
               peak_used_tokens=int(peaks.get("sglang:num_used_tokens", 0)),
               peak_token_usage=peaks.get("sglang:token_usage"),
               retracted=retracted(peaks), peaks=peaks, samples=samples)
    if zoomr is not None:
        finished_stats = zoomr["finished"].values()
        out["host_tier"] = zoomr["host_tier"]
        out["pools_after"] = zoomr["pools"]
        out["resident_max_per_request"] = max((s["resident_max"] for s in finished_stats), default=None)
        out["over_bound_steps"] = sum(s["over_bound_steps"] for s in finished_stats)
    return out


def concurrency(args, model_path: str) -> Dict[str, dict]:
    context = context_length_for(model_path, PROMPT_LEN + args.max_new_tokens + 8)
    log(f"\n[2] concurrent requests at --max-total-tokens {args.max_total_tokens}: {args.requests} requests "
        f"of {PROMPT_LEN} + {args.max_new_tokens} tokens per server, peaks of SGLang's /metrics gauges")
    runs = {}
    for name, backend in (("dense", "torch_native"), ("zoomr", "zoomr")):
        start = time.time()
        with launch_server(model_path, backend, args.max_total_tokens, context, args.model_path is None) as url:
            up = time.time() - start
            runs[name] = run = load_server(url, args, backend)
        run["startup_seconds"] = round(up, 1)
        log(f"    {name:5} ({backend}): peak running {run['peak_running']:>3}, peak used tokens "
            f"{run['peak_used_tokens']:>6} of {args.max_total_tokens}, finished {run['finished']}/{args.requests} "
            f"in {run['seconds']:.0f} s (server start {up:.0f} s), retracted {run['retracted']}"
            + (f", errors: {run['errors']}" if run["errors"] else ""))
        if name == "zoomr":
            host = run.get("host_tier") or {}
            log(f"           host tier: {json.dumps(host)}; per-request resident max "
                f"{run.get('resident_max_per_request')}; over-bound steps {run.get('over_bound_steps')}")
            if host.get("zoom_in_failures"):
                log(f"    WARNING: {host['zoom_in_failures']} zoom-ins found SGLang's pool empty (must be 0)")
            if host.get("host_full"):
                log(f"    note: the host tier was full {host['host_full']} times (those thoughts stayed on the device; "
                    f"ZOOMR_HOST_POOL_GB sizes it, default twice the device pool)")
    dense, zoomr = runs["dense"], runs["zoomr"]
    per_dense = dense["peak_used_tokens"] / max(dense["peak_running"], 1)
    log(f"    dense check from SGLang's pool: {per_dense:.0f} used tokens per running request at the peak "
        f"(a request holds at most {PROMPT_LEN + args.max_new_tokens - 1})")
    ratio = zoomr["peak_running"] / max(dense["peak_running"], 1)
    log(f"    concurrent requests: dense {dense['peak_running']}, zoomr {zoomr['peak_running']} ({ratio:.2f}x)")
    return runs


# -- plot and report ------------------------------------------------------------------------------
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.time()
    settings = apply_zoomr_settings(args)
    if args.model_path is None:
        from testbed.tiny_model import tiny_model_dir

        model_path, model_name = str(tiny_model_dir()), "tiny random-weight model"
    else:
        model_path = model_name = args.model_path
    today = datetime.date.today().isoformat()
    log(f"ZoomR memory benchmark, {today}, {machine()} ({platform.node()}), SGLang's {'CUDA' if ON_CUDA else 'CPU'} engine")
    log(f"model: {model_name} ({model_path})")
    log(f"ZoomR settings: {settings}; admission counts {per_request_bound(args.config)} device tokens per "
        f"running zoomr request besides prompt and summaries")
    if not ON_CUDA:
        log(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    rows, host = resident_vs_length(args, model_path)
    runs = concurrency(args, model_path)

    plot_path = Path(args.plot)
    title = (f"ZoomR host tier vs dense: device-resident KV per request\n{model_name}, {machine()}, {today}")
    plot(rows, plot_path, title)
    summary = {
        "resident_ratio": {str(r["output_len"]): round(r["ratio_last"], 3) for r in rows},
        "concurrent_dense": runs["dense"]["peak_running"],
        "concurrent_zoomr": runs["zoomr"]["peak_running"],
    }
    full = dict(summary=summary, date=today, machine=machine(), model=model_path, zoomr_settings=settings,
                prompt_len=PROMPT_LEN, resident=rows, resident_host_tier=host,
                concurrency=dict(max_total_tokens=args.max_total_tokens, requests=args.requests,
                                 max_new_tokens=args.max_new_tokens, **runs),
                seconds=round(time.time() - began, 1), argv=sys.argv[1:])
    json_path = plot_path.with_suffix(".json")
    json_path.write_text(json.dumps(full, indent=1) + "\n")
    log(f"\nplot: {plot_path}\nresults: {json_path}\ntotal {time.time() - began:.0f} s")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
