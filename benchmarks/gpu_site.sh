#!/usr/bin/env bash
# Build .whl/site.tar.xz: what a bare GPU machine with Python 3.12 and torch 2.11 (the lent H100/H200
# image) lacks to run a real SGLang server with this plug-in, in one archive small enough to travel
# with the working tree (64 MiB per device call together; benchmarks/device_carry.py prints it all).
#
#   bash benchmarks/gpu_site.sh        (from the repo root, here, with network; 3-10 minutes on 2 cores)
#
# SGLang 0.5.23 pins torch 2.14.1 and sglang-kernel 0.4.10, whose kernels need libtorch symbols torch
# 2.11 lacks; sglang-kernel 0.4.5 (built for torch 2.11) provides every name SGLang 0.5.23 imports.
# The archive holds SGLang 0.5.23, FlashInfer 0.7.2, that sglang-kernel, and the small pure-Python or
# manylinux packages the server and SGLang's bench_serving import that the image does not have, less
# what a dense Llama/Qwen server (FlashInfer or zoomr decode, triton prefill) never loads (SLIM below).
# Writes benchmarks/gpu_site.json (the archive's bytes: tests/test_gpu_check.py holds the tracked
# tree plus that under 60 MiB). benchmarks/gpu_check.sh unpacks it there. Needs a python3.12 here.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py312=""
for cand in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py312=$cand; break
  fi
done
[[ -n $py312 ]] || { echo "gpu_site: needs a python3.12 here (the GPU machine's version)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for tag in 2_34 2_28 2_27 2_26 2_24 2_17 2014 2_5 1; do
  [[ $tag == 2014 || $tag == 1 ]] && platforms+=(--platform "manylinux${tag}_x86_64") || platforms+=(--platform "manylinux_${tag}_x86_64")
done
packages=(
  sglang==0.5.23 flashinfer-python==0.7.2 sglang-kernel==0.4.5 apache-tvm-ffi==0.1.11
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 orjson==3.13.0 pyzmq==27.3.0
  msgspec==0.23.0 pybase64==1.5.1 setproctitle==1.3.8 partial-json-parser==0.2.1.1.post7 openai==2.8.0 distro==1.9.0
  sniffio==1.3.1 opentelemetry-api==1.45.2 xgrammar==0.2.7 compressed-tensors==0.18.0 gguf==0.19.0 dill==0.4.1
  loguru==0.7.3 ipython==9.18.1 traitlets==5.16.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
  datasets==5.2.0 multiprocess==0.70.19  # SGLang's bench_serving imports datasets
)
echo "[gpu_site] downloading ${#packages[@]} wheels for cp312 manylinux x86_64"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$work/wheels" "${packages[@]}" 2> >(grep -v '^WARNING: Location' >&2)
echo "[gpu_site] installing into a staging folder"
"$py312" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl \
  2> >(grep -v '^WARNING: Location' >&2)
# SLIM: removed wholesale (binaries and sources nothing on our path loads):
#  - sgl_kernel's FlashAttention/FlashMLA/InfLLM ops (1.1 GB), its Blackwell build (sm100/), triton_kernels;
#  - SGLang's Rust extensions (_server, _grpc, _bench, _multimodal: only with SGLANG_RUST_SERVER, gRPC,
#    the Rust bench client or Rust image processing) and its Rust radix-tree core (built for torch
#    2.14; gpu_check.sh selects the Python core), and sglang/multimodal_gen (the diffusion server);
#  - FlashInfer JIT sources of MoE, DeepSeek-V4 sparse MLA, KDA/GDN linear attention, Blackwell-only
#    and SM120 kernels, video sparse attention (the decode, prefill, page, norm, rope and sampling
#    sources and the headers, cutlass and cccl included, stay).
rm -rf "$work/site/bin" "$work/site/triton_kernels" "$work/site/sgl_kernel/sm100" \
       "$work/site/sgl_kernel/flash_ops.abi3.so" "$work/site/sgl_kernel/flashmla_ops.abi3.so" "$work"/site/sgl_kernel/infllm_ops*.so \
       "$work"/site/sglang/srt/rust_extensions/_*.so "$work"/site/sglang/srt/mem_cache/rust_tree_core/*.so \
       "$work/site/sglang/multimodal_gen"
csrc=$work/site/flashinfer/data/csrc
rm -rf "$csrc"/{cake_dsv4,kda,fused_moe,gdn,bgmv_moe,cake_bgmv_moe,blackwell_bf16_fp4,blackwell_msa,experimental} \
       "$csrc"/{cake_batch_deepgemm_fp8,cake_grouped_fp8_gemm,cake_sage_block_sparse_attention,cake_vsa,cake_vsa_sm90} \
       "$csrc"/{cake_trtllm_mla_blackwell,sparse_mla_sm120,nvfp4_attention_sm120,cake_kimi_k3_mla} \
       "$csrc"/cake_minimax_h3_* "$csrc"/alphamoe_*
#  - data files (kernel sources, tuned-kernel tables) of FlashInfer's MoE and experimental packages;
#    their Python modules stay, since flashinfer/__init__.py imports them.
find "$work/site/flashinfer/experimental" "$work/site/flashinfer/fused_moe/backends" "$work/site/flashinfer/moe_ep/kernel_src" \
     -type f ! -name '*.py' -delete
mkdir -p .whl
echo "[gpu_site] packing (xz -9, a few minutes)"
tar -C "$work/site" -cf - . | xz -9 -T2 > .whl/site.tar.xz.part
mv .whl/site.tar.xz.part .whl/site.tar.xz
archive=$(stat -c %s .whl/site.tar.xz)
printf '{"archive": ".whl/site.tar.xz", "archive_bytes": %d}\n' "$archive" > benchmarks/gpu_site.json
echo "[gpu_site] .whl/site.tar.xz: $((archive >> 20)) MiB (benchmarks/gpu_site.json)"
python3 benchmarks/device_carry.py --carry .whl --summary
