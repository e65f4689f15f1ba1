"""CUDA backend: SGLang's FlashInfer backend for prefill/extend, ZoomR sparse decode through
FlashInfer's paged decode.

SGLang's MHA FlashInfer path is token-granular (page size 1 in the plan for any ``--page-size``),
so a request's working set is handed to the decode wrapper directly as a sparse list of KV
slots: ``kv_indptr`` from the per-request working-set sizes, ``kv_indices`` the slots in position
order. Keys are cached post-RoPE, so the order and gaps do not matter to the kernel.
Decode CUDA graphs are disabled by the plug-in's resolution hook for now.
"""

from __future__ import annotations

from typing import Optional

from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata, FlashInferAttnBackend

from zoomr_sglang.attention_backend.controller import DecodePlan, ZoomRController


class ZoomRFlashInferBackend(FlashInferAttnBackend):
    """Dense FlashInfer extend; decode planned over each request's ZoomR working set."""

    def __init__(self, model_runner, controller: ZoomRController):
        super().__init__(model_runner)
        self.zoomr = controller
        self.decode_plan: Optional[DecodePlan] = None

    def init_forward_metadata(self, forward_batch):
        if not forward_batch.forward_mode.is_decode():
            self.decode_plan = None
            return super().init_forward_metadata(forward_batch)
        plan = self.zoomr.plan_decode(forward_batch)
        updater = self.indices_updater_decode
        bs = forward_batch.batch_size
        self.decode_wrappers[0].begin_forward(
            plan.kv_indptr,
            plan.kv_indices,
            self.kv_last_page_len[:bs],
            updater.num_qo_heads,
            updater.num_kv_heads,
            updater.head_dim,
            1,
            data_type=updater.data_type,
            q_data_type=updater.q_data_type,
            non_blocking=True,
        )
        self.decode_plan = plan
        self.forward_metadata = DecodeMetadata(self.decode_wrappers)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        query = q.reshape(-1, layer.tp_q_head_num, layer.head_dim)
        self.zoomr.after_attention(layer.layer_id, query, self.decode_plan, layer.scaling)
        self.zoomr.check_outputs(layer.layer_id, query, out.view(query.shape[0], layer.tp_q_head_num, -1),
                              layer.scaling, self.decode_plan)
        return out
