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

Before forcing, the processor notes the token the model would have chosen itself (the greedy
argmax of its own logits) in the request's ``customized_info`` under :data:`OWN_GREEDY`, one per
output position; SGLang returns it as ``meta_info["own_greedy"]``. Forced on a reference output,
the share of positions where it equals the forced token is the teacher-forced agreement: how often
a policy would have written the reference's next token, at every step of the same trace, not only
up to the first divergence.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

__all__ = ["ForceTokens", "OWN_GREEDY"]

OWN_GREEDY = "own_greedy"  # customized_info key: the token the model chose before forcing, per position


def _position(req) -> int:
    """Index in the output of the token this forward samples for ``req``."""
    return req.kv.kv_committed_len - len(req.origin_input_ids)


def _note_own_choice(req, position: int, token: int) -> None:
    """``req.customized_info[OWN_GREEDY][position] = token``; positions not seen stay None."""
    if req.customized_info is None:
        req.customized_info = {}
    chosen = req.customized_info.setdefault(OWN_GREEDY, [])
    chosen.extend([None] * (position + 1 - len(chosen)))
    chosen[position] = token


class ForceTokens(CustomLogitProcessor):
    """Force the token ids in ``custom_params["force_ids"]`` (list[int]), one per output position."""

    def __call__(self, logits: torch.Tensor,
                 custom_param_list: Optional[List[Dict[str, Any]]] = None) -> torch.Tensor:
        own_choices: Optional[List[int]] = None  # the batch's argmax, read once (one host sync)
        for row, params in enumerate(custom_param_list or ()):
            if not params or "force_ids" not in params or params.get("__req__") is None:
                continue
            req = params["__req__"]
            position = _position(req)
            force_ids = params["force_ids"]
            if not 0 <= position < len(force_ids):
                continue
            if own_choices is None:
                own_choices = logits.argmax(dim=-1).tolist()
            _note_own_choice(req, position, own_choices[row])
            logits[row].fill_(float("-inf"))
            logits[row, int(force_ids[position])] = 0.0
        return logits
