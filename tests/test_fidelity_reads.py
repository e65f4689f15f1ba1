"""``benchmarks/fidelity.py``'s reading of a trace: where the detail reads are, and whether the
thought holding each one was zoomed in at that step."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fidelity import detail_reads, needed_thought_zoomed  # noqa: E402
from testbed import program_trace as pt  # noqa: E402
from testbed.policy_runs import RunSpec, job_rid  # noqa: E402


def test_detail_reads_are_the_second_occurrence_of_an_intermediate_and_name_its_thought():
    problem = pt.generate_problems(2, 1, n_steps=4, task="long")[0]  # step 2 reads v1' (hand-checked task)
    words = problem.target.split(" ")
    reads = detail_reads(words)
    first = words.index("v1'=8")
    second = words.index("v1'=8", first + 1)
    assert reads == [(second - 1, 0)]  # written at decode step m - 1, from thought 0's body


def test_needed_thought_zoomed_follows_the_selection_history():
    spec = RunSpec("zoomr", 0.2, 100)
    runs = [SimpleNamespace(spec=spec, problem_index=0), SimpleNamespace(spec=spec, problem_index=1)]
    finished = {job_rid(spec, 0): {"zoom_history": [[3], [0]], "zoom_steps": [10, 50]},
                job_rid(spec, 1): {"zoom_history": [[2]], "zoom_steps": [5]}}
    # Problem 0 reads thought 0 at step 49 (still [3]: a miss) and at 60 ([0]: a hit); problem 1
    # reads thought 2 at step 4, before any selection (a miss), and at 5 (a hit).
    reads = [[(49, 0), (60, 0)], [(4, 2), (5, 2)]]
    assert needed_thought_zoomed(runs, reads, finished) == 0.5
    never = {key: {"zoom_history": [], "zoom_steps": []} for key in finished}
    assert needed_thought_zoomed(runs, reads, never) is None  # a policy that never zooms
