"""The HTTP server path: ``python -m sglang.launch_server --attention-backend zoomr`` on loopback,
bad settings refused at start, and proof that the entry point is what registers ``zoomr``.

One server serves every test that sends requests. Each ``ZOOMR_*`` value's refusal and its whole
message are checked on the parser (``test_config.py``); here, in process, that a bad value or flag
stops an engine's start (SGLang's argument resolution, which ``launch_server`` runs too), and, with
a real ``launch_server``, that the entry point is what registers ``zoomr``."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import requests

from engine_utils import engine, server, server_command, zoomr_env
from testbed.local_server import free_port

pytestmark = pytest.mark.engine


def _run_until_exit(command, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("variables, engine_args, message", [
    ({"ZOOMR_WINDOW": "1"}, {}, r"ZOOMR_WINDOW='1' .*allowed: an integer >= 3"),
    ({}, {"enable_mixed_chunk": True}, "zoomr does not support --enable-mixed-chunk"),
], ids=["bad-setting", "unsupported-flag"])
def test_bad_setting_or_flag_stops_the_start(model_path, variables, engine_args, message):
    """In process: the engine resolves its arguments as ``launch_server`` does, and the plug-in's
    resolution hook refuses them before any model loads (no server process to start)."""
    with zoomr_env(variables), pytest.raises(ValueError, match=message):
        with engine(model_path, "zoomr", **engine_args):
            pass


def test_zoomr_is_refused_when_the_plugin_is_filtered_out(model_path):
    """With SGLANG_PLUGINS naming something else, our entry point is not loaded: no zoomr."""
    result = _run_until_exit(server_command(model_path, free_port()), {"SGLANG_PLUGINS": "some_other_plugin"}, timeout=120)
    assert result.returncode != 0
    assert "invalid choice: 'zoomr'" in result.stderr


# Below the refusals: a module's fixture lives until its last test, so the server starts after them.
@pytest.fixture(scope="module")
def url(model_path):
    small_window = {"ZOOMR_WINDOW": "16", "ZOOMR_SINK": "2", "ZOOMR_MAX_THOUGHT_TOKENS": "24"}
    with server(model_path, env=small_window) as base_url:
        yield base_url


def test_server_answers_generate_and_openai_completions(url):
    greedy = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    native = requests.post(f"{url}/generate", json={"input_ids": [0, 5, 6, 7], "sampling_params": greedy}, timeout=120)
    native.raise_for_status()
    body = native.json()
    assert len(body["output_ids"]) == 200 and isinstance(body["text"], str)

    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    completion = requests.post(f"{url}/v1/completions", json={
        "model": model, "prompt": "The sum of the first numbers is", "max_tokens": 64, "temperature": 0,
    }, timeout=120)
    completion.raise_for_status()
    choice = completion.json()["choices"][0]
    assert choice["text"] and completion.json()["usage"]["completion_tokens"] > 0

    with requests.post(f"{url}/v1/completions", stream=True, timeout=120, json={
        "model": model, "prompt": "Step one.", "max_tokens": 32, "temperature": 0, "stream": True,
    }) as stream:
        chunks = [line for line in stream.iter_lines() if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert len(chunks) > 1

    info = requests.get(f"{url}/server_info", timeout=30).json()
    zoomr = info["internal_states"][0]["zoomr"]
    stats = zoomr["finished"][body["meta_info"]["id"]]
    assert stats["steps"] == 199 and stats["over_bound_steps"] == 0
    assert stats["attended_last"] < stats["dense_last"]  # the small window really bit
    assert zoomr["config"]["window"] == 16


def test_abort_mid_thought_returns_every_pool_count(url):
    """Abort requests while their thoughts sit in the host tier: SGLang's pool, its request rows, the
    host tier and the index all come back (SGLang's strict idle leak check stays on)."""
    start = requests.get(f"{url}/server_info", timeout=30).json()["internal_states"][0]["zoomr"]["pools"]
    # Both fit SGLang's admission together (it charges max_new_tokens) and run for seconds.
    greedy = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    streams = []
    for n, prompt in enumerate(([0, 5, 6, 7], [0, 9, 8, 7, 6])):
        stream = requests.post(f"{url}/generate", stream=True, timeout=120, json={
            "input_ids": prompt, "sampling_params": greedy, "stream": True, "rid": f"abort-me-{n}",
        })
        streams.append(stream)
    # Poll instead of counting streamed chunks: SGLang merges chunks a slow client has not read, so
    # a chunk count says nothing about how far generation got. Eviction starts a few dozen tokens in.
    deadline = time.time() + 60
    while True:
        busy = requests.get(f"{url}/server_info", timeout=30).json()["internal_states"][0]["zoomr"]
        both_running = set(busy["running"]) == {"abort-me-0", "abort-me-1"}
        if (both_running and busy["host_tier"]["used_tokens"] > 0) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert busy["host_tier"]["used_tokens"] > 0, busy  # thoughts really were in the host tier
    assert both_running, busy  # and still running: the aborts below bite mid-generation
    for n in range(2):
        requests.post(f"{url}/abort_request", json={"rid": f"abort-me-{n}"}, timeout=30).raise_for_status()
    for stream in streams:
        stream.close()
    deadline = time.time() + 60
    while True:
        state = requests.get(f"{url}/server_info", timeout=30).json()["internal_states"][0]["zoomr"]
        if not state["running"] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert state["running"] == {} and state["index_entries_live"] == 0
    assert state["host_tier"]["used_tokens"] == 0
    end = state["pools"]
    assert end["req_rows_available"] == start["req_rows_available"] and end["kv_protected"] == 0
    assert end["kv_available"] + end["kv_evictable"] == start["kv_available"] + start["kv_evictable"]
    assert {"abort-me-0", "abort-me-1"} <= set(state["finished"])
    # The server is still healthy and serves a new request.
    again = requests.post(f"{url}/generate", json={"input_ids": [0, 5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": 50, "ignore_eos": True}}, timeout=120)
    assert len(again.json()["output_ids"]) == 50
