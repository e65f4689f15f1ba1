"""Environment every process started from this checkout needs, set before torch or SGLang load.

- The repo root on ``sys.path`` and ``PYTHONPATH``: SGLang's spawned scheduler processes unpickle
  objects of ``testbed`` (the teacher-forcing logit processor).
- Without an NVIDIA GPU: SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``), the pure-torch
  ``sgl_kernel`` stand-in ``cpu_shim/`` (it must never be on the path on a GPU machine) and one
  OpenMP thread per process (measured: spinning OpenMP threads made each decode step over ten
  times slower on a shared 2-core machine; torch reads the variable once, at import).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
    return has_gpu
