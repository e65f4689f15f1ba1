"""What ``serving.py`` runs, per preset: the cells, the workload and every server argument.

``gpu``: a Llama-3.1-8B-shaped model with random weights (``--load-format dummy``) on one H100 or
H200; prefill on SGLang's ``triton`` backend for both servers (FlashInfer's prefill modules would
compile for minutes at start), decode on ``flashinfer`` (dense) or ``zoomr``; CUDA graphs for
decode, none for prefill; the same ``--mem-fraction-static`` and KV pool (``--max-total-tokens``)
for both. ``rehearsal``: the same command lines at CPU sizes (a 2-layer shaped model, SGLang's CPU
engine, ``torch_native`` for dense and prefill, a fixed pool), so CI runs the code path the GPU
call runs. Nothing here imports torch or SGLang: ``tests/test_server_args.py`` parses every
command line these functions build with SGLang's own parser.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

BACKENDS = ("dense", "zoomr")
PARTS = ("probe", "timing")


@dataclass(frozen=True)
class Preset:
    name: str
    device: str  # "cuda" or "cpu"
    dense_backend: str  # SGLang's decode backend that zoomr is compared with
    prefill_backend: str  # both servers' prefill backend
    model_shape: Tuple[int, int, int]  # (layers, hidden size, vocab size) when --model-path is absent
    cells: Tuple[Tuple[int, int], ...]  # timing (context tokens, requests at once), in the order they run
    output_len: int  # output tokens per timing request
    warmup_context: int  # one untimed request per server first (Triton's JIT, the host tier's buffers)
    probe_context: int
    probe_requests: int
    probe_full_tokens: int  # greedy tokens per request, dense vs zoomr's full policy
    probe_sparse_tokens: int  # zoomr's own policy afterwards, while the self-checks sample steps
    max_running: Dict[str, int]  # --max-running-requests per part
    startup_timeout: float  # seconds a server may take to answer /health
    pool_tokens: int  # --max-total-tokens of both servers: the same KV pool, whatever the GPU
    zoomr_settings: Dict[str, object] = field(default_factory=dict)  # ZoomRConfig fields by name


# Reasoning held in each prompt (see serving_load.reasoning_prompt): a question, then thoughts of a
# body, a blank line, a summary between the markers and a blank line; the output continues it.
QUESTION_TOKENS, BODY_TOKENS, SUMMARY_TOKENS = 64, 200, 10
# ZoomR for both presets: a thought closes by the 256-token cap in the output (a random model writes
# no blank line), and a refresh (a vote) every 30 tokens (it writes no sentence end either).
ZOOMR_WORKLOAD = dict(max_thought_tokens=256, refresh_interval=30)
# The probe's zoomr server: self-checks every 97 decode steps (more than the full-policy run takes,
# so none of the steps compared with dense ran eagerly), and a host tier just large enough for it.
ZOOMR_PROBE = dict(self_check_interval=97, host_pool_gb=1)

PRESETS = {
    "gpu": Preset(
        name="gpu", device="cuda", dense_backend="flashinfer", prefill_backend="triton",
        model_shape=(32, 4096, 128256),
        cells=((16384, 1), (16384, 16), (16384, 32), (32768, 1), (32768, 16), (16384, 64)),
        output_len=256, warmup_context=1024,
        probe_context=2048, probe_requests=4, probe_full_tokens=64, probe_sparse_tokens=256,
        max_running={"timing": 128, "probe": 8}, startup_timeout=300,
        # 36.6 GiB of Llama-3.1-8B KV (128 KiB a token), within an H100's 0.80 share: eighteen
        # 16,640-token dense requests, so the 32-request cell is beyond dense's capacity.
        pool_tokens=300_000,
        # The host tier, pinned: 16 GiB holds 131,072 tokens (8 GiB each for K and V, quick to pin).
        zoomr_settings={**ZOOMR_WORKLOAD, "host_pool_gb": 16},
    ),
    "rehearsal": Preset(
        name="rehearsal", device="cpu", dense_backend="torch_native", prefill_backend="torch_native",
        model_shape=(2, 256, 4096),
        cells=((1024, 1), (2048, 8)),  # CI runs it: one cell per question (speed; capacity)
        output_len=64, warmup_context=256,
        probe_context=1024, probe_requests=4, probe_full_tokens=64, probe_sparse_tokens=256,
        max_running={"timing": 16, "probe": 8}, startup_timeout=300,
        pool_tokens=9000,  # four 2,112-token dense requests: the 8-request cell is beyond dense's capacity
        zoomr_settings={**ZOOMR_WORKLOAD, "host_pool_gb": 1},
    ),
}


def context_length(preset: Preset) -> int:
    """``--context-length``: the longest request of either part, rounded up to 1,024."""
    longest = max(max(c for c, _ in preset.cells) + preset.output_len,
                  preset.probe_context + preset.probe_full_tokens + preset.probe_sparse_tokens)
    return -(-(longest + 64) // 1024) * 1024


def cuda_graph_max_bs(preset: Preset, part: str) -> int:
    """Largest decode batch captured: the most requests a part sends at once."""
    return max(b for _, b in preset.cells) if part == "timing" else preset.probe_requests


def server_args(preset: Preset, part: str, backend: str, model_path: str, port: int) -> List[str]:
    """``launch_server``'s arguments for ``backend`` ("dense" or "zoomr") in ``part``; the two
    backends' lists differ only in the decode backend."""
    if part not in PARTS or backend not in BACKENDS:
        raise ValueError(f"part {part!r} / backend {backend!r}: allowed {PARTS} / {BACKENDS}")
    decode = preset.dense_backend if backend == "dense" else "zoomr"
    args = ["--model-path", model_path, "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
            "--prefill-attention-backend", preset.prefill_backend, "--decode-attention-backend", decode,
            "--context-length", str(context_length(preset)), "--max-running-requests", str(preset.max_running[part]),
            "--max-total-tokens", str(preset.pool_tokens), "--enable-metrics", "--decode-log-interval", "10",
            "--skip-server-warmup"]
    if preset.device == "cuda":
        return args + ["--device", "cuda", "--dtype", "bfloat16", "--mem-fraction-static", "0.80",
                       "--disable-prefill-cuda-graph", "--cuda-graph-max-bs-decode", str(cuda_graph_max_bs(preset, part))]
    from testbed.process_env import cpu_server_flags  # standard library only

    return args + ["--device", "cpu", "--dtype", "float32", *cpu_server_flags()]


