"""The GPU check before any GPU sees it: what a device call carries stays under its limit, and both
calls of ``benchmarks/gpu_check.sh`` run here at CPU sizes (the rehearsal: the same parts, files
and summary as on the device, with this machine's Python, no archive unpacked, no FlashInfer JIT;
call 2 starts real CPU servers through ``benchmarks/serving.py --preset rehearsal``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from bench_scripts import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import device_carry  # noqa: E402  (standard library only)
from serving_presets import PRESETS  # noqa: E402  (standard library only)

CARRY_BUDGET_MIB = 60  # of the 64 MiB a call carries: room for a few untracked files in flight
RETURNED_FILES = 8  # a device call returns at most 8 files from $OUT, none deeper than 2 folders
CALL_TIMEOUT = 660  # a rehearsal call's budget (twice the GPU's 300 s: a shared CPU) and a minute


def test_tree_and_recorded_archive_fit_one_device_call():
    """Tracked and untracked-not-ignored files (what travels without ``carry``) plus the archive
    ``gpu_site.sh`` last built (its bytes committed in ``benchmarks/gpu_site.json``)."""
    record = json.loads((REPO / "benchmarks" / "gpu_site.json").read_text())
    archive = REPO / record["archive"]
    assert record["archive"] == ".whl/site.tar.xz" and record["archive_bytes"] > 10 * device_carry.MIB
    if archive.exists():  # built here: the record must be this archive's
        assert archive.stat().st_size == record["archive_bytes"], "rerun benchmarks/gpu_site.sh to record it"
    tree = sum(device_carry.tree_files().values())
    total_mib = (tree + record["archive_bytes"]) / device_carry.MIB
    assert total_mib <= CARRY_BUDGET_MIB, f"tree {tree / device_carry.MIB:.1f} MiB + archive: {total_mib:.1f} MiB"


def test_carry_counts_tracked_untracked_and_carried_files_but_not_ignored_ones(tmp_path):
    def write(name, size):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/.whl/\n/build/\n")  # 15 bytes
    for name, size in [("tracked.py", 100), ("gone.py", 7), ("new.txt", 30), (".whl/site.tar.xz", 4000),
                       (".whl/more/a.whl", 50), ("build/out.so", 9000)]:
        write(name, size)
    subprocess.run(["git", "add", ".gitignore", "tracked.py", "gone.py"], cwd=tmp_path, check=True)
    (tmp_path / "gone.py").unlink()  # tracked but deleted: not in the working tree, does not travel
    tree = {".gitignore": 15, "tracked.py": 100, "new.txt": 30}
    assert device_carry.tree_files(tmp_path) == tree
    carried = {".whl/site.tar.xz": 4000, ".whl/more/a.whl": 50}
    assert device_carry.carried_files([".whl"], tmp_path) == carried
    assert device_carry.call_files([".whl"], tmp_path) == {**tree, **carried}


def run_call(call: int, tmp_path: Path) -> Path:
    """``bash benchmarks/gpu_check.sh CALL`` with its output, site and caches under ``tmp_path``,
    this interpreter's environment first on PATH (as ``python3``); returns ``$OUT``."""
    out = tmp_path / f"out{call}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOOMR_")}
    env.update(OUT=str(out), GPU_SITE_DIR=str(tmp_path / "site"), GPU_CACHE_DIR=str(tmp_path / "cache"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               ZOOMR_CONFIG='{"self_check_interval": 3}')  # the script unsets it: presets alone set zoomr's settings
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(call)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=CALL_TIMEOUT)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else proc.stdout
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-2000:]
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= RETURNED_FILES and all(p.parent == out for p in returned), returned
    assert "unset ZOOMR_CONFIG" in log  # timing runs never inherit a self-check interval
    return out


def check_summary(out: Path, call: int, part_names: list) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    parts = [line.split() for line in (out / "parts.txt").read_text().splitlines()]
    assert [p[0] for p in parts] == part_names and all(p[1] == "0" for p in parts)
    assert summary["call"] == call and summary["ok"] and list(summary["parts"]) == part_names
    assert all(int(limit) >= int(seconds) for _, _, seconds, limit in parts)
    return summary


