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


# The longest files (``--durations``, 2026-12-06), handed out first:
# ``--dist loadfile`` gives a file to one worker, and a long file handed out last runs alone at the end.
LONGEST_FIRST = ("test_gpu_check.py", "test_engine.py", "test_tp.py", "test_memory_bench_smoke.py", "test_soak.py",
                 "test_accuracy_engine.py", "test_radix_ext.py", "test_retraction.py", "test_forcing.py",
                 "test_page_bounds.py", "test_adversarial.py", "test_server.py", "test_selection.py",
                 "test_program_trace.py", "test_policies.py", "test_demo.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


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
