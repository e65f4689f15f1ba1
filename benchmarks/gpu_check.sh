#!/usr/bin/env bash
# Everything a lent GPU can tell about zoomr-sglang, in two device calls of at most 6 minutes each
# (the machine's start included: about 5 minutes of command time each), back to back.
#
#   here, once:  bash benchmarks/gpu_site.sh       (.whl/site.tar.xz: SGLang + FlashInfer for the GPU
#                                                   image; its size in benchmarks/gpu_site.json)
#                python3 benchmarks/device_carry.py --carry .whl --summary     (must be under 64 MiB)
#   call 1:      device run  command="bash benchmarks/gpu_check.sh 1"  carry=[".whl"]  timeout_s=330
#   call 2:      device run  command="bash benchmarks/gpu_check.sh 2"  carry=[".whl"]  timeout_s=330
#
# A warm machine keeps the ignored folders .gpu_site/ (the unpacked archive) and .gpu_cache/
# (FlashInfer's and Triton's compiled kernels, the model folder), so call 2 skips the unpack and
# FlashInfer's compile; on a fresh machine it unpacks again (the same archive travels with it).
#
# Each part runs under its own limit, cut to what the call's budget (GPU_CHECK_BUDGET, 300 s) leaves
# after the parts before it, so that the call ends, summary written, before the device's timeout_s.
# Call 1 parts:
#   install  unpack the archive into .gpu_site/site unless there already; the plug-in's entry point
#            (.gpu_site/plugin, its package imported from this checkout) (60 s)
#   smoke    import the server, FlashInfer and sgl_kernel; the plug-in registers
#            through its entry point; one sgl_kernel op against torch (90 s)
#   jit      FlashInfer's decode module at Llama-3.1-8B decode shapes (32/8 heads, head_dim 128, bf16,
#            tensor cores, page size 1, log-sum-exp), compile timed, checked against torch (150 s)
#   tests    the CUDA tests (pytest -m cuda over the test files that have them) (120 s)
#   decode   benchmarks/decode_step.py at the device's sizes, rows written per cell (the rest)
# Call 2 parts:
#   install  as above (seconds when warm)
#   model    a Llama-3.1-8B-shaped model folder and a 2-layer one with its heads for the probe (config
#            and tokenizer; the servers load dummy weights)
#   probe    serving.py --part probe on the 2-layer model: zoomr's full policy against dense token for
#            token, self-checks (90 s)
#   timing   serving.py --part timing: dense FlashInfer against zoomr (self-checks off), per context
#            and batch, capacity at equal memory (the rest of the budget, passed as --time-budget)
# Every server argument is in serving.py's presets (gpu, or rehearsal on a CPU); this script passes
# none, and no ZOOMR_* setting (it unsets the environment's).
#
# Writes to $OUT (default ./gpu_check_out) as it goes, at most 8 files (what a device call returns):
# gpu_check.log (everything), parts.txt (a "name rc seconds limit" line per finished part),
# summary.json (rewritten after every part), checks.json (smoke, jit), pytest.xml, decode_step.json
# (its last line), decode_step_rows.json; call 2: serving_probe.json, serving_timing.json and
# server_logs_<part>.tgz (serving.py's --log-dir, packed after its part). Exit status 0 only when
# every part passed. Without a GPU (no nvidia-smi) the same parts run at CPU sizes with this
# machine's Python (the archive is not unpacked, FlashInfer's JIT is skipped), limits and budget
# doubled: the rehearsal, tests/test_gpu_check.py (PATH=.venv/bin:$PATH bash benchmarks/gpu_check.sh 1).
# GPU_SITE_DIR and GPU_CACHE_DIR move .gpu_site and .gpu_cache.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
call=${1:-}
[[ $call == 1 || $call == 2 ]] || { echo "usage: bash benchmarks/gpu_check.sh 1|2" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu_check_out}
SITE=${GPU_SITE_DIR:-$PWD/.gpu_site}
CACHE=${GPU_CACHE_DIR:-$PWD/.gpu_cache}
RESERVE=10  # seconds kept for the summary and packing the logs after the last part
mkdir -p "$OUT" "$CACHE"
rm -f "$OUT/parts.txt" "$OUT/summary.json" "$OUT/checks.json"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
inherited=$(compgen -e | grep '^ZOOMR_' | tr '\n' ' ')
unset TRITON_INTERPRET $inherited  # compiled kernels; serving.py's presets alone set zoomr's settings
# The SGLang build that travels needs these on torch 2.11 (its kernels are 0.4.5; its Rust radix-tree
# core, removed from the archive, is built for torch 2.14); FlashInfer compiles for Hopper (9.0a).
export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python FLASHINFER_CUDA_ARCH_LIST=9.0a
export FLASHINFER_WORKSPACE_BASE=$CACHE TRITON_CACHE_DIR=$CACHE/triton TVM_FFI_CACHE_DIR=$CACHE/tvm-ffi
on_gpu=false
command -v nvidia-smi >/dev/null && on_gpu=true  # as testbed/process_env.py decides (no cpu_shim then)
slower=1  # the part limits are the GPU machine's (16 cores); a shared CPU runner gets twice each
if $on_gpu; then
  preset=gpu; decode_sizes=(--iters 10); model_shape=()
  export PYTHONPATH=$SITE/plugin:$SITE/site:$PWD
