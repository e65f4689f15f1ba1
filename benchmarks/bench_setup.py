"""What every benchmark script does first: the checkout's process environment
(``testbed/process_env.py``: the repo on the path, and on a machine without a GPU SGLang's CPU
engine with the ``sgl_kernel`` stand-in and one OpenMP thread). Import it before anything imports
torch or sglang."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a bare checkout
from testbed.process_env import prepare_process_env  # noqa: E402

prepare_process_env()
import torch  # noqa: E402

ON_CUDA = torch.cuda.is_available()


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
