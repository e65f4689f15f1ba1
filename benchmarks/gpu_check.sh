#!/usr/bin/env bash
# One prepared check for a lent GPU machine: the CUDA tests, then the kernel benchmark.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (OUT defaults to ./gpu_check_out)
#
# Needs only python with torch and triton; installs nothing. Uses pytest when it is importable,
# otherwise `gpu_kernels_bench.py --check` stands in for the tests. Hard time limits keep the whole
# run under 8 minutes: tests 150 s, benchmark 270 s (plus a few seconds of set-up).
# Writes to $OUT:
#   gpu_check.log    everything printed
#   gpu_check.json   summary: environment, test counts/outcome, benchmark JSON, ok
#   bench.json       the benchmark's JSON line (results, checks)
#   pytest.xml       JUnit XML of the tests (pytest only); check.json (no pytest)
# Exit status 0 only when the tests and the benchmark's checks pass. Without a GPU it still runs
# (CUDA tests skip, benchmark at --smoke sizes), which is how the script itself is tested.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log

TEST_FILES=(tests/test_kernels.py tests/test_index_keys.py tests/test_voting.py tests/test_working_set.py
            tests/test_segmentation.py tests/test_gpu_bench_smoke.py tests/test_host_tier_cuda.py)  # none of these imports SGLang

run() {
  local started=$SECONDS
  echo "== gpu_check $(date -u +%FT%TZ) in $PWD, OUT=$OUT"
  local py=""
  for cand in "${PYTHON:-}" python3 python; do
    if [[ -n "$cand" ]] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
      py=$cand
      break
    fi
  done
  if [[ -z "$py" ]]; then
    echo "no python with torch found"
    printf '{"ok": false, "error": "no python with torch"}\n' > "$OUT/gpu_check.json"
    return 1
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONDONTWRITEBYTECODE=1
  unset TRITON_INTERPRET  # the compiled kernel, not the interpreter

  echo "== environment"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" - <<'EOF'
import sys, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # report, keep going
    tv = f"missing ({exc})"
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  triton {tv}")
print(f"cuda available: {torch.cuda.is_available()}"
      + (f"  device: {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}"
         if torch.cuda.is_available() else ""))
EOF
  local has_cuda=0
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && has_cuda=1

  echo "== tests"
  local runner tests_rc tests_started=$SECONDS
  if "$py" -c "import pytest" >/dev/null 2>&1; then
    runner=pytest
    timeout -k 10 150 "$py" -m pytest -q -rs -p no:cacheprovider "${TEST_FILES[@]}" --junitxml "$OUT/pytest.xml"
    tests_rc=$?
  else
    runner=bench-check
    echo "pytest is not installed: running gpu_kernels_bench.py --check instead"
    timeout -k 10 150 "$py" benchmarks/gpu_kernels_bench.py --check --json "$OUT/check.json"
    tests_rc=$?
  fi
  local tests_s=$((SECONDS - tests_started))
  echo "[tests: rc=$tests_rc, ${tests_s} s]"

  echo "== benchmark"
  local bench_args=(--json "$OUT/bench.json")
  if [[ $has_cuda == 0 ]]; then
    echo "no CUDA device: benchmark at --smoke sizes on the CPU"
    bench_args+=(--smoke)
  fi
  local bench_rc bench_started=$SECONDS
  timeout -k 10 270 "$py" benchmarks/gpu_kernels_bench.py "${bench_args[@]}"
  bench_rc=$?
  local bench_s=$((SECONDS - bench_started))
  echo "[benchmark: rc=$bench_rc, ${bench_s} s]"

  RUNNER=$runner TESTS_RC=$tests_rc TESTS_S=$tests_s BENCH_RC=$bench_rc BENCH_S=$bench_s \
  TOTAL_S=$((SECONDS - started)) HAS_CUDA=$has_cuda "$py" - <<'EOF'
import json, os, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
env = {k: os.environ[k] for k in ("RUNNER", "TESTS_RC", "TESTS_S", "BENCH_RC", "BENCH_S", "TOTAL_S", "HAS_CUDA")}
tests = {"runner": env["RUNNER"], "rc": int(env["TESTS_RC"]), "seconds": int(env["TESTS_S"])}
if (out / "pytest.xml").exists():
    try:
        suites = ET.parse(out / "pytest.xml").getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = sum(int(s.get(key, 0)) for s in suites)
        cases = []
        for case in ET.parse(out / "pytest.xml").getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = tag
            cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time", 0))})
        tests["cases"] = cases
    except Exception as exc:  # keep the summary even if the XML is odd
        tests["xml_error"] = repr(exc)
if (out / "check.json").exists():
    try:
        tests["checks"] = json.loads((out / "check.json").read_text())["checks"]
    except Exception as exc:
        tests["check_error"] = repr(exc)
bench = None
if (out / "bench.json").exists():
    try:
        bench = json.loads((out / "bench.json").read_text())
    except Exception as exc:
        bench = {"error": repr(exc)}
summary = {
    "ok": tests["rc"] == 0 and int(env["BENCH_RC"]) == 0,
    "cuda": env["HAS_CUDA"] == "1",
    "device": bench.get("device") if isinstance(bench, dict) else None,
    "total_seconds": int(env["TOTAL_S"]),
    "tests": tests,
    "bench": {"rc": int(env["BENCH_RC"]), "seconds": int(env["BENCH_S"]), "summary": bench},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"== summary: ok={summary['ok']} cuda={summary['cuda']} tests rc={tests['rc']}"
      f" ({ {k: tests.get(k) for k in ('tests', 'failures', 'errors', 'skipped')} })"
      f" bench rc={env['BENCH_RC']} total {env['TOTAL_S']} s -> {out / 'gpu_check.json'}")
EOF
  [[ $tests_rc == 0 && $bench_rc == 0 ]]
}

export OUT
run 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
