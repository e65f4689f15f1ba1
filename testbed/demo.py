"""``python -m testbed.demo`` (``./dev demo``): the committed tiny reasoner solves one program-trace
problem through SGLang with ``--attention-backend zoomr``, once with the full KV cache and once with
zoomr at about 20% of the sequence as its KV budget.

It prints the problem, both answers, zoomr's thoughts with their summaries and the thoughts it
zoomed into at which decode step, and the KV each run kept and read, from SGLang's per-request
counters. ``--seed``, ``--problem`` and ``--steps`` pick another problem, ``--budget`` another share.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import sys
import tempfile
import textwrap
import time
import warnings
from typing import List, Optional, Tuple

from testbed import program_trace as pt
from testbed.policy_runs import RunSpec, budget_specs, finished_counters, job_rid, run_specs, start_engine
from testbed.process_env import prepare_process_env
from testbed.reasoner_model import load_tokenizer, reasoner_dir

prepare_process_env()  # before anything loads torch or SGLang: SGLang's CPU engine when there is no GPU

# Problem 41 of seed 0: 10 steps, 5 of them detail reads; full and zoomr at 20% both answer it right.
DEFAULT_SEED, DEFAULT_PROBLEM = 0, 41
WIDTH = 96  # fits a 100-column terminal
MAX_ZOOMS_SHOWN = 6  # per thought row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="problem set seed (default %(default)s)")
    parser.add_argument("--problem", type=int, default=DEFAULT_PROBLEM, help="index in the set (default %(default)s)")
    parser.add_argument("--steps", type=int, help="program steps (default: the task's %d to %d)" % pt.DEFAULT_N_STEPS)
    parser.add_argument("--budget", type=float, default=0.2, help="zoomr's KV budget, share of the sequence")
    args = parser.parse_args(argv)
    if args.problem < 0 or not 0 < args.budget <= 1:
        parser.error("--problem must be >= 0 and --budget in (0, 1]")
    return args


@contextlib.contextmanager
def quiet_engine_processes(log_fd: int):
    """SGLang's processes are spawned while the engine starts and keep what they inherit then: here
    Python warnings off and their stderr in the file ``log_fd`` (a weight-loading progress bar,
    xgrammar's C++ tokenizer warning, the traceback if one dies) rather than on the screen."""
    saved_fd, saved_warnings = os.dup(2), os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore"
    sys.stderr.flush()
    os.dup2(log_fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if saved_warnings is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved_warnings


def start_quiet_engine():
    """The engine serving the committed reasoner (TASK_SETTINGS), and the file its processes log to."""
    log_fd, log_path = tempfile.mkstemp(prefix="zoomr-demo-sglang-", suffix=".log")
    try:
        with quiet_engine_processes(log_fd):
            return start_engine(str(reasoner_dir()), log_level="error"), log_path
    except Exception as error:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-30:])
        raise SystemExit(f"{tail}SGLang did not start ({error}); its log: {log_path}") from None
    finally:
        os.close(log_fd)


def solve(problem: pt.Problem, tokenizer, prompt_tokens: int, budget_fraction: float):
    """Full, then zoomr at ``budget_fraction`` of full's sequence (prompt + output), the way
    benchmarks/accuracy.py sets budgets. Returns both runs and their counters by policy."""
    max_new_tokens = [len(tokenizer.encode(problem.target, add_special_tokens=False)) + 32]  # as accuracy.py
    started = time.time()
    engine, log_path = start_quiet_engine()
    print(f"\nSGLang engine ready in {time.time() - started:.0f} s; solving with full, then zoomr ...\n", flush=True)
    try:
        full = run_specs(engine, tokenizer, [problem], [RunSpec("full", 1.0, 0)], max_new_tokens=max_new_tokens)[0]
        zoomr_spec = budget_specs(["zoomr"], [budget_fraction], prompt_tokens + len(full.output_ids))[0]
        zoomr = run_specs(engine, tokenizer, [problem], [zoomr_spec], max_new_tokens=max_new_tokens)[0]
        finished = finished_counters(engine)
    except BaseException:
        print(f"SGLang's log: {log_path}", file=sys.stderr)
        raise
    finally:
        engine.shutdown()
    os.remove(log_path)
    return (full, zoomr), {run.spec.policy: finished[job_rid(run.spec, 0)] for run in (full, zoomr)}


