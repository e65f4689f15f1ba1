#!/usr/bin/env bash
# Everything a lent GPU can tell about zoomr-sglang, in one call of under 8 minutes.
#
#   here, once:   bash benchmarks/gpu_site.sh            (.whl/site.tar.xz: SGLang + FlashInfer for the GPU image)
#   there:        OUT=/some/dir bash benchmarks/gpu_check.sh      (device tool: carry [".whl"])
#
# Parts, each under a hard time limit so that what finished is always reported:
#   1. install   unpack the archive into a temporary site folder, install this plug-in there (40 s)
#   2. tests     the CUDA tests (kernels against their torch references, no host sync, FlashInfer's
#                decode convention; FlashInfer compiles its decode kernels here, cached after) (110 s)
#   3. decode    benchmarks/decode_step.py at Llama-3.1-8B shapes, CUDA graphs (130 s)
#   4. serving   benchmarks/serving.py: launch_server on a random-weight Llama-3.1-8B (config only,
#                --load-format dummy), dense FlashInfer decode vs zoomr, CUDA graphs on, long outputs,
#                output tokens/s as a ratio; then zoomr's full policy against dense token for token
#                (zoomr's whole CUDA-graph decode path) and zoomr's self-check counter (its
#                FlashInfer decode against the float64 reference, inside the server) (190 s)
# Writes to $OUT (default ./gpu_check_out): gpu_check.log (everything), decode_step.json,
# serving.json, pytest.xml, summary.json. Exit status 0 only when every part passed. Without a GPU
# or without the archive it still runs what it can (CPU sizes), which is how it is rehearsed.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

part() {  # part NAME SECONDS COMMAND...: run under a limit, record "NAME rc seconds"
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "[$name: rc=$rc, $((SECONDS - started)) s]"
  echo "$name $rc $((SECONDS - started))" >> "$OUT/parts.txt"
}

install_site() {
  if [[ ! -f .whl/site.tar.xz ]]; then
    echo "no .whl/site.tar.xz: SGLang and FlashInfer come from this machine's Python, if it has them"
    return 0
  fi
  local site
  site=$(mktemp -d)
  tar -xJf .whl/site.tar.xz -C "$site" || return 1
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . || return 1
  echo "export PYTHONPATH=$site:$PWD" > "$OUT/env.sh"
}

run_all() {
  echo "== gpu_check $(date -u +%FT%TZ) in $PWD"
  rm -f "$OUT/parts.txt"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  export -f install_site
  part install 40 bash -c install_site
  [[ -f "$OUT/env.sh" ]] && source "$OUT/env.sh"
  # The SGLang build that travels needs these on torch 2.11 (its kernels are 0.4.5, its Rust radix
  # tree core is built for torch 2.14); FlashInfer compiles for the H200 only.
  export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python FLASHINFER_CUDA_ARCH_LIST=9.0a
  part tests 110 python3 -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_batched_votes.py tests/test_flashinfer_cuda.py \
    tests/test_host_tier_cuda.py tests/test_extend_holes.py --junitxml "$OUT/pytest.xml"
  # Without a GPU (a rehearsal): small sizes through the same commands.
  # Triton prefill on the GPU: FlashInfer's prefill kernels would compile for minutes at start.
  local decode_sizes=(--iters 10) model_shape=() prefill=triton
  local serving_sizes=(--concurrency 64 --input-len 512 --output-len 4096 --max-total-tokens 400000
                       --server-arg=--cuda-graph-max-bs=64 --server-arg=--max-running-requests=64)
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    decode_sizes=(--contexts 1024,2048 --batches 1,2 --iters 2)
    model_shape=(--layers 2 --hidden-size 256 --vocab-size 4096)
    prefill=torch_native
    serving_sizes=(--concurrency 2 --input-len 64 --output-len 256)
  fi
  part decode 130 bash -c 'python3 benchmarks/decode_step.py "$@" | tee "$OUT/decode_step.txt"; exit ${PIPESTATUS[0]}' \
    decode "${decode_sizes[@]}"
  tail -n 1 "$OUT/decode_step.txt" > "$OUT/decode_step.json" 2>/dev/null
  local model=$OUT/llama-3.1-8b-shape
  python3 -m testbed.shaped_model "$model" "${model_shape[@]}" >/dev/null
  part serving 190 python3 benchmarks/serving.py --model-path "$model" --prefill-backend "$prefill" \
    --server-arg=--load-format=dummy "${serving_sizes[@]}" --rounds 1 --probe 4 \
    --zoomr-env ZOOMR_SELF_CHECK_INTERVAL=997 ZOOMR_MAX_THOUGHT_TOKENS=256 ZOOMR_HOST_POOL_GB=16 \
    --results "$OUT/serving.json"
  python3 - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
parts = {name: {"rc": int(rc), "seconds": int(s)} for name, rc, s in (l.split() for l in (out / "parts.txt").read_text().splitlines())}
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
serving = load("serving.json") or {}
summary = {"ok": all(p["rc"] == 0 for p in parts.values()), "parts": parts, "decode_step": load("decode_step.json"),
           "serving": serving.get("summary"), "probe_identical": serving.get("probe_identical"),
           "self_checks": (serving.get("zoomr") or {}).get("self_checks")}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("== summary", json.dumps(summary))
EOF
  python3 -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)"
}

run_all 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
