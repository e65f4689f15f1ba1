"""Compile a Triton kernel ahead of time for the H100/H200 (sm_90) on a machine without a GPU: it
catches typing errors the interpreter lets through."""

from __future__ import annotations

from typing import Dict

import pytest


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
