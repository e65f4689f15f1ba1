#!/usr/bin/env python
"""Would the mass vote find the thought a step reads if it scored each summary token? (offline)

    python benchmarks/vote_probe.py --task long --seed 0 --n-problems 6

ZoomR's mass vote estimates the attention a head would give a thought's summary from one index key,
the mean of the summary's keys: ``n * exp(s * q . mean_k)`` (``zoomr_sglang.algo.voting.
attention_mass``). That is exact when a summary's keys are alike (a one-token summary) and, by
Jensen's inequality, misses the peak when they are not. This script runs the task's reasoner
(Hugging Face, dense, teacher-forced) and, at the query that votes before each detail read (the
pointer token, a refresh point in the benchmarks), sums over every (layer, head) the mass each
closed thought's summary gets (a) from its mean key and (b) from its tokens, ``sum_t exp(s * q .
k_t)``, each over the head's dense softmax normalizer, and counts how often the thought holding
the detail comes out on top; and the same for each layer's heads alone (token scores), which is how
``ZOOMR_VOTE_LAYERS`` is chosen for a model: on problems other than those it is evaluated on. The
last stdout line is one JSON object: ``{"task", "detail_reads", "mean_key", "summary_tokens",
"summary_tokens_per_layer"}`` (the counts; the last one a list, one per layer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed import program_trace as pt  # noqa: E402
from testbed.reasoner_model import load_model, load_tokenizer, reasoner_dir  # noqa: E402
from testbed.train_reasoner import Encoded, word_ids  # noqa: E402


def capture_queries_and_keys(model) -> dict:
    """Per layer, the post-RoPE ``q [heads, T, d]`` and ``k [kv_heads, T, d]`` of the last forward."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    captured = {}

    def hook(layer):
        def pre(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            length = hidden.shape[1]
            q = module.q_proj(hidden).view(1, length, heads, dim).transpose(1, 2)
            k = module.k_proj(hidden).view(1, length, kv_heads, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
            captured[layer] = (q[0], k[0].repeat_interleave(heads // kv_heads, 0))
        return pre

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
    return captured


def summary_mass(q, k, position: int, spans, by_tokens: bool) -> torch.Tensor:
    """Mass ``[len(spans)]`` summed over heads that the query at ``position`` gives each summary
    span ``[start, end)``, over the head's dense normalizer; ``by_tokens`` False: from the mean key."""
    query = q[:, position]  # [heads, d]
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = (k[:, : position + 1] @ query[:, :, None])[..., 0] * scale  # [heads, T]
    log_normalizer = torch.logsumexp(logits, -1)
    masses = []
    for start, end in spans:
        if by_tokens:
            mass = torch.exp(logits[:, start:end] - log_normalizer[:, None]).sum(-1)
        else:
            mean_logit = (k[:, start:end].mean(1) * query).sum(-1) * scale
            mass = torch.exp(mean_logit + math.log(end - start) - log_normalizer)
        masses.append(mass.sum())
    return torch.stack(masses)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(pt.TASKS), default="long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-problems", type=int, default=6)
    args = parser.parse_args(argv)
    if args.n_problems < 1:
        parser.error(f"--n-problems={args.n_problems}: must be >= 1")
    torch.set_num_threads(2)
    path = reasoner_dir(args.task)
    model, tokenizer = load_model(path), load_tokenizer(path)
    captured = capture_queries_and_keys(model)
    vocab = tokenizer.get_vocab()
    begin, end = vocab[pt.SUMMARY_BEGIN], vocab[pt.SUMMARY_END]
    found = {"mean_key": 0, "summary_tokens": 0}
    per_layer = [0] * model.config.num_hidden_layers
    reads = 0
    for problem in pt.generate_problems(args.seed, args.n_problems, task=args.task):
        encoded = Encoded(problem, tokenizer, lambda text: word_ids(tokenizer, text))
        summaries, opened = [], None  # (thought, content start, content end)
        for t, token in enumerate(encoded.ids):
            if token == begin:
                opened = t + 1
            elif token == end:
                summaries.append((encoded.step_of[t], opened, t))
        with torch.no_grad():
            model(input_ids=torch.tensor([encoded.ids]))
        for row, needed in encoded.needs:
            pointer = row - 3  # `v5<v2'` then `v2=6 \n v2=6`, whose next token is the detail
            closed = [s for s in summaries if s[2] < pointer]
            if len(closed) < 2:
                continue
            reads += 1
            spans = [(s, e) for _, s, e in closed]
            layer_votes = [summary_mass(q, k, pointer, spans, True) for q, k in captured.values()]
            found["summary_tokens"] += closed[int(sum(layer_votes).argmax())][0] == needed
            found["mean_key"] += closed[int(sum(summary_mass(q, k, pointer, spans, False)
                                                for q, k in captured.values()).argmax())][0] == needed
            for layer, votes in enumerate(layer_votes):
                per_layer[layer] += closed[int(votes.argmax())][0] == needed
    print(f"{args.task}: {reads} detail reads; the needed thought tops the mass vote {found['mean_key']} times "
          f"scored by its summary's mean key, {found['summary_tokens']} times by its summary's tokens;"
          f" by one layer's tokens alone: {per_layer}")
    result = {"task": args.task, "detail_reads": reads, **found, "summary_tokens_per_layer": per_layer}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