def print_problem(problem: pt.Problem, title: str, prompt_tokens: int) -> None:
    facts, question = problem.prompt.split(pt.LINE)[:2]
    print(f"{title}: trace a {problem.n_steps}-step program; the prompt ({prompt_tokens} tokens):")
    # "; " rather than the prompt's " ; " so that a wrapped line never starts with a separator
    print(textwrap.fill(facts.replace(" ; ", "; "), WIDTH, initial_indent="    ", subsequent_indent="    "))
    print(f"    {question.strip()}")
    example = next((step for step in problem.steps if step.detail), problem.steps[-1])  # a detail read if any
    k, read = example.k, f"{pt.name(example.source_step)}'s {'intermediate' if example.detail else 'result'}"
    print(f"{pt.value_word(0, problem.start)}: v0 holds {problem.start}.  {pt.input_word(k, example.input)}: "
          f"step {k}'s input is {example.input}.  {pt.pointer_word(k, example.source_step, example.detail)}: "
          f"step {k} reads {read}.")
    print(f"A thought per step, then a summary keeping its result; step {k}'s (/: line break, //: blank line):")
    thought = problem.thoughts[k - 1].replace(f" {pt.LINE} ", " / ")
    print(textwrap.fill(f"{thought} // {problem.summaries[k - 1]}", WIDTH, max_lines=3,
                        initial_indent="    ", subsequent_indent="    "))
    print(f"Its intermediate ({pt.value_word(k, example.intermediate, True)}) is in the thought only: a step "
          f"that reads it needs that thought's KV.")


def percent_of(part: float, whole: float) -> str:
    return f"{part:.0f} of {whole:.0f} ({part / whole:.0%})"


def run_summary(run, counters: dict) -> dict:
    """What the demo shows of one run: its answer and the KV it kept (peak) and read (per step)."""
    return {"answer": pt.parse_answer(run.text), "correct": run.correct, "budget": counters["budget"],
            "output_tokens": len(run.output_ids), "attended_max": counters["attended_max"],
            "dense_last": counters["dense_last"], "attended_per_step": counters["attended_total"] / counters["steps"],
            "dense_per_step": counters["dense_total"] / counters["steps"]}


def verdict(correct: bool) -> str:
    return "right" if correct else "wrong"


def print_runs(problem: pt.Problem, full: dict, zoomr: dict) -> None:
    cells = {
        f"answer (expected {problem.answer})": lambda r: f"{r['answer'] or 'none'}  {verdict(r['correct'])}",
        "tokens generated": lambda r: str(r["output_tokens"]),
        "peak KV working set": lambda r: percent_of(r["attended_max"], r["dense_last"]),
        "KV read per decode step": lambda r: percent_of(r["attended_per_step"], r["dense_per_step"]),
    }
    print(f"  {'':<26}{'full KV cache':<26}zoomr, budget {zoomr['budget']} tokens")
    for label, cell in cells.items():
        print(f"  {label:<26}{cell(full):<26}{cell(zoomr)}")
    print("  (KV in tokens; each of zoomr's steps attends sinks + prompt + every summary + the thought it")
    print("   zoomed into + a recent window, within its budget; full attends the whole sequence)\n")


def closed_thoughts(tokens: List[str]) -> List[tuple]:
    """Per thought, in closing order: (output index of its summary's last token, the summary's text)."""
    closed, begin = [], None
    for i, token in enumerate(tokens):
        if token == pt.SUMMARY_BEGIN:
            begin = i
        elif token == pt.SUMMARY_END and begin is not None:
            closed.append((i, " ".join(tokens[begin + 1:i])))
            begin = None
    return closed


def zooms_by_thought(counters: dict, ends: List[int]) -> List[list]:
    """Per thought (the answer line last), each selection zoomr made while writing it: (thoughts, step)."""
    rows = [[] for _ in range(len(ends) + 1)]
    for selection, step in zip(counters["zoom_history"], counters["zoom_steps"]):
        # Decode step s reads output token s and writes token s + 1: that token belongs to the thought
        # after every one whose summary ended at or before s.
        rows[bisect.bisect_right(ends, step)].append((selection, step))
    return rows


def selection_at(counters: dict, step: int) -> List[int]:
    """The thoughts zoomed in at decode step ``step``."""
    changes = bisect.bisect_right(counters["zoom_steps"], step)
    return counters["zoom_history"][changes - 1] if changes else []


def thought_spans(ends: List[int], n_tokens: int) -> List[range]:
    """Output positions of each thought (the answer line last): after the previous summary to its own."""
    starts = [0] + [end + 1 for end in ends]
    return [range(start, end + 1) for start, end in zip(starts, ends + [n_tokens - 1])]


