"""What every benchmark script does first: find the repo, and on a machine without a GPU set up
SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, ``cpu_shim/`` on ``PYTHONPATH`` for the spawned
processes too, one OpenMP thread: spinning threads made each decode step over ten times slower on
a small shared machine). Import it before anything imports sglang."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a bare checkout

import torch  # noqa: E402

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _shim = str(REPO / "cpu_shim")
    if _shim not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_shim, os.environ.get("PYTHONPATH")) if p)
    if _shim not in sys.path:
        sys.path.insert(0, _shim)


def add_policy_arguments(parser, *, policies, budgets: str) -> None:
    """``--budgets`` (fractions of the average sequence length) and ``--policies`` (comma-separated)."""
    parser.add_argument("--budgets", default=budgets,
                        help="comma-separated fractions of the average sequence length (default %(default)s)")
    parser.add_argument("--policies", default=",".join(policies), help="default: %(default)s")


def parse_policy_lists(parser, args, allowed) -> None:
    """Set ``args.budget_fractions`` and ``args.policy_list``; a policy outside ``allowed`` or a
    fraction outside (0, 1] (or none) stops with an error naming it."""
    args.budget_fractions = [float(x) for x in args.budgets.split(",") if x]
    args.policy_list = [p for p in args.policies.split(",") if p]
    for name in args.policy_list:
        if name not in allowed:
            parser.error(f"--policies: {name!r} is not allowed; allowed: {', '.join(allowed)}")
    if not args.budget_fractions or not all(0 < f <= 1 for f in args.budget_fractions):
        parser.error(f"--budgets={args.budgets!r}: each fraction must be in (0, 1]")


def plot_policies(rows, path: Path, *, y, xlabel: str, ylabel: str, title: str, reference=None) -> None:
    """One line per policy (``full`` excluded) of ``y(row)`` against the measured resident fraction,
    and ``reference`` (full's value) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", label="full (dense)")
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
        points = sorted((r["resident_fraction"], y(r)) for r in rows if r["policy"] == policy)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
