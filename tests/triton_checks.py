"""Checks of the Triton kernels on a machine without a GPU: a script run in a subprocess with or
without Triton's interpreter (``TRITON_INTERPRET=1``: Triton reads it when a kernel is defined), and an
ahead-of-time compile for the H100/H200 (sm_90), which catches typing errors the interpreter lets
through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *, interpret: bool, timeout: float, args: Sequence[str] = ()):
    """Run ``script`` (Python source, the repo and ``tests/`` importable; ``args`` its ``sys.argv[1:]``)
    in a fresh process, under ``TRITON_INTERPRET=1`` or without it; returns its last stdout line,
    parsed as JSON."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_for_sm90(kernel, signature: Dict[str, str], constants: Dict[str, object]) -> bytes:
    """The cubin of ``kernel`` for ``signature`` (argument name -> Triton type, ``constexpr`` for the
    names in ``constants``); skips the test when Triton's internal compile API differs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    try:  # ASTSource is internal; its arguments changed across Triton releases (written for 3.8)
        source = ASTSource(kernel, signature, constexprs=constexprs)
    except TypeError as exc:
        pytest.skip(f"triton {triton.__version__}: ASTSource takes other arguments ({exc})")
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]


def assert_compiles_for_sm90(module, kernel: str, types: Dict[str, str], constants: Dict[str, object]) -> None:
    """Compile ``module``'s ``kernel`` for sm_90 with its arguments typed by ``types`` (others
    ``i32``; those of ``constants`` that it takes are constexprs). Skipped where the interpreter
    runs the kernels and where a GPU is present (the cuda tests compile for it)."""
    import torch

    if not module.triton_available() or module.triton_interpreted():
        pytest.skip("needs the compiled (not interpreted) Triton kernels")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda tests compile the kernels for it")
    fn = getattr(module, kernel)
    used = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature = {name: types.get(name, "constexpr" if name in used else "i32") for name in fn.arg_names}
    assert len(compile_for_sm90(fn, signature, used)) > 0
