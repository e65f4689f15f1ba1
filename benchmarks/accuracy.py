#!/usr/bin/env python
"""Greedy answer accuracy of every working-set policy at several resident budgets, through SGLang.

    python benchmarks/accuracy.py --seed 0 --n-problems 40 --budgets 0.2   # 14 minutes on 2 CPU cores

(The defaults, 20 problems at a 20% budget, run in under 10 minutes here.)

Problems come from the seeded program-trace generator (``testbed/program_trace.py``; ``--task
long``, the default: thoughts of about 200 tokens under 5-token summaries, outputs of 2-3.3K
tokens; ``--task short``: 65-token thoughts, 1K-token outputs; sizes from
``--min-steps/--max-steps/--p-detail``) and are solved by the task's committed tiny reasoner
(``testbed/reasoner_long/`` or ``testbed/reasoner/``, trained by ``testbed/train_reasoner.py``), served by one
``sglang.Engine(attention_backend="zoomr")``. Each request picks its policy and budget through
``custom_params`` (``zoomr_policy``, ``zoomr_budget``), so every policy runs through the same engine,
model and budget accounting:

1. ``full`` (dense) solves every problem; its average sequence length (prompt + output) sets the
   budgets: ``--budgets`` fractions of it, in tokens.
2. Every other policy at every budget, all requests at once: ``streaming``, ``h2o``, ``sumr``,
   ``quest``, ``zoomr``, ``zoomr_pages``, plus ``oracle`` (zooms into the thoughts the step really reads: the ceiling
   of any thought selection) and ``random`` (random thoughts: the floor).

``resident_fraction`` is measured from SGLang's per-request counters, not configured: the largest
working set any decode step of the request attended (the KV it needs resident) over the final
sequence length of ``full`` on the same problem (what dense attention keeps resident), summed over
problems. The table also shows
``per step``: KV read per step over sequence length, over every step (a compute proxy; early steps
of a request fit the budget whole, so it is higher than the peak ratio's budget share suggests). The host tier is off here (``ZOOMR_HOST_POOL_GB=0``): what a step attends, and so the
answer, does not depend on where the KV of unattended thoughts lives (token-identical on and off,
see tests/test_engine.py); the budget bounds what must be on the device.

Prints a table, writes a PNG (accuracy vs measured resident fraction, one line per policy) and a
JSON file with the per-problem outcomes; the last stdout line is one JSON object:
``{"n_problems": int, "avg_output_tokens": float, "results": [{"policy": str, "budget_fraction":
float, "resident_fraction": float, "accuracy": float}, ...]}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import REPO, add_policy_arguments, parse_policy_lists, plot_policies  # noqa: E402  (before sglang: CPU engine set-up)

from testbed import program_trace as pt  # noqa: E402
from testbed.policy_runs import (  # noqa: E402
    ProgressBar, RunSpec, attended_per_step, budget_specs, run_specs, start_engine, summarize,
)
from testbed.reasoner_model import load_tokenizer, reasoner_dir  # noqa: E402

POLICIES = ("streaming", "h2o", "sumr", "quest", "zoomr", "zoomr_pages", "oracle", "random")


def task_parser(description: str, *, n_problems: int, out: str, task: str, budgets: str) -> argparse.ArgumentParser:
    """The arguments this benchmark and ``fidelity.py`` share: problems, budgets, policies, model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-problems", type=int, default=n_problems)
    parser.add_argument("--task", choices=tuple(pt.TASKS), default=task,
                        help="the text's proportions (program_trace.TASKS); each has its own reasoner")
    parser.add_argument("--min-steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--p-detail", type=float, default=pt.DEFAULT_P_DETAIL)
    add_policy_arguments(parser, policies=POLICIES, budgets=budgets)
    parser.add_argument("--model", default=None, help="default: the task's committed reasoner")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / out),
                        help="writes <out>.png and <out>.json")
    return parser


