"""Build the ZoomR backend for a ``ModelRunner``: check the model, read the tokenizer, pick the device path."""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from zoomr_sglang.attention_backend.controller import ZoomRController
from zoomr_sglang.attention_backend.host_tier import TP_COPY_POLLS, HostKVTier
from zoomr_sglang.attention_backend.tiering import ThoughtTiering
from zoomr_sglang.config import ZoomRConfig, load_config
from zoomr_sglang.runtime import attach

# Default index size: one entry (as large as one token's K and V in fp32 sums) per 32 pool tokens,
# i.e. about 3% of the KV pool's memory; thoughts are rarely shorter.
TOKENS_PER_INDEX_ENTRY = 32
MIN_INDEX_ENTRIES = 1024
# Requests that can vote in one step (past it, the rest keep their selection until their next
# refresh point). Refresh points come every few tokens, so this serves batches of thousands.
MAX_VOTERS = 512
# Default host tier: room for this many device pools. What a request keeps on the device is 5-20x
# less than its sequence, so at full admission the tier holds several pools' worth of thoughts.
HOST_POOL_PER_DEVICE_POOL = 8


def index_bytes_per_pool_token(num_layers: int, num_kv_heads: int, head_dim: int) -> float:
    """Device bytes of the default index store per KV-pool token: one entry (fp32 key sums and a
    count per layer) per ``TOKENS_PER_INDEX_ENTRY`` pool tokens. SGLang adds this to its per-token
    cost before it sizes the pool, so pool and index together stay within --mem-fraction-static."""
    return num_layers * (num_kv_heads * head_dim + 1) * 4 / TOKENS_PER_INDEX_ENTRY


