"""Run program-trace problems through one SGLang engine under several working-set policies.

Every run is an ordinary greedy request to a ``--attention-backend zoomr`` engine whose
``custom_params`` pick the policy and its budget (``zoomr_policy``, ``zoomr_budget``; the oracle also
gets ``zoomr_oracle``, the task's dependencies). So every policy is served by the same model, the
same engine and the same budget accounting, and each request's counters (tokens attended vs
sequence length, summed over its decode steps) come back through SGLang's server info.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from testbed import program_trace as pt


@dataclass(frozen=True)
class RunSpec:
    """One policy at one budget; budget 0 is unbounded."""

    policy: str
    budget_fraction: float
    budget: int


@dataclass
class RunResult:
    spec: RunSpec
    problem_index: int
    output_ids: List[int]
    text: str
    correct: bool
    attended_total: int  # KV tokens attended, summed over decode steps
    dense_total: int  # sequence lengths, summed over decode steps
    attended_max: int  # largest working set of any step: the KV the request needs resident
    dense_last: int  # sequence length at the last step: what dense attention keeps resident
    fidelity: Optional[dict] = None  # teacher-forced runs: {"steps", "mass": [layer], "rel_error": [layer]}


def oracle_lists(problem: pt.Problem) -> List[List[int]]:
    """Per thought, the thoughts the oracle zooms into, most needed first: the one whose body holds
    a detail the step reads, then the rest of what it reads."""
    return [detail + [d for d in deps if d not in detail]
            for deps, detail in zip(problem.dependencies, problem.detail_dependencies)]


def custom_params(spec: RunSpec, problem: pt.Problem) -> Dict[str, object]:
    params: Dict[str, object] = {"zoomr_policy": spec.policy, "zoomr_budget": spec.budget}
    if spec.policy == "oracle":
        params["zoomr_oracle"] = oracle_lists(problem)
    return params


def job_rid(spec: RunSpec, problem_index: int) -> str:
    """The request id of one (spec, problem) job: a function of the job alone, so the random
    policy, which seeds from it, draws the same thoughts run after run."""
    return f"{spec.policy}@{spec.budget_fraction:g}:{spec.budget}#{problem_index}"


def finished_counters(engine) -> Dict[str, dict]:
    """The zoomr counters of the engine's finished requests, by request id (the last
    ``stats_history`` of them)."""
    return engine.get_server_info()["internal_states"][0]["zoomr"]["finished"]


class Generated(NamedTuple):
    """One request's output ids, its zoomr counters from the server info and, teacher-forced
    (``testbed.forcing``), the token the model chose itself at each position (else None)."""

    output_ids: List[int]
    counters: dict
    own_greedy: Optional[List[int]]


def generate_all(engine, requests: Sequence[Dict[str, object]], *, custom_logit_processor: Optional[str] = None,
                 concurrency: int = 128,
                 progress: Optional[Callable[[int], None]] = None) -> List[Generated]:
    """Every request (``engine.async_generate`` keyword arguments; ``sampling_params.custom_params``
    names its ``zoomr_policy`` and ``zoomr_budget``) concurrently, at most ``concurrency`` in flight;
    ``progress(1)`` per finished one. The counters are checked to be those of the policy and budget
    each request asked for."""
    from testbed.forcing import OWN_GREEDY  # imports SGLang: not before the caller has set it up

    async def one(request: Dict[str, object], gate: asyncio.Semaphore):
        async with gate:
            out = await engine.async_generate(custom_logit_processor=custom_logit_processor, **request)
        if progress is not None:
            progress(1)
        return out

    async def all_requests():
        gate = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(one(request, gate) for request in requests))

    outputs = asyncio.get_event_loop().run_until_complete(all_requests())
    finished = finished_counters(engine)
    results = []
    for request, out in zip(requests, outputs):
        counters = finished.get(out["meta_info"]["id"])
        if counters is None:
            raise RuntimeError("a request's counters are missing from the server info; raise stats_history in ZOOMR_CONFIG")
        asked = request["sampling_params"].get("custom_params") or {}
        ran = {"zoomr_policy": counters["policy"], "zoomr_budget": counters["budget"]}
        if any(asked.get(key, value) != value for key, value in ran.items()):  # a key not asked: the server's default
            raise RuntimeError(f"request ran {ran}, asked {asked}")
        results.append(Generated(list(out["output_ids"]), counters, out["meta_info"].get(OWN_GREEDY)))
    return results


def run_specs(engine, tokenizer, problems: Sequence[pt.Problem], specs: Sequence[RunSpec], *,
              max_new_tokens: Sequence[int], progress: Optional[Callable[[int], None]] = None,
              forced_ids: Optional[Sequence[Sequence[int]]] = None, concurrency: int = 128) -> List[RunResult]:
    """Every (spec, problem) pair as one greedy request, at most ``concurrency`` in flight (larger
    decode batches made each token slower on a 2-core CPU); ``progress(1)`` per finished one.

    ``forced_ids[i]``: teacher-force problem i's output to these ids (the engine needs
    ``enable_custom_logit_processor=True``) and measure attention fidelity at every step.
    """
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    jobs = [(spec, i) for spec in specs for i in range(len(problems))]
    processor = None
    if forced_ids is not None:
        from testbed.forcing import ForceTokens

        processor = ForceTokens.to_str()
    requests = []
    for spec, i in jobs:
        params = custom_params(spec, problems[i])
        if forced_ids is not None:
            params.update(force_ids=list(forced_ids[i]), zoomr_fidelity=True)
        requests.append({
            "input_ids": prompts[i],
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens[i], "custom_params": params},
            "rid": job_rid(spec, i),
        })
    outputs = generate_all(engine, requests, custom_logit_processor=processor, concurrency=concurrency,
                           progress=progress)
    results = []
    for (spec, i), (ids, counters, _) in zip(jobs, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        results.append(RunResult(spec, i, ids, text, pt.score(problems[i], text), counters["attended_total"],
                                 counters["dense_total"], counters["attended_max"], counters["dense_last"],
                                 counters.get("fidelity")))
    return results


# ZoomR settings for the program-trace tasks: thoughts are ~65 (short) or ~200 (long) tokens, under
# the forced boundary, and summaries 3 or 5; the base window holds the open thought's recent lines.
# Every policy gets the same sink and base window. The host tier is off: what a step attends, hence the answer, does not depend on where unattended KV lives.
# Refresh points are the task's pointer tokens (``v5<v2'``: "step 5 reads v2's intermediate"): the
# query right after one looks up what the step needs, while the query at a line break copies the
# previous line (measured: mass votes picked the needed thought at 35 of 35 detail reads with
# pointer refreshes, 9 of 35 with line-break refreshes).
# Only layer 0 votes: `python benchmarks/vote_probe.py --seed 1 --n-problems 20` (problems the
# benchmarks do not use) found the needed thought with layer 0's heads alone at 99 of 99 detail reads
# (long task; 120 of 124 short) and with every layer's at 76 (120): layers 1-3 spread their attention
# over all summaries and outweigh the one layer that looks the thought up.
TASK_SETTINGS = dict(sink=4, window=48, max_thought_tokens=256, topk=1, num_thoughts=1, sentence_ends=["<"],
                     refresh_interval=128, vote_layers=[0], host_pool_gb=0, stats_history=100_000)


def start_engine(model: str, **kwargs):
    """One zoomr engine for every policy, with TASK_SETTINGS under the environment's settings
    (``default_zoomr_environment``)."""
    import sglang
    import torch

    from testbed.process_env import CPU_ENGINE_ARGS, default_zoomr_environment

    default_zoomr_environment(**TASK_SETTINGS)
    on_cuda = torch.cuda.is_available()
    args = dict(device="cuda" if on_cuda else "cpu", dtype="float32", max_total_tokens=400_000,
                skip_server_warmup=True, max_running_requests=1024, disable_radix_cache=True,
                **(dict(mem_fraction_static=0.05) if on_cuda else CPU_ENGINE_ARGS))
    return sglang.Engine(model_path=model, attention_backend="zoomr", **{**args, **kwargs})


def budget_specs(policies: Sequence[str], fractions: Sequence[float], avg_sequence: float) -> List[RunSpec]:
    """Every policy at every fraction of the average sequence length, in tokens."""
    return [RunSpec(policy, f, max(int(round(f * avg_sequence)), 8)) for f in fractions for policy in policies]


def resident_fraction(runs: Sequence[RunResult], dense_lengths: Optional[Dict[int, int]] = None) -> float:
    """Peak KV a policy needs resident over what dense attention keeps: the sum over problems of
    each request's largest working set over the sum of the dense final sequence lengths
    (``dense_lengths[problem]``, from the ``full`` runs; default: the request's own, which a policy
    that stops early would flatter)."""
    dense = sum(r.dense_last if dense_lengths is None else dense_lengths[r.problem_index] for r in runs)
    return sum(r.attended_max for r in runs) / dense if dense else 1.0


def attended_per_step(runs: Sequence[RunResult]) -> float:
    """KV read per decode step over the sequence length, summed over every step of every problem."""
    dense = sum(r.dense_total for r in runs)
    return sum(r.attended_total for r in runs) / dense if dense else 1.0


def summarize(results: Sequence[RunResult], dense_lengths: Optional[Dict[int, int]] = None) -> List[dict]:
    """Per spec, in the order the specs first appear: accuracy and the measured
    :func:`resident_fraction`."""
    rows: Dict[RunSpec, List[RunResult]] = {}
    for r in results:
        rows.setdefault(r.spec, []).append(r)
    out = []
    for spec, runs in rows.items():
        out.append({
            "policy": spec.policy,
            "budget_fraction": spec.budget_fraction,
            "resident_fraction": resident_fraction(runs, dense_lengths),
            "accuracy": sum(r.correct for r in runs) / len(runs),
        })
    return out


class ProgressBar:
    """A one-line progress bar on stderr (no dependency; redraws at most every 1%)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self.shown = max(total, 1), label, 0, -1

    def __call__(self, n: int) -> None:
        self.done += n
        percent = 100 * self.done // self.total
        if percent != self.shown:
            self.shown = percent
            filled = percent // 4
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (25 - filled)}] {self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