def test_rehearsal_of_call_1_install_smoke_jit_tests_decode(tmp_path):
    out = run_call(1, tmp_path)
    summary = check_summary(out, 1, ["install", "smoke", "jit", "tests", "decode"])
    checks = json.loads((out / "checks.json").read_text())
    assert checks["smoke"]["entry_point"] == "zoomr_sglang.plugin:register" and checks["smoke"]["sglang"] == "0.5.23"
    assert "skipped" in checks["jit"] and summary["checks"] == checks
    info = next((tmp_path / "site" / "plugin").glob("zoomr_sglang-*.dist-info"))
    assert "zoomr = zoomr_sglang.plugin:register" in (info / "entry_points.txt").read_text()
    suite = ElementTree.parse(out / "pytest.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 5 and int(suite.get("skipped")) == int(suite.get("tests"))  # no GPU: all skip
    # decode_step.py at the CPU sizes (its only run in the suite): its last line is its JSON contract.
    decode = json.loads((out / "decode_step.json").read_text())
    assert summary["results"]["decode_step.json"] == decode
    assert set(decode) == {"device", "step_ratio", "selection_overhead", "batch", "host_us_per_request",
                           "tier_copy_gbps", "worst_step_ratio", "worst_selection_overhead"}
    assert decode["device"] == "cpu" and decode["batch"] == 2
    assert set(decode["step_ratio"]) == set(decode["worst_step_ratio"]) == {"400", "1200"}
    assert all(ratio > 0 for ratio in [*decode["step_ratio"].values(), *decode["worst_step_ratio"].values()])
    assert -1.0 < decode["selection_overhead"] < 1.0 and -1.0 < decode["worst_selection_overhead"] < 1.0
    assert decode["host_us_per_request"] > 0 and decode["tier_copy_gbps"] > 0
    # The history is real: with the host tier on, cold thoughts left the device before the timed steps.
    written = json.loads((out / "decode_step_rows.json").read_text())
    assert written["summary"] == decode and written["zoomr_config"]["host_pool_gb"] is None  # the server default
    rows = written["rows"]
    assert [(r["context"], r["batch"]) for r in rows] == [(400, 1), (1200, 1), (400, 2), (1200, 2)]
    assert all(r["slots"] == "tiered" for r in rows)
    assert all(r["tier"]["evicted_tokens"] > 0 for r in rows if r["context"] == 1200)


@pytest.mark.engine
def test_rehearsal_of_call_2_model_probe_timing(tmp_path):
    out = run_call(2, tmp_path)
    summary = check_summary(out, 2, ["install", "model", "probe", "timing"])
    for part in ("probe", "timing"):
        results = json.loads((out / f"serving_{part}.json").read_text())
        assert summary["results"][f"serving_{part}.json"] == results.get("summary", results)
        assert (out / f"server_logs_{part}.tgz").stat().st_size > 0
    assert json.loads((tmp_path / "cache" / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    # The probe: zoomr's full policy gives dense's tokens; the self-checks ran, outside the compared steps.
    probe = json.loads((out / "serving_probe.json").read_text())
    probe_summary = probe.get("summary", probe)
    assert probe_summary["ok"] and probe_summary["probe_identical"] == [True] * PRESETS["rehearsal"].probe_requests
    assert probe_summary["full_policy_self_checks"] == 0
    assert probe_summary["self_checks"]["compared"] > 0 and probe_summary["self_checks"]["max_error"] < 1e-4
    # Timing: throughput per cell, capacity where dense's pool (four 2,112-token requests) cannot hold eight.
    timing = json.loads((out / "serving_timing.json").read_text())
    result = timing["summary"]
    assert set(result) == {"device", "output_throughput", "throughput_ratio", "capacity"}
    assert result["device"] == "cpu" and set(result["throughput_ratio"]) == {"1024x1", "2048x8"}
    assert all(result["output_throughput"][backend]["1024x1"] > 0 for backend in ("dense", "zoomr"))
    assert 1 <= result["capacity"]["2048x8"]["dense"]["running"] <= 4
    assert timing["errors"] == [] and "self_check_interval" not in timing["servers"]["zoomr"]["zoomr_env"].get("ZOOMR_CONFIG", "")
    activity = timing["cells"]["2048x8"]["zoomr"]["zoomr"]
    assert activity["requests_seen"] == 8 and activity["refreshes"] > 0 and activity["summaries"] > 0
    assert activity["over_bound_steps"] == 0 and activity["self_checks"] == 0
    assert activity["host_tier"]["evicted_tokens"] > 0 and activity["host_tier"]["zoom_in_failures"] == 0
