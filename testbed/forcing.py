"""Teacher forcing through SGLang: a custom logit processor that makes a request emit given tokens.

Every policy then decodes the same trace (one reference output), so their working sets and
attention fidelity are compared step for step, not on diverging texts. Use it with an engine
started with ``enable_custom_logit_processor=True``::

    engine.generate(input_ids=[prompt], custom_logit_processor=ForceTokens.to_str(),
                    sampling_params={"temperature": 0, "max_new_tokens": len(ids),
                                     "custom_params": {"force_ids": ids}})

SGLang hands the processor each request's ``custom_params`` plus ``"__req__"`` (a weak proxy of
the scheduler's ``Req``). The output position being sampled is the request's KV length for this
forward (``req.kv.kv_committed_len``, set when the batch was prepared) minus its prompt length.
``len(req.output_ids)`` would be simpler but lags one step under SGLang's overlap scheduler (the
default, also on CPU): the previous step's token is appended only after the next step is launched.
A chunked prefill's earlier chunks give a negative position and are left alone. Every logit but the forced token's becomes -inf, so greedy and sampled decoding
both emit it. Past the end of ``force_ids`` the logits are left alone (free decoding).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

__all__ = ["ForceTokens"]


def _position(req) -> int:
    """Index in the output of the token this forward samples for ``req``."""
    return req.kv.kv_committed_len - len(req.origin_input_ids)


class ForceTokens(CustomLogitProcessor):
    """Force the token ids in ``custom_params["force_ids"]`` (list[int]), one per output position."""

    def __call__(self, logits: torch.Tensor,
                 custom_param_list: Optional[List[Dict[str, Any]]] = None) -> torch.Tensor:
        for row, params in enumerate(custom_param_list or ()):
            if not params or "force_ids" not in params or params.get("__req__") is None:
                continue
            position = _position(params["__req__"])
            force_ids = params["force_ids"]
            if not 0 <= position < len(force_ids):
                continue
            logits[row].fill_(float("-inf"))
            logits[row, int(force_ids[position])] = 0.0
        return logits
