"""Local SGLang HTTP servers for the benchmarks, and the set-up they share.

``serve`` starts a server command on a free loopback port, waits for ``/health`` and kills the
whole process tree afterwards (a plain SIGTERM leaves SGLang's scheduler running);
``launch_server`` is ``serve`` of a plain ``python -m sglang.launch_server`` for one backend.
``read_metrics`` parses SGLang's Prometheus ``/metrics``; ``zoomr_state`` reads the backend's
counters from ``/server_info`` (``internal_states[0]["zoomr"]``). The model and ZoomR settings
arguments (``--model-path``, ``--zoomr-env``) and the request prompts are shared too, so every
script reads and sends them the same way. Importing this module imports ``bench_setup`` first
(the CPU engine's environment must be set before torch or sglang load).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import ON_CUDA  # noqa: E402  (before sglang: CPU engine set-up)

import requests  # noqa: E402
import torch  # noqa: E402

from testbed.local_server import free_port, wait_healthy  # noqa: E402
from testbed.process_env import cpu_server_flags  # noqa: E402

# The tiny random-weight model writes "\n\n" often; these settings make its thoughts close.
TINY_MODEL_SETTINGS = {"ZOOMR_SINK": "4", "ZOOMR_WINDOW": "64", "ZOOMR_MAX_THOUGHT_TOKENS": "48"}
GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT_LEN = 16


def log(message: str = "") -> None:
    print(message, flush=True)


def machine() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


def prompt(n: int) -> List[int]:
    """A distinct ``PROMPT_LEN``-token prompt per request ``n`` (only the BOS token is shared)."""
    return [0] + [(13 * i + 31 * n) % 480 + 2 + n % 17 for i in range(PROMPT_LEN - 1)]


# -- model and ZoomR settings ----------------------------------------------------------------------
def add_model_arguments(parser) -> None:
    parser.add_argument("--model-path", default=None, help="default: the tiny local random-weight model")
    parser.add_argument("--zoomr-env", nargs="*", default=[], metavar="ZOOMR_X=VALUE",
                        help="ZoomR settings overriding the benchmark's defaults and the environment")


def check_zoomr_env(parser, items: Sequence[str]) -> None:
    for item in items:
        if "=" not in item or not item.startswith("ZOOMR_"):
            parser.error(f"--zoomr-env takes ZOOMR_NAME=VALUE items, not {item!r}")


def apply_zoomr_settings(args) -> Dict[str, str]:
    """Benchmark defaults (tiny model only) < the environment < ``--zoomr-env``. Servers inherit
    them; a bad value stops the zoomr server at start-up with an error naming the variable."""
    if args.model_path is None:
        for key, value in TINY_MODEL_SETTINGS.items():
            os.environ.setdefault(key, value)
    for item in args.zoomr_env:
        key, value = item.split("=", 1)
        os.environ[key] = value
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOOMR_")}


def start_run(args, title: str) -> Tuple[Dict[str, str], str, str, str]:
    """Apply the ZoomR settings, resolve the model and print the run's header; returns
    ``(settings, model_path, model_name, today)``."""
    import datetime
    import platform

    settings = apply_zoomr_settings(args)
    model_path, model_name = resolve_model(args)
    today = datetime.date.today().isoformat()
    log(f"ZoomR {title}, {today}, {machine()} ({platform.node()}), SGLang's {'CUDA' if ON_CUDA else 'CPU'} engine")
    log(f"model: {model_name} ({model_path}); ZoomR settings: {settings}")
    return settings, model_path, model_name, today


def finish_run(results_path: Path, summary: dict, details: dict, began: float) -> None:
    """Write ``details`` as JSON, say where, and print ``summary`` as the last stdout line (the
    script's contract)."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(details, indent=1) + "\n")
    log(f"\nresults: {results_path}\ntotal {time.time() - began:.0f} s")
    print(json.dumps(summary), flush=True)


def save_figure(fig, path: Path) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve_model(args) -> Tuple[str, str]:
    """``(model_path, name for reports)``: ``--model-path``, else the tiny local model (built once)."""
    if args.model_path is not None:
        return args.model_path, args.model_path
    from testbed.tiny_model import tiny_model_dir

    return str(tiny_model_dir()), "tiny random-weight model"


def context_length_for(model_path: str, needed: int) -> Optional[int]:
    """A ``--context-length`` to pass when the model's own is too short for the longest request."""
    limit = None
    with contextlib.suppress(OSError, ValueError):
        limit = json.loads((Path(model_path) / "config.json").read_text()).get("max_position_embeddings")
    if limit is None or needed <= limit:
        return None
    os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
    return -(-needed // 1024) * 1024


# -- one server ------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    backend: str
    startup_seconds: float


def server_command(model_path: str, backend: str, port: int, *, max_total_tokens: Optional[int], tiny: bool,
                   context_length: Optional[int], extra_args: Sequence[str] = ()) -> list:
    """SGLang's CPU engine needs fp32 and an explicit pool size (otherwise the pool takes most of
    the RAM), and gets this checkout's CPU flags (``process_env.CPU_ENGINE_ARGS``); on CUDA SGLang
    sizes the pool itself unless told."""
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
               "--port", str(port), "--attention-backend", backend, "--enable-metrics", "--skip-server-warmup",
               *extra_args]
    if ON_CUDA:
        command += ["--device", "cuda"] + (["--dtype", "bfloat16"] if tiny else [])
    else:
        command += ["--device", "cpu", "--dtype", "float32", *cpu_server_flags()]
        if max_total_tokens is None:
            raise ValueError("SGLang's CPU engine needs max_total_tokens (else its pool takes most of the RAM)")
    if max_total_tokens is not None:
        command += ["--max-total-tokens", str(max_total_tokens)]
    if context_length is not None:
        command += ["--context-length", str(context_length)]
    return command


@contextlib.contextmanager
def serve(command: Callable[[int], List[str]], name: str, *, env: Mapping[str, str], timeout: float = 300,
          log_path: Optional[Path] = None) -> Iterator[Server]:
    """A healthy server started by ``command(port)`` on a free loopback port with exactly ``env``,
    its whole process tree killed afterwards. Its output goes to ``log_path`` (kept), else to a
    temporary log that is kept (and named) only when something fails."""
    from sglang.srt.utils import kill_process_tree

    port = free_port()
    keep = log_path is not None
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"zoomr-bench-{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command(port), env=dict(env), stdout=log_file if keep else subprocess.DEVNULL,
                                stderr=log_file)
        try:
            wait_healthy(proc, url, log_path, name, timeout)
            yield Server(url=url, backend=name, startup_seconds=round(time.time() - start, 1))
        except BaseException:
            log(f"    {name} server log kept: {log_path}")
            raise
        finally:
            kill_process_tree(proc.pid)
    if not keep:
        log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def launch_server(model_path: str, backend: str, *, max_total_tokens: Optional[int], tiny: bool,
                  context_length: Optional[int] = None, timeout: float = 300, extra_args: Sequence[str] = (),
                  env: Optional[Dict[str, str]] = None) -> Iterator[Server]:
    """``serve`` of ``server_command`` (``env``: variables set for this server only)."""
    def command(port: int) -> list:
        return server_command(model_path, backend, port, max_total_tokens=max_total_tokens, tiny=tiny,
                              context_length=context_length, extra_args=extra_args)

    with serve(command, backend, env={**os.environ, **(env or {})}, timeout=timeout) as server:
        yield server


# -- what a server reports -------------------------------------------------------------------------
def parse_metrics(text: str, names: Iterable[str]) -> Dict[str, float]:
    """The gauges/counters ``names`` from Prometheus text (largest value over label sets)."""
    wanted = set(names)
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            with contextlib.suppress(ValueError):
                value = float(line.rsplit(" ", 1)[1])
                values[name] = max(values.get(name, value), value)
    return values


def read_metrics(url: str, names: Iterable[str]) -> Dict[str, float]:
    """``parse_metrics`` of ``GET /metrics``; empty when the server did not answer in time."""
    with contextlib.suppress(requests.RequestException):
        return parse_metrics(requests.get(f"{url}/metrics", timeout=5).text, names)
    return {}


def zoomr_state(url: str) -> Optional[dict]:
    """The zoomr backend's counters from ``/server_info``; None for another backend."""
    info = requests.get(f"{url}/server_info", timeout=30).json()
    return (info.get("internal_states") or [{}])[0].get("zoomr")