def create_zoomr_backend(model_runner):
    """The backend SGLang builds for ``--attention-backend zoomr`` (through ``plugin.py``, which
    first checks that every hook applied)."""
    config = load_config()
    check_model_supported(model_runner)
    token_texts = load_token_texts(model_runner, config)
    model_config = model_runner.model_config
    from sglang.srt.runtime_context import get_parallel

    attn_tp_size = get_parallel().attn_tp_size
    num_kv_heads = model_config.get_num_kv_heads(attn_tp_size)
    pool_tokens = model_runner.token_to_kv_pool_allocator.size
    controller = ZoomRController(
        config=config,
        token_texts=token_texts,
        req_to_token_pool=model_runner.req_to_token_pool,
        token_to_kv_pool=model_runner.token_to_kv_pool,
        num_layers=model_config.num_hidden_layers,
        num_heads=model_config.get_max_num_attention_heads() // attn_tp_size,
        num_kv_heads=num_kv_heads,
        head_dim=model_config.head_dim,
        device=model_runner.device,
        index_capacity=config.index_entries or max(MIN_INDEX_ENTRIES, pool_tokens // TOKENS_PER_INDEX_ENTRY),
        max_voters=min(model_runner.req_to_token_pool.size, MAX_VOTERS),
        allocator=model_runner.token_to_kv_pool_allocator,
        page_size=model_runner.page_size,
        tiering=build_tiering(model_runner, config, num_kv_heads, attn_tp_size),
    )
    from sglang.srt.arg_groups.overrides import attention_backends_of

    prefill_backend, _ = attention_backends_of(model_runner.server_args)
    controller.prefill_handles_holes = prefill_backend == "zoomr"
    if str(model_runner.device).startswith("cuda"):
        from zoomr_sglang.attention_backend.flashinfer_backend import ZoomRFlashInferBackend as backend_class
    else:
        from zoomr_sglang.attention_backend.torch_backend import ZoomRTorchBackend as backend_class
    backend = backend_class(model_runner, controller)
    # Whenever this factory runs, zoomr decodes from this pool (the plug-in refuses zoomr for
    # prefill alone); the hooks, the radix tree and the metrics find the controller from the pool.
    attach(model_runner.req_to_token_pool, controller)
    return backend


def build_tiering(model_runner, config: ZoomRConfig, num_kv_heads: int, attn_tp_size: int) -> Optional[ThoughtTiering]:
    """The host tier for cold thoughts, sized by ``ZOOMR_HOST_POOL_GB`` per rank (default: room for
    ``HOST_POOL_PER_DEVICE_POOL`` device pools, at most a quarter of the machine's memory over all
    its ranks), or None when it is 0. With attention TP > 1 every rank holds its heads' part of the
    same thoughts, and a copy is done at a poll every rank agrees on (``TP_COPY_POLLS``)."""
    if config.host_pool_gb == 0:
        return None
    model_config = model_runner.model_config
    allocator = model_runner.token_to_kv_pool_allocator
    bytes_per_token = HostKVTier.bytes_per_token(
        model_config.num_hidden_layers, num_kv_heads, model_config.head_dim, model_config.v_head_dim,
        model_runner.kv_cache_dtype,
    )
    if config.host_pool_gb is None:
        # Never more than a quarter of the machine's memory (pinned on CUDA), shared by the servers
        # of every GPU the process sees (on CPU: by the ranks, which all run on this machine).
        servers = torch.cuda.device_count() if str(model_runner.device).startswith("cuda") else attn_tp_size
        ram_tokens = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // max(servers, 1) // bytes_per_token
        capacity = min(HOST_POOL_PER_DEVICE_POOL * allocator.size, ram_tokens)
    else:
        capacity = int(config.host_pool_gb * (1 << 30)) // bytes_per_token
    host_tier = HostKVTier(
        num_layers=model_config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=model_config.head_dim,
        v_head_dim=model_config.v_head_dim, dtype=model_runner.kv_cache_dtype, capacity_tokens=capacity,
        pin_memory=str(model_runner.device).startswith("cuda"), agreed_polls=TP_COPY_POLLS if attn_tp_size > 1 else 0,
    )
    return ThoughtTiering(
        config=config, host_tier=host_tier, allocator=allocator, req_to_token_pool=model_runner.req_to_token_pool,
        kv_pool=model_runner.token_to_kv_pool, page_size=model_runner.page_size,
    )


def check_model_supported(model_runner) -> None:
    """Refuse models whose attention ZoomR's decode would compute wrongly."""
    model_config = model_runner.model_config
    problems = []
    if model_runner.use_mla_backend:
        problems.append("MLA attention (ZoomR indexes per-KV-head keys; use an MHA/GQA model)")
    if model_runner.sliding_window_size not in (None, -1, 0):
        problems.append(f"sliding-window attention (window {model_runner.sliding_window_size})")
    if model_config.is_encoder_decoder:
        problems.append("cross attention (encoder-decoder model)")
    if model_runner.is_draft_worker:
        problems.append("a speculative-decoding draft model")
    if model_runner.kv_cache_dtype != model_runner.dtype:
        problems.append(
            f"a KV cache dtype {model_runner.kv_cache_dtype} different from the model dtype "
            f"{model_runner.dtype} (drop --kv-cache-dtype)"
        )
    if problems:
        raise ValueError(
            f"--attention-backend zoomr cannot serve {model_config.model_path}: "
            + "; ".join(problems) + ". Choose another --attention-backend for this model."
        )


def load_token_texts(model_runner, config: ZoomRConfig) -> List[str]:
    """Each token id's decoded text, so that markers are found in text, whatever the tokenization.

    Also checks that the tokenizer can write every configured marker: the texts of the tokens it
    encodes the marker into, joined, must contain the marker (that is what segmentation sees).
    """
    from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer

    server_args = model_runner.server_args
    tokenizer = get_tokenizer(
        server_args.tokenizer_path or server_args.model_path,
        tokenizer_mode=server_args.tokenizer_mode,
        trust_remote_code=server_args.trust_remote_code,
    )
    vocab_size = max(len(tokenizer), model_runner.model_config.vocab_size)
    texts = [tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(vocab_size)]
    for variable, markers in config.markers().items():
        for marker in markers:
            ids = tokenizer.encode(marker, add_special_tokens=False)
            if marker not in "".join(texts[i] for i in ids):
                raise ValueError(
                    f"{variable}: the tokenizer of {server_args.model_path} cannot encode {marker!r} "
                    f"(it becomes tokens {ids}); allowed: strings this tokenizer round-trips"
                )
    return texts

