#!/usr/bin/env python
"""A soak: one zoomr server under a long mixed load with aborts and memory pressure; nothing leaks.

One ``launch_server --attention-backend zoomr --radix-cache-backend zoomr --enable-metrics`` on
loopback, host tier on, a pool small enough (``--max-total-tokens``) that SGLang evicts its tree,
with SGLang's strict idle and busy leak checks on (a leak stops the scheduler, which then fails
every request). The host tier keeps the pool from running out, so retraction is also forced every
``--retract-every`` scheduler steps with SGLang's own test switch (``SGLANG_TEST_RETRACT``), which
runs the same retraction path. ``--workers`` client threads send requests for
``--minutes``: streaming and not, prompts new or carrying an earlier answer (agent turns) or a
shared prefix, outputs of 16 to ``--max-new-tokens`` tokens, policies, budgets and vote modes
mixed, greedy or sampled. Some are aborted with ``/abort_request`` or dropped by the client
mid-generation (mid-thought, mid-summary, mid-zoom-in: wherever they happen to be), some carry a
bad per-request setting (HTTP 400 naming it expected), some are greedy with a budget covering
their whole length.

At the end: no request failed that should not have; every completed budget-covering greedy
request equals its dense answer (the same prompt with ``zoomr_policy=full``); once idle, SGLang's
pool, its request rows, the index and the host tier hold nothing but the radix tree, and after
``/flush_cache`` nothing at all, as at start (read from SGLang's ``/server_info`` and zoomr's
counters there); zoomr's Prometheus counters are on ``/metrics``. The last stdout line is one JSON
object: ``{"requests": int, "aborts": int, "errors": int, "retractions": int, "counts_restored": bool}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (  # noqa: E402  (imports bench_setup first: CPU engine set-up)
    add_model_arguments, check_zoomr_env, finish_run, launch_server, log, prompt, read_metrics, start_run,
    zoomr_state)
from bench_setup import REPO  # noqa: E402

import requests  # noqa: E402

STRICT_CHECKS = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
ZOOMR_METRICS = ("sglang:zoomr_resident_tokens", "sglang:zoomr_host_tier_tokens", "sglang:zoomr_evicted_tokens_total",
                 "sglang:zoomr_zoomed_in_tokens_total", "sglang:zoomr_copied_bytes_total",
                 "sglang:zoomr_over_bound_steps_total")
RETRACTED = ("sglang:num_retracted_requests_total", "sglang:num_retracted_reqs")
# Dense requests ("full") are never tiered: they fill the pool and make SGLang retract.
POLICY_MIX = [("zoomr", 0)] * 5 + [("zoomr", 512), ("sumr", 0), ("full", 0), ("full", 0), ("streaming", 256),
                                   ("random", 0), ("h2o", 512)]
NEAR_TIE = 1e-3  # a greedy pick this close to the runner-up may flip with the batch's float rounding


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long the load runs")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--max-new-tokens", type=int, default=1200, help="longest output asked for")
    parser.add_argument("--max-total-tokens", type=int, default=2000, help="SGLang's KV pool size (tokens)")
    parser.add_argument("--retract-every", type=int, default=150,
                        help="also retract every N scheduler steps (SGLang's SGLANG_TEST_RETRACT; 0: only when "
                             "the pool runs out, which the host tier makes rare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"), help="full results JSON")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.workers < 1 or args.max_new_tokens < 16 or args.max_total_tokens < 256:
        parser.error("--minutes > 0, --workers >= 1, --max-new-tokens >= 16 and --max-total-tokens >= 256")
    check_zoomr_env(parser, args.zoomr_env)
    return args


class Load:
    """The client side: what was sent, what came back, what must be checked at the end."""

    def __init__(self, url: str, args) -> None:
        self.url, self.args = url, args
        self.lock = threading.Lock()
        self.counts: Dict[str, int] = dict(requests=0, completed=0, aborts=0, disconnects=0, rejected=0, errors=0)
        self.errors: List[str] = []
        self.exact: List[dict] = []  # budget-covering greedy requests and their outputs
        self.answers: List[List[int]] = []  # finished prompts + outputs, for agent turns

    def count(self, key: str, message: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            if message and len(self.errors) < 20:
                self.errors.append(message)

    def worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        n = 0
        while time.time() < deadline:
            n += 1
            try:
                self.one(rng, f"soak-{index}-{n}")
            except Exception as exc:  # a request that failed for a reason the load did not ask for
                self.count("errors", f"{type(exc).__name__}: {exc}")

    def one(self, rng: random.Random, rid: str) -> None:
        exact = rng.random() < 0.1
        ids = self.prompt_for(rng, fresh=exact)
        # SGLang stops a request at its pool's size (max_req_len): stay within it.
        max_new = rng.randint(16, max(16, min(self.args.max_new_tokens, self.args.max_total_tokens - len(ids) - 16)))
        policy, budget = rng.choice(POLICY_MIX)
        custom = {"zoomr_policy": policy, "zoomr_budget": budget, "zoomr_vote": rng.choice(["mass", "count"])}
        params = {"max_new_tokens": max_new, "temperature": 0.0 if exact or rng.random() < 0.5 else 0.8,
                  "ignore_eos": True, "custom_params": custom}
        if exact:  # a budget covering the whole request: it attends everything, dense's answer
            custom.update(zoomr_policy="zoomr", zoomr_budget=len(ids) + max_new)
        bad = not exact and rng.random() < 0.05
        if bad:
            custom["zoomr_budget"] = -rng.randint(1, 9)
        action = "complete" if exact or bad else rng.choice(["complete"] * 6 + ["abort", "disconnect"])
        self.count("requests")
        body = {"input_ids": ids, "sampling_params": params, "rid": rid, "stream": action != "complete" or rng.random() < 0.5}
        drop_after = rng.randint(2, 40)  # streamed chunks a disconnecting client reads
        if action == "abort":
            threading.Timer(rng.uniform(0.05, 2.0), self.abort, args=(rid,)).start()
        with requests.post(f"{self.url}/generate", json=body, stream=body["stream"], timeout=600) as reply:
            if bad:  # HTTP 400, or for a stream SGLang's error event with code 400, naming the field
                refused = reply.status_code == 400 or '"code":400' in reply.text.replace(" ", "")
                if not refused or "zoomr_budget" not in reply.text:
                    self.count("errors", f"bad setting answered {reply.status_code}: {reply.text[:200]}")
                else:
                    self.count("rejected")
                return
            reply.raise_for_status()
            last = None
            for k, line in enumerate(reply.iter_lines() if body["stream"] else [b"data: " + reply.content]):
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    last = json.loads(line[6:])
                if action == "disconnect" and k >= drop_after:
                    self.count("disconnects")
                    return  # the client goes away; SGLang aborts the request
        finish = ((last or {}).get("meta_info") or {}).get("finish_reason") or {}
        if finish.get("type") == "abort":
            return  # counted when the abort was sent
        if last is None or len(last["output_ids"]) != max_new:
            self.count("errors", f"{rid}: {len((last or {}).get('output_ids', []))} of {max_new} tokens, {finish}")
            return
        self.count("completed")
        with self.lock:
            self.answers.append(ids + last["output_ids"])
            if exact:
                self.exact.append(dict(rid=rid, input_ids=ids, max_new_tokens=max_new, output_ids=last["output_ids"]))

    def prompt_for(self, rng: random.Random, fresh: bool) -> List[int]:
        """A new prompt, a shared system prompt and the request's text, or (unless ``fresh``) an
        earlier answer and a few tokens. A budget-covering request gets no earlier answer: the tree
        holds that text's KV as its writer computed it (sparsely, as ZoomR does), which a dense
        prefill of the same prompt would not reproduce."""
        kind = rng.random()
        with self.lock:
            earlier = rng.choice(self.answers) if self.answers else None
        if not fresh and kind < 0.3 and earlier is not None and len(earlier) < self.args.max_total_tokens // 2:
            return earlier + [rng.randint(3, 480) for _ in range(rng.randint(2, 12))]
        if kind < 0.5:  # a shared system prompt, then the request's own text
            return prompt(9000)[:12] + [rng.randint(3, 480) for _ in range(rng.randint(4, 60))]
        return [0] + [rng.randint(3, 480) for _ in range(rng.randint(4, 200))]

    def abort(self, rid: str) -> None:
        try:
            requests.post(f"{self.url}/abort_request", json={"rid": rid}, timeout=30).raise_for_status()
            self.count("aborts")
        except Exception as exc:
            self.count("errors", f"abort {rid}: {exc}")


def wait_idle(url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        state = zoomr_state(url)
        if not state["running"] or time.time() > deadline:
            return state
        time.sleep(0.5)


def dense_mismatches(url: str, exact: List[dict]) -> List[dict]:
    """Ask each budget-covering request again with ``zoomr_policy=full`` (dense attention, alone in
    its batch); for a different answer, where it first differs and the dense top-2 log-probability
    gap there (below ``NEAR_TIE``: a float-rounding tie between batch shapes, not an error)."""
    wrong = []
    for item in exact:
        reply = requests.post(f"{url}/generate", timeout=600, json={
            "input_ids": item["input_ids"], "return_logprob": True, "top_logprobs_num": 2, "sampling_params": {
                "max_new_tokens": item["max_new_tokens"], "temperature": 0.0, "ignore_eos": True,
                "custom_params": {"zoomr_policy": "full"}}})
        reply.raise_for_status()
        dense = reply.json()
        if dense["output_ids"] != item["output_ids"]:
            at = next(i for i, (a, b) in enumerate(zip(dense["output_ids"], item["output_ids"])) if a != b)
            top2 = dense["meta_info"]["output_top_logprobs"][at]
            wrong.append(dict(rid=item["rid"], first_difference=at, of=len(item["output_ids"]),
                              top2_gap=abs(top2[0][0] - top2[1][0])))
    return wrong


def idle_counts(state: dict, start: dict) -> Dict[str, bool]:
    """What must hold once nothing runs: only the radix tree holds KV (device and host)."""
    pools, start_pools, radix = state["pools"], start["pools"], state["radix"]
    return {
        "rows": pools["req_rows_available"] == start_pools["req_rows_available"],
        "pool": pools["kv_protected"] == 0 and pools["kv_available"] + pools["kv_evictable"] == pools["kv_capacity"],
        "tree_device": radix["device_tokens"] == pools["kv_evictable"],
        "host_tier": state["host_tier"]["used_tokens"] == radix["host_tokens"],
        "index": state["index_entries_live"] == 0,
    }


def without_finished(state: dict) -> dict:
    """``state`` for the results file: the finished requests' own counters (one entry per request,
    nearly all of a ten-minute soak's file) replaced by how many there were."""
    kept = {key: value for key, value in state.items() if key != "finished"}
    return {**kept, "finished_requests": len(state.get("finished", {}))}


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.time()
    os.environ.update(STRICT_CHECKS)
    if args.retract_every:
        os.environ.update(SGLANG_TEST_RETRACT="1", SGLANG_TEST_RETRACT_INTERVAL=str(args.retract_every))
    settings, model_path, model_name, today = start_run(args, "soak")
    extra = ("--radix-cache-backend", "zoomr")
    log(f"\n{args.workers} workers for {args.minutes} min, outputs up to {args.max_new_tokens} tokens, "
        f"--max-total-tokens {args.max_total_tokens}, strict leak checks on")
    with launch_server(model_path, "zoomr", max_total_tokens=args.max_total_tokens, tiny=args.model_path is None,
                       extra_args=extra, timeout=300) as server:
        url = server.url
        start = zoomr_state(url)
        load = Load(url, args)
        deadline = time.time() + args.minutes * 60
        threads = [threading.Thread(target=load.worker, args=(i, deadline), daemon=True) for i in range(args.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.minutes * 60 + 900)
        idle = wait_idle(url)
        metrics = read_metrics(url, ZOOMR_METRICS + RETRACTED)
        wrong = dense_mismatches(url, load.exact)
        checks = idle_counts(wait_idle(url), start)
        requests.post(f"{url}/flush_cache", timeout=60).raise_for_status()
        flushed = wait_idle(url)
        free = {k: v["pools"]["kv_available"] + v["pools"]["kv_evictable"] for k, v in (("start", start), ("end", flushed))}
        checks["flushed"] = (free["end"] == free["start"] == flushed["pools"]["kv_capacity"]
                             and flushed["pools"]["req_rows_available"] == start["pools"]["req_rows_available"]
                             and flushed["host_tier"]["used_tokens"] == 0 and flushed["radix"]["thought_records"] == 0)
        checks["metrics"] = all(name in metrics for name in ZOOMR_METRICS)
        healthy = requests.get(f"{url}/health", timeout=30).status_code == 200
    retractions = int(max((metrics.get(name, 0) for name in RETRACTED), default=0))
    counts_restored = all(checks.values())
    errors = load.counts["errors"] + sum(w["top2_gap"] >= NEAR_TIE for w in wrong) + (not healthy)
    log(f"    requests {load.counts['requests']} (completed {load.counts['completed']}, aborted "
        f"{load.counts['aborts']}, dropped by the client {load.counts['disconnects']}, refused as asked "
        f"{load.counts['rejected']}), errors {errors}, retractions {retractions}, kept whole by the tree "
        f"{idle['radix']['retracted_kept']}")
    log(f"    budget-covering greedy requests equal to dense: {len(load.exact) - len(wrong)} of {len(load.exact)}"
        + (f"; the others first differ at {wrong} (top-2 gap below {NEAR_TIE}: a rounding tie)" if wrong else ""))
    log(f"    idle and flushed counts: {checks}; host tier {idle['host_tier']}; tree {idle['radix']}")
    log(f"    zoomr metrics: {metrics}")
    for message in load.errors:
        log(f"    error: {message}")
    summary = {"requests": load.counts["requests"], "aborts": load.counts["aborts"] + load.counts["disconnects"],
               "errors": errors, "retractions": retractions, "counts_restored": counts_restored}
    details = dict(summary=summary, date=today, model=model_path, zoomr_settings=settings, args=vars(args),
                   counts=load.counts, error_messages=load.errors, dense_mismatches=wrong, near_tie=NEAR_TIE, exact=len(load.exact),
                   checks=checks, start=without_finished(start), idle=without_finished(idle),
                   flushed=without_finished(flushed), metrics=metrics, seconds=round(time.time() - began, 1))
    finish_run(Path(args.out), summary, details, began)


if __name__ == "__main__":
    main()
