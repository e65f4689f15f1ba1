"""Test setup: on a machine without a GPU, run SGLang's CPU engine with the sgl_kernel stand-in.

``./dev test`` sets the same variables; setting them here too keeps a bare ``pytest`` working.
They are set before torch is imported (it reads OMP_NUM_THREADS once); spawned SGLang processes
inherit both the environment and ``sys.path``.
"""

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # see ./dev: avoids oversubscribing a small CPU
    shim = str(REPO / "cpu_shim")
    if shim not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
    if shim not in sys.path:
        sys.path.insert(0, shim)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_harness and friends
