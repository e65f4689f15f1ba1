"""CPU backend: SGLang's ``torch_native`` for prefill/extend, ZoomR sparse decode in torch.

This is also the reference the CUDA backend is checked against: the attention kernel is
:func:`zoomr_sglang.algo.torch_attention.gather_decode_attention`, which issues the same SDPA call per
request as ``torch_native`` decode, over the request's working set instead of its whole row, and
returns the softmax denominators the step's mass votes need from the same kernel call.
"""

from __future__ import annotations

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from zoomr_sglang.algo.torch_attention import gather_decode_attention
from zoomr_sglang.attention_backend.controller import ZoomRController
from zoomr_sglang.attention_backend.extend_holes import batch_holes, extend_around_holes


class ZoomRTorchBackend(TorchNativeAttnBackend):
    """Dense ``torch_native`` extend (around inherited holes if any); decode attends each request's
    ZoomR working set only."""

    def __init__(self, model_runner, controller: ZoomRController):
        super().__init__(model_runner)
        self.zoomr = controller
        self.kv_indptr = self.kv_indices = None
        self.extend_holes = None  # per request of the extend batch, when one has holes

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_decode():
            self.kv_indptr, self.kv_indices = self.zoomr.load(forward_batch.batch_size, forward_batch.input_ids)
        else:
            self.extend_holes = batch_holes(self.zoomr, forward_batch)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.extend_holes is None:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        return extend_around_holes(q, layer, forward_batch, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                                   self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                                   self.req_to_token_pool.req_to_token, self.extend_holes)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        query = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out, lse = gather_decode_attention(
            query,
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.kv_indptr,
            self.kv_indices,
            layer.scaling,
        )
        self.zoomr.after_attention(layer.layer_id, query, lse, layer.scaling)
        self.zoomr.check_outputs(layer.layer_id, query, out, layer.scaling)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
