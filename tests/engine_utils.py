"""Start SGLang engines and servers on the tiny local model for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

from testbed.local_server import free_port, wait_healthy
from testbed.process_env import CPU_ENGINE_ARGS, cpu_server_flags, zoomr_environment

# The pool is sized by max_total_tokens; CPU_ENGINE_ARGS: see testbed/process_env.py.
ENGINE_ARGS = dict(device="cpu", dtype="float32", max_total_tokens=8192, skip_server_warmup=True, **CPU_ENGINE_ARGS)
GREEDY = {"temperature": 0, "ignore_eos": True}
IDENTITY_TOKENS = 300  # per prompt, in every check of zoomr against torch_native's tokens


def prompts() -> List[List[int]]:
    """Four prompts of odd lengths; the last two share a 40-token prefix (radix-cache hits)."""
    shared = [0] + [(7 * i) % 500 + 2 for i in range(39)]
    return [
        [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [0, 20, 21, 22, 23, 24],
        shared + [300, 301, 302],
        shared + [(11 * i) % 480 + 3 for i in range(57)],
    ]


@contextlib.contextmanager
def zoomr_env(other_variables: Optional[Mapping[str, object]] = None, **fields: object) -> Iterator[None]:
    """Set ZoomR settings by field name (``zoomr_environment``) and ``other_variables`` as given, for
    engines started inside the block (spawned processes inherit them)."""
    variables = {**(other_variables or {}), **zoomr_environment(**fields)}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update({k: str(v) for k, v in variables.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def engine(model_path: str, attention_backend: str, **kwargs) -> Iterator[object]:
    import sglang

    eng = sglang.Engine(model_path=model_path, attention_backend=attention_backend, **{**ENGINE_ARGS, **kwargs})
    try:
        yield eng
    finally:
        eng.shutdown()


def generate(eng, input_ids: List[List[int]], max_new_tokens: int, custom_params: Optional[dict] = None) -> List[dict]:
    params = {**GREEDY, "max_new_tokens": max_new_tokens}
    if custom_params:
        params["custom_params"] = custom_params
    return eng.generate(input_ids=input_ids, sampling_params=params)


def generate_whole_budget(eng, input_ids: List[List[int]], max_new_tokens: int) -> List[dict]:
    """Greedy, each request with a ``zoomr_budget`` covering its whole sequence: zoomr attends every
    position (and the host tier leaves it alone), whatever the engine's ZoomR settings."""
    params = [{**GREEDY, "max_new_tokens": max_new_tokens, "custom_params": {"zoomr_budget": len(ids) + max_new_tokens}}
              for ids in input_ids]
    return eng.generate(input_ids=input_ids, sampling_params=params)


def dense_reference(model_path: str) -> List[List[int]]:
    """``torch_native``'s greedy tokens for :func:`prompts`, ``IDENTITY_TOKENS`` each."""
    with engine(model_path, "torch_native") as eng:
        return [out["output_ids"] for out in generate(eng, prompts(), IDENTITY_TOKENS)]


def zoomr_state(eng) -> dict:
    """The backend's counters and SGLang's pool counts, read through SGLang's server info."""
    return eng.get_server_info()["internal_states"][0]["zoomr"]


def assert_idle_counts(eng, state=None, start=None) -> None:
    """Nothing running (zoomr radix cache): SGLang's pool holds only the tree, the host tier only the
    tree's pieces, request rows are as at ``start`` (a state read earlier, if given); after a flush
    everything is back."""
    state = state or zoomr_state(eng)
    pools, radix = state["pools"], state["radix"]
    assert state["running"] == {} and state["index_entries_live"] == 0
    assert pools["kv_protected"] == 0 and pools["kv_available"] + pools["kv_evictable"] == pools["kv_capacity"]
    assert start is None or pools["req_rows_available"] == start["pools"]["req_rows_available"]
    assert radix["device_tokens"] == pools["kv_evictable"]
    assert state["host_tier"]["used_tokens"] == radix["host_tokens"]
    eng.flush_cache()
    flushed = zoomr_state(eng)
    assert flushed["pools"]["kv_available"] == flushed["pools"]["kv_capacity"]
    assert flushed["host_tier"]["used_tokens"] == 0 and flushed["radix"]["thought_records"] == 0


def server_command(model_path: str, port: int, *extra: str) -> List[str]:
    return [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
        "--port", str(port), "--attention-backend", "zoomr", "--device", "cpu", "--dtype", "float32",
        "--max-total-tokens", "4096", "--skip-server-warmup", *cpu_server_flags(),
        *extra,
    ]


@contextlib.contextmanager
def server(model_path: str, env: Optional[Dict[str, str]] = None, timeout: float = 240, extra=()) -> Iterator[str]:
    """A launch_server process on a free loopback port; yields its base URL."""
    from sglang.srt.utils import kill_process_tree

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as log_dir:
        log_path = Path(log_dir) / "server.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(server_command(model_path, port, *extra), env={**os.environ, **(env or {})},
                                    stdout=subprocess.DEVNULL, stderr=log_file)
            try:
                wait_healthy(proc, url, log_path, "zoomr", timeout)
                yield url
            finally:
                kill_process_tree(proc.pid)
