"""Train the tiny reasoner that writes ZoomR-format program traces (thoughts + summaries), on CPU.

    python testbed/train_reasoner.py --seed 0                    # the short task: testbed/reasoner

The long task's reasoner (``testbed/reasoner_long``) starts from the short task's (same words, same
first two lines of a thought; the work-line labels get new embedding rows) and is trained on long
problems in three runs, each starting from the one before (``LONG_RUNS``: all sizes, then only
large ones, then with the decision after each summary weighted)::

    python testbed/train_reasoner.py --seed 0 --task long   # runs LONG_RUNS, writes testbed/reasoner_long

(``--task long --init-from DIR`` is one run from DIR with the arguments given.)

Builds a word-level tokenizer for the task of ``testbed.program_trace`` and a small
``LlamaForCausalLM`` (hidden 128, 4 layers, 4 query / 2 KV heads of 32, tied embeddings, about 1.2M
parameters), trains it on freshly generated problems (loss on the reasoning and answer only; a
length curriculum: small problems first, then sizes up to ``--n-steps-max``, short ones always
mixed in; batches of similar lengths) and saves both with ``save_pretrained`` (fp32 safetensors +
tokenizer files), so SGLang serves the folder as is. It then measures, on held-out problems of the
benchmark's default sizes (``program_trace.DEFAULT_N_STEPS``), and writes to ``training.json``
beside the weights:

- ``hf_full_accuracy``: greedy answer accuracy with full attention (HF ``generate``);
- ``masked_oracle_accuracy``: greedy accuracy when every generated token may attend only to the
  prompt, every closed thought's summary, the open thought, the last ``--window`` (64) tokens and
  the thoughts ``Problem.dependencies[c]`` of the thought c being written (an oracle zoom-in);
- ``masked_random_accuracy``: the same with as many thoughts drawn at random (a floor), and
  ``masked_summary_only_accuracy`` with none (SumR).

``--eval-only`` re-measures an existing checkpoint (``--out``) and updates its training.json.

Everything is a function of the arguments: the data stream and the initialisation come from
``--seed``, the learning-rate schedule from ``--steps``. ``--minutes`` only caps the wall time
(on a shared or slower machine training then stops early, with a warning in training.json).

Thought hiding (policy-agnostic): a model trained only with dense attention breaks when earlier
thoughts are missing, which every sparse policy causes. In ``--hide-fraction`` of the training
sequences, the tokens of each step (its thought and summary) cannot see the bodies of a random
subset of earlier thoughts, each hidden with one probability drawn per sequence, except a random
recent window of keys, and except that the one token whose next token is a detail read from
thought j (``v2=6`` -> ``v2'=3``) always sees thought j. Hidden thoughts are random, never chosen
by any selection policy, and summaries and the prompt always stay visible. It is a 4-D float attention mask ``[batch, 1, q, k]`` (0 or the dtype's minimum),
which transformers passes to the attention unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import List, Sequence

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# training 20x slower whenever another process was busy. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed import program_trace as pt  # noqa: E402
from testbed.reasoner_model import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, reasoner_dir  # noqa: E402

SPECIAL = list(SPECIAL_TOKENS)  # ids 0..3, the Llama convention for unk/bos/eos


# --- tokenizer ------------------------------------------------------------------------------------
def build_tokenizer(task: str = "short"):
    """Word-level tokenizer over the task's vocabulary (the ``long`` task's adds the work-line
    labels after the ``short`` task's words): words split on single spaces, ``"\\n\\n"``
    and ``"\\n"`` are tokens of their own, the summary markers are ordinary tokens, BOS is
    prepended. Decoding joins tokens with spaces, which is the task's canonical text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = pt.vocabulary(task=task)
    vocab = {word: i for i, word in enumerate(SPECIAL + words)}
    assert len(vocab) == len(SPECIAL) + len(words), "duplicate words"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n\n|\n"), behavior="isolated"),
        pre_tokenizers.Split(" ", behavior="removed"),
    ])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )


def word_ids(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- data -----------------------------------------------------------------------------------------
class Encoded:
    """One problem as token ids plus what the hiding mask needs.

    step_of[t]: the thought whose region holds token t (-1 in the prompt); thought i's region is
    its body, its summary and, for i > 0, the blank line before its body (ZoomR's segmentation).
    body_of[t]: j if token t is in thought j's body (blank lines included, summary excluded), else -1.
    needs: (t, j) for every token t whose next token is step j's intermediate, read from j's
    thought (the recalled result in a detail lookup ``v2=6 v2'=3``): the only rows that need a
    thought body that no summary replaces.
    """

    def __init__(self, problem: pt.Problem, tokenizer, ids_of):
        boundary = ids_of(pt.BOUNDARY)
        ids = [tokenizer.bos_token_id] + ids_of(problem.prompt)
        self.prompt_len = len(ids)
        step_of = [-1] * len(ids)
        body_of = [-1] * len(ids)
        kind = ["prompt"] * len(ids)
        needs = []
        lead: List[int] = []  # the blank line after the previous summary: opens the next thought
        for i, (thought, summary) in enumerate(zip(problem.thoughts, problem.summaries)):
            body = lead + ids_of(thought) + boundary
            for offset, line in thought_needs(thought, problem.steps[i]):
                needs.append((len(ids) + len(lead) + offset, line))
            ids += body
            step_of += [i] * len(body)
            body_of += [i] * len(body)
            # After a summary the next word decides: the next step (its first word) or the answer.
            opening = ["decision"] if lead else []
            kind += ["format"] * len(lead) + opening + thought_kinds(thought)[len(opening):] + ["format"]
            summ = ids_of(summary)
            ids += summ
            step_of += [i] * len(summ)
            body_of += [-1] * len(summ)
            kind += ["summary"] * len(summ)
            lead = boundary
        n = problem.n_steps
        tail = lead + ids_of(problem.answer_line) + [tokenizer.eos_token_id]
        ids += tail
        step_of += [n] * len(tail)
        body_of += [n] * len(tail)
        kind += ["format"] * len(lead) + ["decision"] + ["format"] * (len(tail) - len(lead) - 3) + ["answer", "format"]
        assert len(kind) == len(ids)
        self.ids = ids
        self.kind = kind
        self.step_of = step_of
        self.body_of = body_of
        self.n_thoughts = n + 1
        self.needs = needs


KINDS = ("fact", "recall", "detail", "copy", "compute", "summary", "answer", "decision", "format")


def thought_kinds(thought: str) -> List[str]:
    """A diagnostic label per token of a thought body (for the per-kind training loss): fact (the
    step's input and pointer, looked up in the prompt), recall (a result, looked up), detail (an
    intermediate, looked up in its thought), compute (a computed value), copy (values copied from
    lines above), format (everything else). Lines: previous result + step name + input + pointer +
    source result, source result (+ intermediate), the arithmetic lines (8, or a long thought's
    labelled work lines), result, intermediate."""
    kinds: List[str] = []
    lines = thought.split(f" {pt.LINE} ")
    for n, line in enumerate(lines):
        words = line.split(" ")
        if n == 0:
            line_kinds = ["recall", "format", "fact", "fact", "recall"]
        elif n == 1:
            line_kinds = ["copy", "detail"][: len(words)]
        elif n < len(lines) - 2:
            line_kinds = ["copy" if w in pt.VALUES else "format" for w in words]
            line_kinds[-1] = "compute"
        else:
            line_kinds = ["copy"]
        assert len(line_kinds) == len(words), (n, line)
        kinds += ([] if n == 0 else ["format"]) + line_kinds
    return kinds


def thought_needs(thought: str, step: pt.Step) -> List[tuple]:
    """(token offset in the thought, thought index j) of a detail read's recalled-result token:
    its next token is an intermediate that only thought j holds."""
    offset = 0
    for n, line in enumerate(thought.split(f" {pt.LINE} ")):
        words = line.split(" ")
        if n == 1 and len(words) == 2:
            assert step.detail and words[1] == pt.value_word(step.source_step, step.source, True)
            return [(offset, step.source_step - 1)]
        offset += len(words) + 1  # the line break
    return []


def make_mask(batch: Sequence[Encoded], length: int, rng: random.Random, hide_fraction: float,
              dtype=torch.float32) -> torch.Tensor:
    """``[B, 1, T, T]`` additive mask: causal, plus random hidden thought bodies (see module doc)."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    causal = k <= q
    masks = []
    for enc in batch:
        allowed = causal.clone()
        if rng.random() < hide_fraction:
            n = enc.n_thoughts
            p = rng.uniform(0.3, 1.0)
            window = rng.choice([0, 8, 32, 64, 128])
            gen = torch.Generator().manual_seed(rng.randrange(2**31))
            hidden = torch.rand(n, n, generator=gen) < p  # [step i, thought j]
            hidden &= torch.arange(n)[None, :] < torch.arange(n)[:, None]  # only earlier thoughts
            pad = length - len(enc.ids)
            step_of = torch.tensor(enc.step_of + [-1] * pad)
            body_of = torch.tensor(enc.body_of + [-1] * pad)
            # Append a row for the prompt (step -1) and a column for "no body" (-1): never hidden.
            table = torch.zeros(n + 1, n + 1, dtype=torch.bool)
            table[:n, :n] = hidden
            hide = table[step_of][:, body_of]  # [T, T]
            for row, j in enc.needs:  # the detail a step really reads stays visible where read
                hide[row] &= body_of != j
            allowed &= ~hide | (q - k < window)
        masks.append(allowed)
    allowed = torch.stack(masks)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def sample_batch(rng: random.Random, args, tokenizer, ids_of, counter: List[int], n_steps_max: int,
                 hide_fraction: float):
    """Problems of similar size (little padding): a size is drawn per batch, from the upper half
    of ``[n_steps_min, n_steps_max]`` with probability ``--long-fraction``; the batch holds
    about ``--batch-tokens`` tokens."""
    mid = (args.n_steps_min + n_steps_max) // 2
    if rng.random() < args.long_fraction:
        top = rng.randint(mid, n_steps_max)
    else:
        top = rng.randint(args.n_steps_min, mid)
    sizes = (max(args.n_steps_min, top - 3), top)
    shape = pt.TASKS[args.task]
    # Tokens per step; the short task's underestimate is the one its checkpoint was trained with
    # (kept so that its seed still reproduces it).
    per_step = 8 * shape.work_lines + 16 if shape.work_lines else 50
    est = per_step * top + 20
    batch = []
    for _ in range(max(1, args.batch_tokens // est)):
        problem = pt.generate_problem(random.Random(f"train_reasoner:{args.seed}:{counter[0]}"), n_steps=sizes,
                                      p_detail=args.p_detail, shape=shape)
        counter[0] += 1
        batch.append(Encoded(problem, tokenizer, ids_of))
    length = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for b, enc in enumerate(batch):
        input_ids[b, : len(enc.ids)] = torch.tensor(enc.ids)
        labels[b, enc.prompt_len: len(enc.ids)] = torch.tensor(enc.ids[enc.prompt_len:])
    kinds = torch.full((len(batch), length), -1, dtype=torch.long)
    for b, enc in enumerate(batch):
        kinds[b, : len(enc.ids)] = torch.tensor([KINDS.index(k) if k in KINDS else -1 for k in enc.kind])
    mask = make_mask(batch, length, rng, hide_fraction)
    return input_ids, labels, mask, kinds


# --- model ----------------------------------------------------------------------------------------
def token_factors(tokenizer) -> torch.Tensor:
    """``[vocab, n_factors]`` 0/1: the parts each task word is made of: the step it is about
    (``v5`` in ``v5=7``, ``v5#7``, ``v5<v2'``), the step it points to (``v2`` in ``v5<v2'``), its
    value, and its kind. See :class:`Factored`."""
    n_names = pt.MAX_STEPS + 1
    kinds = ["V", "name", "main", "detail", "input", "pointer", "pointer'"]
    owner0, target0, value0 = 0, n_names, 2 * n_names
    kind0 = value0 + pt.MODULUS
    factors = torch.zeros(len(tokenizer), kind0 + len(kinds))
    pattern = re.compile(r"^v(\d+)(?:(=)(\d)|('=)(\d)|(#)(\d)|(<)v(\d+)('?))?$")
    for word, tid in tokenizer.get_vocab().items():
        if word in pt.VALUES:
            factors[tid, value0 + int(word[1:])] = 1
            factors[tid, kind0 + kinds.index("V")] = 1
            continue
        match = pattern.match(word)
        if not match:
            continue
        factors[tid, owner0 + int(match.group(1))] = 1
        if match.group(2):
            kind, value = "main", match.group(3)
        elif match.group(4):
            kind, value = "detail", match.group(5)
        elif match.group(6):
            kind, value = "input", match.group(7)
        elif match.group(8):
            kind, value = ("pointer'" if match.group(10) else "pointer"), None
            factors[tid, target0 + int(match.group(9))] = 1
        else:
            kind, value = "name", None
        if value is not None:
            factors[tid, value0 + int(value)] = 1
        factors[tid, kind0 + kinds.index(kind)] = 1
    return factors


class Factored(torch.nn.Module):
    """Weight parametrization ``W + F @ A`` for the input and output embeddings during training.

    A token such as ``v5<v2'`` is rare, but its parts are not: sharing ``A`` (one vector per step
    name, pointed-to name, value and kind) lets all ~2900 word embeddings learn from every
    occurrence of their parts. ``remove_parametrizations(..., leave_parametrized=True)`` bakes the sum into a
    plain weight before saving, so the checkpoint is an ordinary LlamaForCausalLM."""

    def __init__(self, factors: torch.Tensor, hidden: int, std: float):
        super().__init__()
        self.register_buffer("factors", factors, persistent=False)
        self.parts = torch.nn.Parameter(torch.randn(factors.shape[1], hidden) * std)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.factors @ self.parts


def factorize_embeddings(model, factors: torch.Tensor, std: float) -> None:
    """Parametrize the (tied) word embeddings as ``W + F @ A``."""
    from torch.nn.utils import parametrize

    shared = Factored(factors, model.config.hidden_size, std)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        parametrize.register_parametrization(module, "weight", shared)


def bake_embeddings(model) -> None:
    from torch.nn.utils import parametrize

    embeddings = model.get_input_embeddings()
    if not parametrize.is_parametrized(embeddings, "weight"):
        return
    with torch.no_grad():
        baked = embeddings.weight.detach().clone()  # W + F @ A
    for module in (embeddings, model.get_output_embeddings()):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    embeddings.weight = torch.nn.Parameter(baked)
    model.get_output_embeddings().weight = embeddings.weight  # tied again


def build_model(tokenizer, seed: int, init_std: float = 0.06, rope_theta: float = 1e12):
    """The usual std 0.02 left training at the bigram loss (about 1.6) for 600+ steps; 0.06 learns
    the copy and lookup circuits within about 200 steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rope_theta=rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def start_from(path: Path, tokenizer):
    """The checkpoint in ``path``, in training mode, its embeddings grown to ``tokenizer``: the
    long task's words are the short task's words (same ids) followed by the work-line labels,
    whose new rows start at the mean embedding."""
    from testbed.reasoner_model import load_model, load_tokenizer

    old = load_tokenizer(path).get_vocab()
    new = tokenizer.get_vocab()
    if any(new.get(word) != i for word, i in old.items()):
        raise ValueError(f"--init-from {path}: its tokenizer's ids are not a prefix of the {len(new)}-word one")
    model = load_model(path)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model.train()


@torch.no_grad()
def evaluate(model, tokenizer, problems: Sequence[pt.Problem], batch_size: int = 8):
    """Greedy answer accuracy with full attention (HF ``generate``, KV cache, left-padded batches),
    and the average number of generated tokens (EOS included)."""
    model.eval()
    tokenizer.padding_side = "left"
    correct, out_tokens = 0, []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
        longest = max(len(word_ids(tokenizer, p.target)) for p in chunk)
        out = model.generate(**enc, do_sample=False, max_new_tokens=longest + 32,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            out_tokens.append(len(row))
            correct += pt.score(p, tokenizer.decode(row, skip_special_tokens=True))
    tokenizer.padding_side = "right"
    return correct / len(problems), sum(out_tokens) / len(out_tokens)


MASK_MODES = ("oracle", "random", "summary_only")


@torch.no_grad()
def masked_generate(model, tokenizer, problem: pt.Problem, mode: str, window: int = 64,
                    rng: random.Random = None, max_new_tokens: int = None) -> List[int]:
    """Greedy generation (KV cache) in which each new token attends only to a ZoomR working set:
    the prompt (BOS included), every closed thought's summary (markers included), the open
    thought, the last ``window`` positions, and the zoomed-in thoughts' full spans.

    Thoughts are cut by ZoomR's own :class:`ThoughtSegmenter` as the tokens are generated. While
    the model writes thought ``c`` (the segmenter's open thought, or the next one right after a
    summary closed), the zoomed-in set is ``problem.dependencies[c]`` (mode ``oracle``), as many
    thoughts drawn at random from the closed ones (``random``: a policy-agnostic floor), or none
    (``summary_only``). Each token's KV is computed under the mask of its own step, as in a
    sparse decode."""
    from zoomr_sglang.algo.segmentation import ThoughtSegmenter

    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    rng = rng or random.Random(0)
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    prompt = tokenizer(problem.prompt)["input_ids"]
    n_prompt = len(prompt)
    seg = ThoughtSegmenter(texts, boundaries=[pt.BOUNDARY], summary_begin=pt.SUMMARY_BEGIN,
                           summary_end=pt.SUMMARY_END, sentence_ends=[pt.LINE], max_thought_tokens=512,
                           first_position=n_prompt)
    if max_new_tokens is None:
        max_new_tokens = len(word_ids(tokenizer, problem.target)) + 32
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1]
    generated: List[int] = []
    chosen = {}
    minimum = torch.finfo(torch.float32).min
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        generated.append(token)
        if token == tokenizer.eos_token_id:
            break
        position = n_prompt + step
        seg.feed(token, position)
        last = seg.thoughts[-1] if seg.thoughts else None
        current = last.index if last is not None and not last.final else len(seg.thoughts)
        if current not in chosen:
            deps = problem.dependencies[current] if current < len(problem.dependencies) else []
            closed = [t.index for t in seg.thoughts if t.final]
            if mode == "oracle":
                chosen[current] = list(deps)
            elif mode == "random":
                chosen[current] = rng.sample(closed, min(len(deps), len(closed)))
            else:
                chosen[current] = []
        length = position + 1
        allowed = torch.zeros(length, dtype=torch.bool)
        allowed[:n_prompt] = True
        allowed[max(0, length - window):] = True
        allowed[seg.open_from():] = True
        for t in seg.thoughts:
            if not t.final:
                continue
            if t.index in chosen[current]:
                allowed[t.start: t.span_end()] = True
            elif t.summary_start is not None:
                allowed[t.summary_start: t.summary_end] = True
        mask = torch.zeros(1, 1, 1, length).masked_fill_(~allowed, minimum)
        out = model(input_ids=torch.tensor([[token]]), attention_mask=mask, past_key_values=cache,
                    use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
    return generated


def masked_accuracy(model, tokenizer, problems: Sequence[pt.Problem], mode: str, window: int = 64,
                    seed: int = 0) -> float:
    """Answer accuracy of :func:`masked_generate` over ``problems``."""
    model.eval()
    rng = random.Random(f"masked_eval:{mode}:{seed}")
    correct = 0
    for p in problems:
        ids = masked_generate(model, tokenizer, p, mode, window, rng)
        correct += pt.score(p, tokenizer.decode(ids, skip_special_tokens=True))
    return correct / len(problems)


def run_evaluations(model, tokenizer, args) -> dict:
    """The accuracies recorded in training.json (see the module doc)."""
    if not args.eval_problems:
        return {}
    sizes = tuple(args.eval_n_steps)
    problems = pt.generate_problems(args.eval_seed, args.eval_problems, n_steps=sizes, p_detail=args.p_detail,
                                    task=args.task)
    t0 = time.time()
    accuracy, avg_tokens = evaluate(model, tokenizer, problems)
    prompt_tokens = sum(len(tokenizer(p.prompt)["input_ids"]) for p in problems) / len(problems)
    result = {
        "eval_seed": args.eval_seed, "eval_n_steps": list(sizes), "eval_p_detail": args.p_detail,
        "eval_problems": len(problems), "hf_full_accuracy": accuracy,
        "eval_avg_output_tokens": round(avg_tokens, 1), "eval_avg_prompt_tokens": round(prompt_tokens, 1),
    }
    print(f"HF greedy, full attention: accuracy {accuracy:.3f} on {len(problems)} held-out problems "
          f"(n_steps {sizes}), {avg_tokens:.0f} output tokens on average ({time.time() - t0:.0f}s)", flush=True)
    if args.masked_problems:
        subset = problems[: args.masked_problems]
        result.update(masked_problems=len(subset), masked_window=args.window)
        for mode in MASK_MODES:
            t1 = time.time()
            acc = masked_accuracy(model, tokenizer, subset, mode, args.window, args.eval_seed)
            result[f"masked_{mode}_accuracy"] = acc
            print(f"masked greedy ({mode}: prompt + summaries + window {args.window} + zoomed thoughts): "
                  f"accuracy {acc:.3f} on {len(subset)} problems ({time.time() - t1:.0f}s)", flush=True)
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


# The long task's runs, in order (see the module doc): all sizes with the short task's schedule;
# then only 8-16 steps, mostly large, hiding from the start; then 10-16 steps with the word after
# each summary (the next step, or the answer) weighted 20x, the error left after the second run.
_LARGE = ["--batch-tokens", "3500", "--long-fraction", "0.9", "--curriculum-start", "16", "--curriculum-hold", "0",
          "--hide-after", "0"]
LONG_RUNS = (
    ["--steps", "2400", "--batch-tokens", "3500", "--lr", "1.5e-3", "--minutes", "38"],
    ["--steps", "1200", "--lr", "7e-4", "--n-steps-min", "8", "--minutes", "20", *_LARGE],
    ["--steps", "1000", "--lr", "5e-4", "--n-steps-min", "10", "--decision-weight", "20", "--minutes", "16", *_LARGE],
)


def train_long(args) -> dict:
    """The long task's reasoner: :data:`LONG_RUNS` one after the other, the first from the short
    task's checkpoint, the last written to ``--out`` and evaluated (the others go to a temporary
    folder; each run's training.json nests the one it started from)."""
    import tempfile

    previous = reasoner_dir("short")
    with tempfile.TemporaryDirectory() as scratch:
        for i, run in enumerate(LONG_RUNS):
            last = i == len(LONG_RUNS) - 1
            out = args.out if last else Path(scratch) / str(i + 1)
            report = main(["--seed", str(args.seed), "--threads", str(args.threads), "--task", "long",
                           "--init-from", str(previous), "--out", str(out), *run,
                           *([] if last else ["--eval-problems", "0"])])
            previous = out
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=tuple(pt.TASKS), default="short",
                        help="the text's proportions (program_trace.TASKS)")
    parser.add_argument("--out", type=Path, default=None, help="default: the task's committed checkpoint folder")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint (a short-task reasoner) instead of a fresh model")
    parser.add_argument("--steps", type=int, default=2100, help="optimizer steps (sets the LR schedule)")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-time cap for training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-tokens", type=int, default=2000)
    parser.add_argument("--n-steps-min", type=int, default=1)
    parser.add_argument("--n-steps-max", type=int, default=None, help="default: the task's largest size")
    parser.add_argument("--p-detail", type=float, default=0.6)
    parser.add_argument("--long-fraction", type=float, default=0.5)
    parser.add_argument("--hide-fraction", type=float, default=0.5)
    parser.add_argument("--hide-after", type=float, default=0.3,
                        help="thought hiding starts after this fraction of the steps")
    parser.add_argument("--decision-weight", type=float, default=1.0,
                        help="loss weight of the word after each summary (next step or the answer)")
    parser.add_argument("--init-std", type=float, default=0.06)
    parser.add_argument("--rope-theta", type=float, default=1e12,
                        help="large: most rotary pairs stay still over 2K tokens, so lookups by content work at any distance")
    parser.add_argument("--curriculum", type=float, default=0.35,
                        help="fraction of the steps over which the largest n_steps grows")
    parser.add_argument("--curriculum-start", type=int, default=4, help="largest n_steps at step 0")
    parser.add_argument("--curriculum-hold", type=float, default=0.1,
                        help="fraction of the steps spent at --curriculum-start before growing")
    parser.add_argument("--eval-problems", type=int, default=40,
                        help="held-out problems for the full-attention accuracy (0: no evaluation)")
    parser.add_argument("--masked-problems", type=int, default=10,
                        help="held-out problems for the oracle / random / summary-only masked accuracies")
    parser.add_argument("--window", type=int, default=64, help="recent window of the masked evaluations")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--eval-n-steps", type=int, nargs=2, default=None, help="default: the task's sizes")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the checkpoint in --out and update its training.json; no training")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if not args.decision_weight > 0:
        parser.error(f"--decision-weight={args.decision_weight!r}: must be > 0")
    shape = pt.TASKS[args.task]
    args.out = args.out or reasoner_dir(args.task)
    args.n_steps_max = shape.n_steps[1] if args.n_steps_max is None else args.n_steps_max
    args.eval_n_steps = args.eval_n_steps or list(shape.n_steps)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    if args.task == "long" and args.init_from is None and not args.eval_only:
        return train_long(args)
    if args.eval_only:
        from testbed.reasoner_model import load_model, load_tokenizer

        path = args.out / "training.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        report.update(run_evaluations(load_model(args.out), load_tokenizer(args.out), args))
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report), flush=True)
        return report
    tokenizer = build_tokenizer(args.task)
    cache = {}

    def ids_of(text: str) -> List[int]:
        if text not in cache:
            cache[text] = word_ids(tokenizer, text)
        return cache[text]

    if args.init_from:
        model = start_from(args.init_from, tokenizer)
    else:
        model = build_model(tokenizer, args.seed, args.init_std, args.rope_theta)
    n_params = sum(p.numel() for p in model.parameters())
    # A trained start keeps its embeddings as they are: the shared parts begin at zero.
    factorize_embeddings(model, token_factors(tokenizer), 0.0 if args.init_from else args.init_std)
    print(f"parameters: {n_params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def size_at(step: int) -> int:
        """Curriculum: the largest n_steps grows linearly over the first --curriculum of steps."""
        hold = args.curriculum_hold * args.steps
        ramp = min(1.0, max(0.0, step - hold) / max(1.0, (args.curriculum - args.curriculum_hold) * args.steps))
        return round(args.curriculum_start + ramp * (args.n_steps_max - args.curriculum_start))

    rng = random.Random(f"train_reasoner:batches:{args.seed}")
    counter = [0]
    start = time.time()
    losses: List[float] = []
    tokens_seen = 0
    stopped_early = False
    step = 0
    kind_loss = [0.0] * len(KINDS)
    kind_count = [0] * len(KINDS)
    model.train()
    for step in range(args.steps):
        if time.time() - start > args.minutes * 60:
            stopped_early = True
            break
        input_ids, labels, mask, kinds = sample_batch(
            rng, args, tokenizer, ids_of, counter, size_at(step),
            args.hide_fraction if step >= args.hide_after * args.steps else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        # The few words that decide whether the reasoning goes on weigh --decision-weight each.
        weights = 1.0 + (args.decision_weight - 1.0) * (kinds[:, 1:] == KINDS.index("decision")).float()
        loss = (token_loss * weights).sum() / (weights * (labels[:, 1:] != -100)).sum()
        with torch.no_grad():
            for k in range(len(KINDS)):
                sel = kinds[:, 1:] == k
                if sel.any():
                    kind_loss[k] += float(token_loss[sel].sum())
                    kind_count[k] += int(sel.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens_seen += int((labels != -100).sum())
        if step % args.log_every == 0 or step == args.steps - 1:
            recent = losses[-args.log_every:]
            per_kind = " ".join(f"{k[:4]} {kind_loss[i] / max(1, kind_count[i]):.2f}" for i, k in enumerate(KINDS))
            kind_loss[:] = [0.0] * len(KINDS)
            kind_count[:] = [0] * len(KINDS)
            print(f"step {step:5d}  n<={size_at(step):2d}  loss {sum(recent) / len(recent):.4f}  lr {lr_at(step):.2e}  "
                  f"T {input_ids.shape[1]:4d} B {input_ids.shape[0]:2d}  "
                  f"{time.time() - start:6.0f}s  [{per_kind}]", flush=True)
    train_seconds = time.time() - start
    steps_done = len(losses)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    print(f"trained {steps_done} steps in {train_seconds:.0f}s; final loss (last 50 steps) {final_loss:.4f}",
          flush=True)

    bake_embeddings(model)
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "seed": args.seed, "parameters": n_params, "steps": steps_done, "steps_planned": args.steps,
        "stopped_early": stopped_early, "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(final_loss, 5), "train_tokens": tokens_seen,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
    }
    parent = args.init_from / "training.json" if args.init_from else None
    if parent and parent.exists():  # the whole chain of runs that made this checkpoint
        report["started_from"] = json.loads(parent.read_text())
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")  # kept if evaluation fails
    report.update(run_evaluations(model, tokenizer, args))
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
