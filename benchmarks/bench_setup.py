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
