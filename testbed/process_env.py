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

:func:`zoomr_environment` writes ZoomR settings given by field name as the variables the plug-in
reads (zoomr_sglang/config.py), for the tests, benchmarks and testbed that start engines.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
# Core sets of CPU ranks 0 and 1, one entry per rank ("|"-separated, as SGLang reads it). SGLang
# reads the variable only with --tp > 1 on its CPU engine; more ranks need the user's own list.
CPU_TP_THREADS_BIND = "0|1"
# What every CPU engine and server started from this checkout adds to its arguments, as
# ``sglang.Engine`` keywords (:func:`cpu_server_flags`: as ``launch_server`` flags):
# - mem_fraction_static: with an explicit pool (--max-total-tokens) the fraction sizes nothing; it
#   only absorbs what other processes take while the model loads (SGLang refuses to start when more
#   than it goes): 0.05 failed in the suite when a neighbouring test's processes took 5% of the RAM.
# - sleep_on_idle: an idle scheduler otherwise polls on a whole core (measured: 15 s of CPU in 15
#   idle seconds), which the suite's other engines, or a benchmark's own client, need.
CPU_ENGINE_ARGS = {"mem_fraction_static": 0.2, "sleep_on_idle": True}


def cpu_server_flags() -> List[str]:
    """:data:`CPU_ENGINE_ARGS` as ``launch_server`` flags (a True switch as the bare flag)."""
    flags: List[str] = []
    for name, value in CPU_ENGINE_ARGS.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


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


def zoomr_environment(**fields: object) -> Dict[str, str]:
    """The variables that set ``fields`` (names of ``ZoomRConfig``'s fields): a user setting as its
    own variable, every other field in one ``ZOOMR_CONFIG`` JSON object (none when there is none).
    Only the fields given: nothing is merged in, so callers combine field dicts, then call this once.
    The values are checked where the plug-in reads them (``load_config``)."""
    import json

    from zoomr_sglang.config import CONFIG_KEYS, CONFIG_VARIABLE, USER_VARIABLES, variable_text  # loads torch

    unknown = sorted(set(fields) - set(USER_VARIABLES) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown ZoomR field {unknown[0]!r}; allowed: {', '.join((*USER_VARIABLES, *CONFIG_KEYS))}")
    variables = {USER_VARIABLES[f]: variable_text(v) for f, v in fields.items() if f in USER_VARIABLES}
    config = {f: v for f, v in fields.items() if f in CONFIG_KEYS}
    return {**variables, **({CONFIG_VARIABLE: json.dumps(config)} if config else {})}


def default_zoomr_environment(**fields: object) -> None:
    """Set ``fields`` (as :func:`zoomr_environment`) under this process's environment: a variable
    already set wins, and a ``ZOOMR_CONFIG`` already set keeps its keys and gains the others (an
    ablation names only what it changes)."""
    import json

    for key, value in zoomr_environment(**fields).items():
        if key == "ZOOMR_CONFIG" and key in os.environ:
            try:
                given = json.loads(os.environ[key])
            except ValueError:
                continue  # load_config reports the bad value where it reads it
            if isinstance(given, dict):
                os.environ[key] = json.dumps({**json.loads(value), **given})
        else:
            os.environ.setdefault(key, value)