def server_command(preset: Preset, part: str, backend: str, model_path: str, port: int) -> List[str]:
    return [sys.executable, "-m", "sglang.launch_server", *server_args(preset, part, backend, model_path, port)]


def server_command_lines(preset: Preset, model_path: str, port: int = 30000) -> Dict[Tuple[str, str], List[str]]:
    """Every server command line ``serving.py`` can start for ``preset``, by (part, backend)."""
    return {(part, backend): server_command(preset, part, backend, model_path, port)
            for part in PARTS for backend in BACKENDS}


def zoomr_env(preset: Preset, part: str, overrides: Dict[str, str]) -> Dict[str, str]:
    """The zoomr server's ZoomR variables: the preset's settings, the probe's (self-checks: never in
    timing, which must not run eager float64 reference steps), then ``overrides`` (variables; the
    keys of a ZOOMR_CONFIG among them join the preset's keys)."""
    from testbed.process_env import zoomr_environment  # loads torch

    extra = json.loads(overrides.get("ZOOMR_CONFIG", "{}"))
    if not isinstance(extra, dict):
        raise ValueError(f"ZOOMR_CONFIG={overrides['ZOOMR_CONFIG']!r}: allowed: a JSON object of settings by name")
    if part == "timing" and "self_check_interval" in extra:
        raise ValueError("ZOOMR_CONFIG key 'self_check_interval' runs eager float64 steps: the probe sets it,"
                         " timing never")
    settings = {**preset.zoomr_settings, **(ZOOMR_PROBE if part == "probe" else {}), **extra}
    return {**zoomr_environment(**settings), **{k: v for k, v in overrides.items() if k != "ZOOMR_CONFIG"}}