def detail_hit(problem: pt.Problem, thought: int, tokens: List[str], span: range,
               counters: dict) -> Optional[Tuple[int, bool]]:
    """For a thought whose step reads an intermediate: the thought whose body holds it, and whether
    zoomr had that thought zoomed in at the decode step that wrote the value here."""
    step = problem.steps[thought] if thought < problem.n_steps else None
    if step is None or not step.detail:
        return None
    needed = step.source_step - 1
    value = pt.name(step.source_step) + "'="  # v2'=3: v2's intermediate is 3
    written = next((i for i in span if tokens[i].startswith(value)), None)
    return needed, written is not None and needed in selection_at(counters, written - 1)  # step s writes s + 1


def zoom_cell(events: list) -> str:
    """``t@s`` per selection (thoughts t zoomed in from decode step s on), the first few."""
    shown = [f"{','.join(map(str, selection)) or '-'}@{step}" for selection, step in events]
    more = f" +{len(shown) - MAX_ZOOMS_SHOWN} more" if len(shown) > MAX_ZOOMS_SHOWN else ""
    return " ".join(shown[:MAX_ZOOMS_SHOWN]) + more


def print_thought_table(problem: pt.Problem, tokens: List[str], closed: List[tuple], counters: dict) -> dict:
    """One row per thought: its summary, what its step reads, for a detail read the thought that
    holds the value and whether zoomr had it zoomed in when writing it, and zoomr's selections."""
    ends = [end for end, _ in closed]
    print(f"  {'thought':>7}  {'summary':<8} {'reads':<8} {'needs body of':<14} zoomed in while writing it")
    zooms, hits = [], []
    rows = zip(zooms_by_thought(counters, ends), thought_spans(ends, len(tokens)))
    for thought, (events, span) in enumerate(rows):
        summary = closed[thought][1] if thought < len(closed) else pt.ANSWER_WORD
        step = problem.steps[thought] if thought < problem.n_steps else None
        reads = pt.pointer_word(step.k, step.source_step, step.detail) if step else ""
        zooms += [(selection, at, thought) for selection, at in events]
        detail, needs = detail_hit(problem, thought, tokens, span, counters), ""
        if detail is not None:
            needs = f"{detail[0]}: {'zoomed' if detail[1] else 'missed'}"
            hits.append(detail[1])
        print(f"  {thought:>7}  {summary:<8} {reads:<8} {needs:<14} {zoom_cell(events)}".rstrip())
    print(f"\nAt the step that wrote the value a detail read needs, zoomr had its thought zoomed in for "
          f"{sum(hits)} of {len(hits)}.")
    return {"zooms": zooms, "detail_reads": len(hits), "detail_hits": sum(hits)}


def print_thoughts(problem: pt.Problem, tokens: List[str], counters: dict) -> dict:
    closed = closed_thoughts(tokens)
    n_closed = counters["thoughts_closed"]
    print(f"zoomr's reasoning: {n_closed} thoughts closed, {counters['summaries']} summaries, then the answer line;")
    print(f"{counters['selection_changes']} changes of the zoomed-in thoughts. t@s: thought t zoomed in from "
          f"decode step s on.\n")
    shown = {"thoughts_closed": n_closed, "summaries": [text for _, text in closed]}
    if len(closed) == n_closed:
        return {**shown, **print_thought_table(problem, tokens, closed, counters)}
    # Some thoughts were cut without a summary (the model left the task's format): no row per thought.
    events = list(zip(counters["zoom_history"], counters["zoom_steps"]))
    print(textwrap.fill(f"zoom-ins: {zoom_cell(events)}", WIDTH))
    return {**shown, "zooms": [(selection, at, None) for selection, at in events]}


def main(argv=None) -> dict:
    """Run the demo; returns what it showed (answers, KV, thoughts, zoom-ins) for tests."""
    args = parse_args(argv)
    n_steps = pt.DEFAULT_N_STEPS if args.steps is None else args.steps
    problem = pt.generate_problems(args.seed, args.problem + 1, n_steps=n_steps)[args.problem]
    tokenizer = load_tokenizer()
    prompt_tokens = len(tokenizer.encode(problem.prompt))
    print_problem(problem, f"Problem {args.problem} of seed {args.seed}", prompt_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SGLang warns at import about features this demo does not use
        (full, zoomr), counters = solve(problem, tokenizer, prompt_tokens, args.budget)
    runs = {run.spec.policy: run_summary(run, counters[run.spec.policy]) for run in (full, zoomr)}
    print_runs(problem, runs["full"], runs["zoomr"])
    zoomr_tokens = tokenizer.convert_ids_to_tokens(zoomr.output_ids)
    return {"expected": problem.answer, "runs": runs, **print_thoughts(problem, zoomr_tokens, counters["zoomr"])}


if __name__ == "__main__":
    main()