def parse_task_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, split the lists into ``budget_fractions`` and ``policy_list``, refuse bad values."""
    args = parser.parse_args(argv)
    parse_policy_lists(parser, args, POLICIES)
    if args.n_problems < 1:
        parser.error(f"--n-problems={args.n_problems}: must be >= 1")
    shape = pt.TASKS[args.task]
    # Only an absent size takes the task's; a given one, even 0, goes to the generator's check.
    args.min_steps = shape.n_steps[0] if args.min_steps is None else args.min_steps
    args.max_steps = shape.n_steps[1] if args.max_steps is None else args.max_steps
    args.model = args.model or str(reasoner_dir(args.task))
    return args


def task_problems(args: argparse.Namespace):
    """The problems the task arguments describe."""
    return pt.generate_problems(args.seed, args.n_problems, n_steps=(args.min_steps, args.max_steps),
                                p_detail=args.p_detail, task=args.task)


def parse_args(argv=None):
    # Defaults within 10 minutes here: every policy decodes 2.6K tokens per long problem, about
    # 1,000 tokens/s on this 2-core CPU (40 problems at one budget: 825 s).
    parser = task_parser(__doc__.split("\n\n")[0], n_problems=20, out="accuracy", task="long", budgets="0.2")
    parser.add_argument("--concurrency", type=int, default=128,
                        help="requests in flight at once (default %(default)s; larger batches were slower per token on 2 CPU cores)")
    return parse_task_args(parser, argv)


def table(rows, per_step) -> str:
    lines = [f"{'policy':<11} {'budget':>7} {'resident':>9} {'per step':>9} {'accuracy':>9}"]
    for r, step in zip(rows, per_step):
        lines.append(f"{r['policy']:<11} {r['budget_fraction']:>7.2f} {r['resident_fraction']:>9.3f} {step:>9.3f}"
                     f" {r['accuracy']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    problems = task_problems(args)
    tokenizer = load_tokenizer(args.model)
    target_lens = [len(tokenizer.encode(p.target, add_special_tokens=False)) for p in problems]
    max_new = [n + 32 for n in target_lens]
    engine = start_engine(args.model)
    try:
        print(f"engine ready in {time.time() - started:.0f} s", file=sys.stderr)
        full = run_specs(engine, tokenizer, problems, [RunSpec("full", 1.0, 0)], max_new_tokens=max_new,
                         progress=ProgressBar(len(problems), "full"))
        prompt_lens = [len(tokenizer.encode(p.prompt)) for p in problems]
        avg_output = sum(len(r.output_ids) for r in full) / len(full)
        avg_seq = sum(pl + len(r.output_ids) for pl, r in zip(prompt_lens, full)) / len(full)
        specs = budget_specs(args.policy_list, args.budget_fractions, avg_seq)
        runs = run_specs(engine, tokenizer, problems, specs, max_new_tokens=max_new, concurrency=args.concurrency,
                         progress=ProgressBar(len(specs) * len(problems), "policies"))
    finally:
        engine.shutdown()
    dense_lengths = {r.problem_index: r.dense_last for r in full}
    rows = summarize(full) + summarize(runs, dense_lengths)
    per_step = [attended_per_step(full)] + [attended_per_step([r for r in runs if r.spec == spec]) for spec in specs]
    elapsed = time.time() - started
    print(table(rows, per_step))
    print(f"{len(problems)} problems, avg prompt {sum(prompt_lens) / len(problems):.0f} tokens, avg output "
          f"{avg_output:.0f} tokens (full), budgets in tokens: "
          f"{sorted({s.budget for s in specs})}, {elapsed:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"program trace ({args.task}), {len(problems)} problems, seed {args.seed}, avg output {avg_output:.0f} tokens")
    full_accuracy = next(r["accuracy"] for r in rows if r["policy"] == "full")
    plot_policies(rows, out.with_suffix(".png"), y=lambda r: r["accuracy"], reference=full_accuracy, title=title,
                  xlabel="measured resident fraction (peak KV attended / final sequence length)",
                  ylabel="answer accuracy (greedy)")
    details = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "seconds": round(elapsed, 1),
        "args": vars(args), "task_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOOMR_")},
        "avg_prompt_tokens": sum(prompt_lens) / len(problems), "avg_sequence_tokens": avg_seq,
        "budgets_tokens": {f"{s.policy}@{s.budget_fraction}": s.budget for s in specs},
        "rows": [{**row, "attended_per_step": step} for row, step in zip(rows, per_step)],
        "per_problem": [{"policy": r.spec.policy, "budget_fraction": r.spec.budget_fraction, "problem": r.problem_index,
                         "correct": r.correct, "output_tokens": len(r.output_ids)} for r in full + runs],
    }
    out.with_suffix(".json").write_text(json.dumps(details, indent=1) + "\n")
    result = {"n_problems": len(problems), "avg_output_tokens": avg_output, "results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
