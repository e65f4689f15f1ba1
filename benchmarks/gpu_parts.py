#!/usr/bin/env python
"""The Python parts of ``benchmarks/gpu_check.sh`` (see its header), one subcommand each:

    python3 benchmarks/gpu_parts.py dist-info SITE       # the plug-in's entry point, without pip
    python3 benchmarks/gpu_parts.py smoke --into FILE    # imports, plug-in registration, sgl_kernel
    python3 benchmarks/gpu_parts.py jit --into FILE      # FlashInfer's decode JIT at Llama-3.1-8B shapes
    python3 benchmarks/gpu_parts.py summary OUT CALL     # OUT/summary.json from what the parts wrote

``smoke`` and ``jit`` print one JSON line and merge it under their name into ``--into`` (the
check's ``checks.json``); an exception fails the part with its message in the log. This file
imports nothing outside the standard library at module level: ``dist-info`` and ``summary`` run
before (or without) the site the check unpacks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_FILES = ("decode_step.json", "serving_probe.json", "serving_timing.json")


def write_dist_info(site: Path) -> Path:
    """What ``pip install`` would leave for SGLang's plug-in loader to find (``importlib.metadata``
    reads ``METADATA`` and ``entry_points.txt``); the package itself is imported from the checkout,
    so a warm machine's second call sees the tree it was sent. Written from ``pyproject.toml``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in groups.items()))
    return info


def smoke() -> dict:
    """Everything the servers import, the plug-in registered through its entry point, and on a GPU
    one sgl_kernel op (sglang-kernel 0.4.5 against this torch, the archive's least certain pairing)
    against torch."""
    from importlib.metadata import entry_points, version

    import torch

    result = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "sglang": version("sglang")}
    (point,) = [p for p in entry_points(group="sglang.srt.plugins") if p.name == "zoomr"]
    result["entry_point"] = point.value
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    load_plugins()
    if "zoomr" not in ATTENTION_BACKENDS:
        raise RuntimeError("load_plugins() did not register the zoomr attention backend")
    import sglang.launch_server  # noqa: F401
    import sglang.srt.entrypoints.http_server  # noqa: F401  (fastapi, uvicorn, zmq, pydantic)

    if torch.cuda.is_available():
        import flashinfer
        import sgl_kernel

        import zoomr_sglang.attention_backend.flashinfer_backend  # noqa: F401

        result.update(flashinfer=flashinfer.__version__, sgl_kernel=version("sglang-kernel"),
                      device=torch.cuda.get_device_name())
        x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
        weight = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
        expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float())
        result["rmsnorm_max_error"] = float((sgl_kernel.rmsnorm(x, weight, 1e-6).float() - expected).abs().max())
        if not result["rmsnorm_max_error"] < 0.1:
            raise RuntimeError(f"sgl_kernel.rmsnorm differs from torch by {result['rmsnorm_max_error']}")
    return result


def flashinfer_jit(batch: int = 4, context: int = 1024) -> dict:
    """Compile (or load from FLASHINFER_WORKSPACE_BASE's cache) the decode module the servers use
    at Llama-3.1-8B decode shapes (32 query / 8 KV heads, head_dim 128, bf16, tensor cores, page
    size 1, with the log-sum-exp), timed, and check one batch against the float32 reference."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no GPU: FlashInfer compiles for the device only"}
    import flashinfer

    heads, kv_heads, head_dim, dev = 32, 8, 128, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    keys, values = (torch.randn(batch * context, 1, kv_heads, head_dim, generator=gen, device=dev).to(torch.bfloat16)
                    for _ in range(2))
    query = torch.randn(batch, heads, head_dim, generator=gen, device=dev).to(torch.bfloat16)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev) * context
    indices = torch.randperm(batch * context, generator=gen, device=dev).to(torch.int32)
    last_page_len = torch.ones(batch, dtype=torch.int32, device=dev)
    started = time.perf_counter()
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD", use_tensor_cores=True)
    wrapper.plan(indptr, indices, last_page_len, heads, kv_heads, head_dim, 1,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    out, lse = wrapper.run(query, (keys, values), return_lse=True)
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    started = time.perf_counter()
    wrapper.run(query, (keys, values), return_lse=True)
    torch.cuda.synchronize()
    again = time.perf_counter() - started
    k = keys[indices.long()].view(batch, context, kv_heads, head_dim).float().repeat_interleave(heads // kv_heads, 2)
    v = values[indices.long()].view(batch, context, kv_heads, head_dim).float().repeat_interleave(heads // kv_heads, 2)
    scores = torch.einsum("bhd,bthd->bht", query.float(), k) * head_dim ** -0.5
    expected = torch.einsum("bht,bthd->bhd", scores.softmax(-1), v)
    result = {"first_call_seconds": round(first, 2), "cached_call_ms": round(again * 1e3, 3),
              "out_max_error": float((out.float() - expected).abs().max()),
              "lse_max_error": float((lse.float() * math.log(2) - scores.logsumexp(-1)).abs().max())}
    if not (result["out_max_error"] < 2e-2 and result["lse_max_error"] < 1e-2):
        raise RuntimeError(f"FlashInfer's decode differs from the reference: {result}")
    return result


def record(into: Path, name: str, result: dict) -> None:
    """Merge ``result`` under ``name`` into the JSON file ``into`` and print it (the log's line)."""
    merged = json.loads(into.read_text()) if into.exists() else {}
    merged[name] = result
    into.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps({name: result}), flush=True)


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_summary(out: Path, call: int) -> dict:
    """``out/summary.json``: each finished part's status and time (``parts.txt``: ``name rc seconds
    limit`` lines), the checks' results and each result file's ``summary`` (or the whole, if it has
    none); ``ok`` when every part ran and returned 0."""
    lines = (out / "parts.txt").read_text().splitlines() if (out / "parts.txt").exists() else []
    parts = {name: {"rc": int(rc), "seconds": int(s), "limit": int(limit)}
             for name, rc, s, limit in (line.split() for line in lines)}
    results = {}
    for name in RESULT_FILES:
        data = load_json(out / name)
        if data is not None:
            results[name] = data.get("summary", data) if isinstance(data, dict) else data
    summary = {"call": call, "ok": bool(parts) and all(p["rc"] == 0 for p in parts.values()), "parts": parts,
               "checks": load_json(out / "checks.json") or {}, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dist-info").add_argument("site", type=Path)
    for name in ("smoke", "jit"):
        sub.add_parser(name).add_argument("--into", type=Path, required=True)
    summary = sub.add_parser("summary")
    summary.add_argument("out", type=Path)
    summary.add_argument("call", type=int, choices=(1, 2))
    args = parser.parse_args(argv)
    if args.command == "dist-info":
        print(write_dist_info(args.site))
    elif args.command == "summary":
        print("== summary", json.dumps(write_summary(args.out, args.call)))
    else:
        sys.path.insert(0, str(REPO))
        from testbed.process_env import prepare_process_env

        prepare_process_env()  # without a GPU: SGLang's CPU engine and the sgl_kernel stand-in
        started = time.perf_counter()
        result = smoke() if args.command == "smoke" else flashinfer_jit()
        record(args.into, args.command, {**result, "seconds": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
