"""CUDA backend: SGLang's FlashInfer backend for prefill/extend, ZoomR sparse decode through
FlashInfer's paged decode, with decode CUDA graphs.

SGLang's MHA FlashInfer path is token-granular (page size 1 in the plan for any ``--page-size``),
so a request's working set is handed to the decode wrapper as a sparse list of KV slots:
``kv_indptr`` from the per-request working-set sizes (known on the host, so FlashInfer plans
without a sync), ``kv_indices`` the slots. Keys are cached post-RoPE, so order and gaps do not
matter to the kernel.

CUDA graphs follow SGLang's own FlashInfer contract: capture builds fixed-size wrappers per batch
size; before each replay, :meth:`init_forward_metadata_out_graph` writes the step's ``kv_indptr`` and
``kv_indices`` into their fixed buffers and re-plans on the host (``fast_decode_plan``). What the
layers do besides attention (index keys, votes) works on fixed-size buffers and is captured with them.
"""

from __future__ import annotations

import math
from functools import partial

from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata, FlashInferAttnBackend, fast_decode_plan
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from zoomr_sglang.attention_backend.controller import ZoomRController
from zoomr_sglang.attention_backend.extend_holes import batch_holes, extend_around_holes

# FlashInfer returns the log-sum-exp of the scaled logits in base 2; the votes use natural logs.
LN2 = math.log(2.0)


class ZoomRFlashInferBackend(FlashInferAttnBackend):
    """Dense FlashInfer extend; decode planned over each request's ZoomR working set."""

    def __init__(self, model_runner, controller: ZoomRController):
        super().__init__(model_runner)
        self.zoomr = controller
        self.extend_holes = None  # per request of the extend batch, when one has holes

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.extend_holes is None:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc.for_layer(forward_batch, layer, swa_loc=None), k, v, *self._kv_write_scales(layer)
            )
        return extend_around_holes(q.contiguous(), layer, forward_batch,
                                   self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                                   self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                                   self.req_to_token_pool.req_to_token, self.extend_holes)

    def init_forward_metadata(self, forward_batch):
        if not forward_batch.forward_mode.is_decode():
            self.extend_holes = batch_holes(self.zoomr, forward_batch)
            return super().init_forward_metadata(forward_batch)
        bs = forward_batch.batch_size
        kv_indptr, kv_indices = self.zoomr.load(bs, forward_batch.input_ids)
        self._plan(self.decode_wrappers[0], kv_indptr, kv_indices, bs)
        self.forward_metadata = DecodeMetadata(self.decode_wrappers)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if not forward_batch.forward_mode.is_decode():
            return super().init_forward_metadata_out_graph(forward_batch, in_capture)
        bs = forward_batch.batch_size
        if in_capture:
            self._prepare_cuda_graph_metadata(bs, forward_batch.positions.numel(), forward_batch.forward_mode, None)
            self.zoomr.plan_capture(bs)
        wrappers = self.decode_cuda_graph_metadata[bs]
        raw_bs = 0 if in_capture else bs - forward_batch.num_padding
        kv_indptr, kv_indices = self.zoomr.load(raw_bs, forward_batch.input_ids, padded_bs=bs,
                                                kv_indices_out=wrappers[0]._paged_kv_indices_buf)
        self._plan(wrappers[0], kv_indptr, kv_indices, bs)
        if in_capture:  # as SGLang does: replays re-plan on the host only, after this first full plan
            wrappers[0].begin_forward = partial(fast_decode_plan, wrappers[0])
        self.forward_metadata = DecodeMetadata(wrappers)

    def _plan(self, wrapper, kv_indptr, kv_indices, bs: int) -> None:
        """Plan ``wrapper`` for ``bs`` requests from the host ``kv_indptr`` (no device read)."""
        updater = self.indices_updater_decode
        args = (kv_indices, self.kv_last_page_len[:bs], updater.num_qo_heads, updater.num_kv_heads,
                updater.head_dim, 1)
        kwargs = dict(data_type=updater.data_type, q_data_type=updater.q_data_type, non_blocking=True)
        if getattr(wrapper.begin_forward, "func", None) is fast_decode_plan:
            # The replay planner reads indptr from its fixed buffer and plans from the host copy.
            device_indptr = self.kv_indptr[0][: bs + 1]
            device_indptr.copy_(kv_indptr.pin_memory(), non_blocking=True)
            wrapper.begin_forward(device_indptr, *args, **kwargs, global_override_indptr_cpu=kv_indptr)
        else:
            wrapper.begin_forward(kv_indptr, *args, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc.for_layer(forward_batch, layer, swa_loc=None), k, v, *self._kv_write_scales(layer)
            )
        query = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        wrapper = self.forward_metadata.decode_wrappers[0]
        out, lse = wrapper.forward_return_lse(
            query, self.token_to_kv_pool.get_kv_buffer(layer.layer_id), sm_scale=layer.scaling,
            logits_soft_cap=layer.logit_cap, k_scale=layer.k_scale_float, v_scale=layer.v_scale_float,
        )
        self.zoomr.after_attention(layer.layer_id, query, lse * LN2, layer.scaling)
        self.zoomr.check_outputs(layer.layer_id, query, out, layer.scaling)
        return out.view(-1, layer.tp_q_head_num * layer.head_dim)
