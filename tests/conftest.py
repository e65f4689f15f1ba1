"""Test setup: the checkout's process environment (``testbed/process_env.py``: SGLang's CPU engine
and the ``sgl_kernel`` stand-in on a machine without a GPU), set before torch is imported.

``./dev test`` sets the same variables; setting them here too keeps a bare ``pytest`` working, and
spawned SGLang processes inherit both the environment and ``sys.path``.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed.process_env import prepare_process_env  # noqa: E402

prepare_process_env()
sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_harness and friends


@pytest.fixture(scope="session")
def model_path() -> str:
    """The tiny local random-weight model (built once, cached) that the engine tests serve."""
    from testbed.tiny_model import tiny_model_dir

    return str(tiny_model_dir())


@pytest.fixture(scope="session")
def dense_outputs(model_path):
    """``torch_native``'s tokens that every zoomr identity check compares with: one dense engine
    for the whole session (``engine_utils.dense_reference``)."""
    from engine_utils import dense_reference

    return dense_reference(model_path)
