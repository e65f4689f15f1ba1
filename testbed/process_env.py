"""Environment every process started from this checkout needs, set before torch or SGLang load.

- The repo root on ``sys.path`` and ``PYTHONPATH``: SGLang's spawned scheduler processes unpickle
  objects of ``testbed`` (the teacher-forcing logit processor).
- Without an NVIDIA GPU: SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``), the pure-torch
  ``sgl_kernel`` stand-in ``cpu_shim/`` (it must never be on the path on a GPU machine) and one
  OpenMP thread per process (measured: spinning OpenMP threads made each decode step over ten
  times slower on a shared 2-core machine; torch reads the variable once, at import).
- Also without a GPU, what SGLang's CPU engine needs for ``--tp 2`` (two scheduler processes over
  gloo): one OpenMP core set per rank (``SGLANG_CPU_OMP_THREADS_BIND``; without it SGLang asserts
  that the ranks are no more than the NUMA nodes) and an NCCL library path that does not exist
  (``SGLANG_NCCL_SO_PATH``: the torch wheel ships NCCL, which PyNccl would load and then ask for a
  CUDA device; a failed load makes SGLang all-reduce over gloo instead).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Core sets of CPU ranks 0 and 1, one entry per rank ("|"-separated, as SGLang reads it). SGLang
# reads the variable only with --tp > 1 on its CPU engine; more ranks need the user's own list.
CPU_TP_THREADS_BIND = "0|1"


def _prepend(path: str) -> None:
    if path not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p)
    if path not in sys.path:
        sys.path.insert(0, path)


def prepare_process_env() -> bool:
    """Set the variables above for this process and its children; True when a GPU driver is present."""
    _prepend(str(REPO))
    has_gpu = shutil.which("nvidia-smi") is not None
    if not has_gpu:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _prepend(str(REPO / "cpu_shim"))
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", CPU_TP_THREADS_BIND)
        os.environ.setdefault("SGLANG_NCCL_SO_PATH", str(REPO / "cpu_shim" / "no-nccl.so"))
    return has_gpu
