#!/usr/bin/env python
"""Attention fidelity of every working-set policy on the tiny reasoner's traces, teacher-forced.

    python benchmarks/fidelity.py --seed 0 --n-problems 8

Same model, problems, engine and budgets as ``benchmarks/accuracy.py``, but every request is
teacher-forced to the problem's reference reasoning (a custom logit processor,
``testbed/forcing.py``), so every policy decodes the same trace step for step. At
every decode step and layer the backend compares the policy's attention with dense attention over
the whole sequence (``zoomr_fidelity``): the share of the dense attention probability mass that the
working set covers (mean over query heads), and ``||out - dense|| / ||dense||`` of the attention
output. Reported per layer, averaged over steps and problems.

Prints a table; writes ``<out>.json`` and ``<out>.png`` (mass coverage vs measured resident
fraction, one line per policy); the last stdout line is one JSON object: ``{"n_problems": int,
"avg_output_tokens": float, "results": [{"policy", "budget_fraction", "resident_fraction",
"mass_coverage": [per layer], "rel_error": [per layer], "mass_coverage_detail_reads",
"min_head_coverage_detail_reads", "needed_thought_zoomed_detail_reads"}, ...]}``: at the decode
steps that write a detail read (a value only an earlier thought's body holds), where the selection
decides the answer, the coverage averaged over layers and heads, the least coverage of any (layer,
query head), and the share of them at which the thought holding the value was zoomed in (None for a
policy that does not zoom).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import plot_policies  # noqa: E402  (before sglang: CPU engine set-up)
import accuracy  # noqa: E402
from testbed.policy_runs import (  # noqa: E402
    ProgressBar, RunSpec, budget_specs, finished_counters, job_rid, resident_fraction, run_specs, start_engine,
)
from testbed.reasoner_model import load_tokenizer  # noqa: E402


DETAIL_WORD = re.compile(r"^v(\d+)'=")  # testbed.program_trace.value_word(k, value, detail=True)


def parse_args(argv=None):
    parser = accuracy.task_parser(__doc__.split("\n\n")[0], n_problems=8, out="fidelity", task="short",
                                  budgets="0.1,0.2,0.4")
    return accuracy.parse_task_args(parser, argv)


def detail_reads(token_texts: List[str]) -> List[Tuple[int, int]]:
    """(decode step, thought) of each detail read: the token ``v<j>'=<value>`` (step j's
    intermediate) after its first occurrence, which ends thought j - 1 itself; only that thought's
    body holds it. Output token m is written at decode step m - 1 (the first comes from the prefill)."""
    seen, reads = set(), []
    for m, text in enumerate(token_texts):
        match = DETAIL_WORD.match(text)
        if match:
            if text in seen and m > 0:
                reads.append((m - 1, int(match.group(1)) - 1))
            seen.add(text)
    return reads


def detail_read_coverage(runs, reads: List[List[Tuple[int, int]]], key: str = "step_mass") -> Optional[float]:
    """Mean over the detail-read steps of every run of a per-step coverage (``step_mass``: mean
    over layers and heads; ``step_min_head_mass``: the least any (layer, head) kept); None without any."""
    masses = [r.fidelity[key][step] for r in runs for step, _ in reads[r.problem_index]]
    return sum(masses) / len(masses) if masses else None


def needed_thought_zoomed(runs, reads: List[List[Tuple[int, int]]], finished: Dict[str, dict]) -> Optional[float]:
    """Share of the detail reads at which the thought holding the value was zoomed in (the
    request's selection history, ``zoom_history`` from the step in ``zoom_steps``); None for a
    policy that never zoomed."""
    hits, zoomed = [], False
    for r in runs:
        stats = finished[job_rid(r.spec, r.problem_index)]
        zoomed = zoomed or bool(stats["zoom_history"])
        for step, thought in reads[r.problem_index]:
            held = [selection for selection, since in zip(stats["zoom_history"], stats["zoom_steps"]) if since <= step]
            hits.append(bool(held) and thought in held[-1])
    return sum(hits) / len(hits) if hits and zoomed else None


def aggregate(results, reads: List[List[Tuple[int, int]]], finished: Dict[str, dict]):
    """Per spec: measured resident fraction, per-layer coverage / error (step-weighted), and the
    coverage at the steps that read an earlier thought's body."""
    by_spec = {}
    for r in results:
        by_spec.setdefault(r.spec, []).append(r)
    rows = []
    for spec, runs in by_spec.items():
        steps = sum(r.fidelity["steps"] for r in runs)
        layers = len(runs[0].fidelity["mass"])
        mass = [sum(r.fidelity["mass"][l] * r.fidelity["steps"] for r in runs) / steps for l in range(layers)]
        error = [sum(r.fidelity["rel_error"][l] * r.fidelity["steps"] for r in runs) / steps for l in range(layers)]
        rows.append({"policy": spec.policy, "budget_fraction": spec.budget_fraction,
                     "resident_fraction": resident_fraction(runs),
                     "mass_coverage": mass, "rel_error": error,
                     "mass_coverage_detail_reads": detail_read_coverage(runs, reads),
                     "min_head_coverage_detail_reads": detail_read_coverage(runs, reads, "step_min_head_mass"),
                     "needed_thought_zoomed_detail_reads": needed_thought_zoomed(runs, reads, finished)})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    problems = accuracy.task_problems(args)
    tokenizer = load_tokenizer(args.model)
    forced = [tokenizer.encode(p.target, add_special_tokens=False) + [tokenizer.eos_token_id] for p in problems]
    prompt_lens = [len(tokenizer.encode(p.prompt)) for p in problems]
    avg_seq = sum(pl + len(f) for pl, f in zip(prompt_lens, forced)) / len(problems)
    specs = [RunSpec("full", 1.0, 0)] + budget_specs(args.policy_list, args.budget_fractions, avg_seq)
    engine = start_engine(args.model, enable_custom_logit_processor=True)
    try:
        runs = run_specs(engine, tokenizer, problems, specs, max_new_tokens=[len(f) for f in forced],
                         forced_ids=forced, progress=ProgressBar(len(specs) * len(problems), "forced"))
        finished = finished_counters(engine)
    finally:
        engine.shutdown()
    for r in runs:
        if r.output_ids != forced[r.problem_index]:
            raise RuntimeError(f"{r.spec} problem {r.problem_index}: the forced trace was not followed")
    reads = [detail_reads(tokenizer.convert_ids_to_tokens(f)) for f in forced]
    rows = aggregate(runs, reads, finished)
    print(f"{'policy':<11} {'budget':>6} {'resident':>8} {'detail reads: mean':>18} {'least head':>10} "
          f"{'zoomed':>6}  mass covered per layer / rel. error per layer")
    for r in rows:
        detail = [r["mass_coverage_detail_reads"], r["min_head_coverage_detail_reads"], r["needed_thought_zoomed_detail_reads"]]
        detail = ["-" if d is None else f"{d:.3f}" for d in detail]
        print(f"{r['policy']:<11} {r['budget_fraction']:>6.2f} {r['resident_fraction']:>8.3f} "
              f"{detail[0]:>18} {detail[1]:>10} {detail[2]:>6}  "
              + " ".join(f"{m:.3f}" for m in r["mass_coverage"]) + "  /  "
              + " ".join(f"{e:.3f}" for e in r["rel_error"]))
    avg_output = sum(len(f) for f in forced) / len(forced)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_policies(rows, out.with_suffix(".png"), y=lambda r: sum(r["mass_coverage"]) / len(r["mass_coverage"]),
                  xlabel="measured resident fraction", ylabel="dense attention mass covered (mean over layers)",
                  title=f"teacher-forced program traces, {len(problems)} problems, avg output {avg_output:.0f} tokens")
    out.with_suffix(".json").write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "args": vars(args), "rows": rows}, indent=1) + "\n")
    result = {"n_problems": len(problems), "avg_output_tokens": avg_output, "results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