else
  preset=rehearsal; decode_sizes=(--contexts 400,1200 --batches 1,2 --iters 1); slower=2
  model_shape=(--layers 2 --hidden-size 256 --vocab-size 4096)
  export PYTHONPATH=$SITE/plugin:$PWD
fi
BUDGET=${GPU_CHECK_BUDGET:-$((300 * slower))}
deadline=$((SECONDS + BUDGET))

limit_for() {  # limit_for SECONDS: a part's limit (SECONDS on the GPU machine), within what the budget leaves
  local limit=$(($1 * slower)) left=$((deadline - SECONDS - RESERVE))
  echo $((limit < left ? limit : left))
}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under limit_for SECONDS, record it, rewrite the summary
  local name=$1 limit started=$SECONDS
  limit=$(limit_for "$2")
  shift 2
  if (( limit < 5 )); then
    echo "== $name: no time left in the ${BUDGET} s budget"
    echo "$name 124 0 0" >> "$OUT/parts.txt"
  else
    echo "== $name (limit ${limit} s) $(date -u +%T)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "[$name: rc=$rc, $((SECONDS - started)) s]"
    echo "$name $rc $((SECONDS - started)) $limit" >> "$OUT/parts.txt"
  fi
  python3 benchmarks/gpu_parts.py summary "$OUT" "$call" >/dev/null
}

install_site() {  # unpack once per machine (a marker names the archive it came from); entry point always
  if $on_gpu; then
    local stamp
    [[ -f .whl/site.tar.xz ]] || { echo "no .whl/site.tar.xz (carry [\".whl\"])"; return 1; }
    stamp=$(sha256sum .whl/site.tar.xz | cut -c1-16)  # the copy's time stamps change from call to call
    if [[ $(cat "$SITE/site/.unpacked" 2>/dev/null) != "$stamp" ]]; then
      rm -rf "$SITE/site" && mkdir -p "$SITE/site" || return 1
      tar -xJf .whl/site.tar.xz -C "$SITE/site" || return 1
      echo "$stamp" > "$SITE/site/.unpacked"
      echo "unpacked .whl/site.tar.xz into $SITE/site"
    else
      echo "$SITE/site already holds this archive (a warm machine)"
    fi
  else
    echo "no GPU: this machine's Python serves the rehearsal (the archive is for the GPU image)"
  fi
  rm -rf "$SITE/plugin" && python3 benchmarks/gpu_parts.py dist-info "$SITE/plugin"
}

serving() {  # serving PART SECONDS MODEL: one serving.py part, its server logs packed after it
  local limit
  limit=$(limit_for "$2")  # serving.py stops starting work within it, leaving 20 s to stop its servers
  part "$1" "$2" python3 benchmarks/serving.py --preset "$preset" --part "$1" --model-path "$3" \
    --results "$OUT/serving_$1.json" --log-dir "$OUT/logs" --time-budget $((limit > 40 ? limit - 20 : limit / 2))
  [[ -d $OUT/logs ]] && tar -czf "$OUT/server_logs_$1.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
}

run_call() {
  echo "== gpu_check.sh $call $(date -u +%FT%TZ) in $PWD, preset $preset, budget ${BUDGET} s"
  [[ -n $inherited ]] && echo "unset ${inherited}(serving.py's presets alone set zoomr's settings)"
  $on_gpu && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  export -f install_site
  export SITE on_gpu
  part install 60 bash -c install_site
  if [[ $call == 1 ]]; then
    part smoke 90 python3 benchmarks/gpu_parts.py smoke --into "$OUT/checks.json"
    part jit 150 python3 benchmarks/gpu_parts.py jit --into "$OUT/checks.json"
    mapfile -t cuda_tests < <(grep -l 'mark\.cuda' tests/test_*.py)
    part tests 120 python3 -m pytest -q -rs -p no:cacheprovider -m cuda --continue-on-collection-errors \
      "${cuda_tests[@]}" --junitxml "$OUT/pytest.xml"
    part decode 300 bash -c 'python3 benchmarks/decode_step.py "$@" --results "$OUT/decode_step_rows.json" \
      | tee /dev/stderr | tail -n 1 > "$OUT/decode_step.json"; exit ${PIPESTATUS[0]}' decode "${decode_sizes[@]}"
  else
    # The probe checks the CUDA path token for token, not speed: a 2-layer model with Llama-3.1-8B's
    # heads (head_dim 128, 4 query heads per KV head) starts in seconds; timing gets the 8B shape.
    part model 60 bash -c 'python3 -m testbed.shaped_model "$1/model" "${@:2}" &&
      python3 -m testbed.shaped_model "$1/probe_model" --layers 2 --hidden-size 1024 --vocab-size 4096' \
      model "$CACHE" "${model_shape[@]}"
    serving probe 90 "$CACHE/probe_model"
    serving timing 300 "$CACHE/model"
  fi
  python3 benchmarks/gpu_parts.py summary "$OUT" "$call"
  python3 -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)"
}

run_call 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
