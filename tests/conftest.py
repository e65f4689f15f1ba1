"""Test setup: the checkout's process environment (``testbed/process_env.py``: SGLang's CPU engine
and the ``sgl_kernel`` stand-in on a machine without a GPU), set before torch is imported.

``./dev test`` sets the same variables; setting them here too keeps a bare ``pytest`` working, and
spawned SGLang processes inherit both the environment and ``sys.path``.
"""

import fcntl
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed.process_env import prepare_process_env  # noqa: E402

prepare_process_env()
sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_harness and friends


# The longest files (junit times, 2026-12-07), handed out first:
# ``--dist loadfile`` gives a file to one worker, and a long file handed out last runs alone at the end
# (``./dev test`` passes ``--no-loadscope-reorder``, else xdist orders files by their number of tests).
LONGEST_FIRST = ("test_gpu_check.py", "test_soak.py", "test_tp.py", "test_engine.py", "test_memory_bench_smoke.py",
                 "test_radix_ext.py", "test_accuracy_engine.py", "test_retraction.py", "test_one_phase.py",
                 "test_host_tier.py", "test_forcing.py", "test_server.py", "test_adversarial.py", "test_selection.py",
                 "test_page_bounds.py", "test_plugin.py", "test_unknown_token_ids.py", "test_program_trace.py",
                 "test_kernels.py", "test_demo.py", "test_policies.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


@pytest.fixture(scope="session")
def model_path() -> str:
    """The tiny local random-weight model (built once, cached) that the engine tests serve."""
    from testbed.tiny_model import tiny_model_dir

    return str(tiny_model_dir())


@pytest.fixture(scope="session")
def dense_outputs(model_path, tmp_path_factory, worker_id):
    """``torch_native``'s tokens that every zoomr identity check compares with
    (``engine_utils.dense_reference``): one dense engine for the whole run. Under xdist the first
    worker to ask computes them into the run's shared temporary folder; the other waits on the lock
    and reads them."""
    from engine_utils import dense_reference

    if worker_id == "master":  # no xdist: the folder above this run's is shared by every run
        return dense_reference(model_path)
    shared = tmp_path_factory.getbasetemp().parent / "dense_outputs.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shared.exists():
            shared.write_text(json.dumps(dense_reference(model_path)))
    return json.loads(shared.read_text())
