"""A tiny random-weight Llama model with a small BPE tokenizer, built fully offline.

Tests and CPU smoke runs need a model that both HF ``transformers`` and SGLang
can load without network access. :func:`build_tiny_model` writes one to a
folder deterministically (same parameters, same files); :func:`tiny_model_dir`
builds it once into a cache folder and reuses it.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on an
embedded English corpus of reasoning-like text. Its pre-tokenizer follows the
Llama-3/Qwen2 split (words with their leading space, 1-3 digit numbers,
newline runs as their own pieces) except that punctuation does not swallow the
newlines that follow it, so a paragraph break is always the single token
``"\\n\\n"``. ``<|begin_of_summary|>`` and ``<|end_of_summary|>`` are ordinary
(non-special) added tokens, so detokenization keeps them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from testbed.model_cache import build_into_place, cache_root

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "SUMMARY_BEGIN_TOKEN",
    "SUMMARY_END_TOKEN",
    "build_tiny_model",
    "tiny_model_dir",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SUMMARY_BEGIN_TOKEN = "<|begin_of_summary|>"
SUMMARY_END_TOKEN = "<|end_of_summary|>"

#: Bump when the files written by :func:`build_tiny_model` change for the same
#: parameters, so cached copies from older code are not reused.
_FORMAT_VERSION = 1

#: Standard deviation of the random linear/embedding weights. Larger than the
#: usual 0.02 so that the random model's greedy output keeps varying instead of
#: collapsing at once into one repeated token, and so that logits have clear
#: margins (fewer near-ties between two implementations).
_INIT_STD = 0.35

#: Embedding value in hidden dimension 0 that carries the unigram prior (see ``_init_weights``).
_PRIOR_CARRIER = 1.0
#: Scale of the log-frequency output prior in ``lm_head`` column 0 (0 disables it).
_PRIOR_STRENGTH = 2.0
#: Extra prior for the ``"\n\n"`` token, so random output has paragraph breaks.
_PARAGRAPH_BONUS = 4.0

_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_CORPUS = """\
Let me think about this step by step. The train leaves at 9:15 and arrives at 11:45, so the trip takes 2 hours and 30 minutes. If the distance is 180 kilometers, the average speed is 180 divided by 2.5, which is 72 kilometers per hour.

Wait, I should check the units. The question asks for meters per second. 72 kilometers per hour is 72000 meters in 3600 seconds, and 72000 / 3600 = 20. So the answer is 20 meters per second.

First, we need to find the number of apples. Alice has 12 apples and gives 5 to Bob. Then she has 7 apples left. Bob already had 3 apples, so now he has 8 apples.

Hmm, but the problem says that Bob eats 2 of them. So Bob ends with 6 apples, and together they have 7 + 6 = 13 apples.

Let's verify this again. 12 - 5 = 7. 3 + 5 = 8. 8 - 2 = 6. 7 + 6 = 13. Yes, the total is 13.

Alternatively, we can think about it another way. The total number of apples starts at 12 + 3 = 15. Bob eats 2, so 15 - 2 = 13 remain. Both methods agree, which is a good sign.

Now consider the equation 3x + 7 = 25. Subtract 7 from both sides to get 3x = 18. Divide by 3, and x = 6. Let me plug it back in: 3 times 6 is 18, and 18 plus 7 is 25. That is correct.

Next, suppose the rectangle has a width of 4 and a length of 9. The area is 4 times 9, which equals 36. The perimeter is 2 times (4 + 9), which is 26.

But wait, the question might be asking about the diagonal instead. By the Pythagorean theorem, the diagonal is the square root of 16 + 81 = 97, which is about 9.85.

I think the key idea here is to break the problem into smaller parts. Each part is easy on its own, and then we combine the results at the end.

So far we know three facts. The first number is even. The second number is odd. Their sum is 21. If the first number is 10, then the second is 11, and that works because 11 is odd.

However, there could be more than one solution. The first number could also be 2, 4, 6, 8, 12, 14, 16, 18 or 20, and the second number would be 19, 17, 15, 13, 9, 7, 5, 3 or 1. So the answer is not unique unless there is another condition.

Let me re-read the question. It says the numbers are consecutive. Then the only pair is 10 and 11, because consecutive numbers differ by 1.

Therefore, the final answer is 10 and 11.

Okay, now for the probability question. A bag contains 5 red balls and 3 blue balls. We draw 2 balls without replacement. The probability that both are red is 5/8 times 4/7, which is 20/56, or 5/14.

To double check, the number of ways to choose 2 red balls is 10, and the number of ways to choose any 2 balls is 28. 10 / 28 = 5/14. Good, the two answers match.

In summary, we computed the speed, the number of apples, the value of x, the area, and the probability. Each step was checked at least once.

Another approach is to work backwards from the answer. If the result must be 100, and the last step doubles the value, then the value before it was 50. Before that, we added 14, so it was 36. And 36 is 6 squared, so the starting number is 6.

This seems right, but I am not completely sure. Let me try a small example first. With n = 1 the formula gives 1. With n = 2 it gives 3. With n = 3 it gives 6. These are the triangular numbers, so the formula is n(n + 1)/2.

For n = 100 the sum is 100 times 101 divided by 2, which is 5050. That matches the famous story about the young student who added the numbers from 1 to 100.

We should also be careful about edge cases. What happens when n = 0? The sum of no numbers is 0, and the formula gives 0 times 1 divided by 2, which is 0. So the formula still holds.

The time is now 3:40 in the afternoon. The meeting starts in 35 minutes, so it begins at 4:15. If the meeting lasts 1 hour and 20 minutes, it ends at 5:35.

Let me summarize what we have found so far. The answer to the first part is 20, the answer to the second part is 13, and the answer to the third part is 6.

Then we move on to the last question. The price of a book is 24 dollars, and it is on sale for 25 percent off. A quarter of 24 is 6, so the sale price is 18 dollars. With a tax of 10 percent, the final cost is 19.80 dollars.

Actually, I made a mistake earlier. The tax should be applied before the discount in this store. Then the cost is 24 plus 2.40, which is 26.40, and 75 percent of that is 19.80. Interesting, the result is the same either way, because multiplication is commutative.

So the final answer is 19.80 dollars.
"""


def _train_tokenizer(vocab_size: int):
    """Train the byte-level BPE ``tokenizers.Tokenizer`` on the embedded corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # The two summary markers are added after training and fill the last ids.
        vocab_size=vocab_size - 2,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = _CORPUS.split("\n\n")
    # Feed paragraphs with their separators so "\n\n" is seen as a piece.
    texts = [p + "\n\n" for p in paragraphs]
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _write_tokenizer(out_dir: Path, vocab_size: int) -> dict:
    """Save the tokenizer as a ``PreTrainedTokenizerFast``.

    Returns its BOS/EOS ids and ``unigram_counts``: how often each token id
    occurs in the tokenized corpus (used as an output prior by the weights).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    raw = _train_tokenizer(vocab_size)
    raw.add_tokens(
        [
            AddedToken(SUMMARY_BEGIN_TOKEN, special=False, normalized=False),
            AddedToken(SUMMARY_END_TOKEN, special=False, normalized=False),
        ]
    )
    if raw.token_to_id("\u010a\u010a") is None:  # byte-level spelling of "\n\n"
        raise RuntimeError('tiny tokenizer has no "\\n\\n" token; the corpus needs more paragraphs')
    if raw.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise RuntimeError("tiny tokenizer vocabulary exceeds the model's vocab_size")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 writes its internal "TokenizersBackend"; the public alias
    # loads the same class there and also works with older readers.
    config_path = out_dir / "tokenizer_config.json"
    data = json.loads(config_path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    counts = [0] * vocab_size
    for token_id in raw.encode(_CORPUS).ids:
        counts[token_id] += 1
    return {
        "bos_token_id": raw.token_to_id(BOS_TOKEN),
        "eos_token_id": raw.token_to_id(EOS_TOKEN),
        "unigram_counts": counts,
        "paragraph_token_id": raw.token_to_id("\u010a\u010a"),
    }


def _init_weights(model, seed: int, unigram_counts, paragraph_id=None) -> None:
    """Fill every parameter from a private generator, independently of transformers' init code.

    Linear and embedding weights are Gaussian (``_INIT_STD``, scaled by fan-in),
    norms are ones. On top of that, hidden dimension 0 of every token embedding
    carries a constant ``_PRIOR_CARRIER`` that the residual stream keeps up to
    the final norm, and column 0 of ``lm_head`` holds a scaled log unigram
    frequency of the corpus (plus ``_PARAGRAPH_BONUS`` for ``"\\n\\n"``). Frequent
    tokens thus get a logit bonus, and the random model's greedy text varies
    and contains ``.`` and paragraph breaks every few dozen tokens.
    """
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() == 1:
                param.zero_()
            else:
                fan_in = 64 if "embed_tokens" in name else param.shape[-1]
                std = _INIT_STD * (64 / fan_in) ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
        if _PRIOR_STRENGTH:
            vocab = model.lm_head.weight.shape[0]
            log_freq = torch.tensor(
                [math.log(1 + c) for c in list(unigram_counts)[:vocab]] + [0.0] * max(0, vocab - len(unigram_counts)),
                dtype=torch.float32,
            )
            model.model.embed_tokens.weight[:, 0] = _PRIOR_CARRIER
            prior = _PRIOR_STRENGTH * (log_freq - log_freq.mean())
            if paragraph_id is not None and paragraph_id < vocab:
                prior[paragraph_id] += _PARAGRAPH_BONUS
            model.lm_head.weight[:, 0] = prior


def build_tiny_model(
    out_dir,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` and its tokenizer into ``out_dir``.

    Everything is generated offline and deterministically from the arguments:
    fp32 weights in safetensors (``config.json`` says ``float32``), and a
    byte-level BPE ``PreTrainedTokenizerFast`` with ``<|begin_of_text|>`` /
    ``<|end_of_text|>`` as BOS/EOS, a ``"\\n\\n"`` token, and the non-special
    added tokens ``<|begin_of_summary|>`` and ``<|end_of_summary|>``.
    ``out_dir`` is created if needed. Returns ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if vocab_size < 300:
        raise ValueError("vocab_size must be at least 300 (256 byte tokens plus merges and specials)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out, vocab_size)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=_INIT_STD,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["eos_token_id"],
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights(model, seed, ids["unigram_counts"], ids["paragraph_token_id"])
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)

    # Older readers (and SGLang's config handling) look for ``torch_dtype``.
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    data["torch_dtype"] = "float32"
    data["dtype"] = "float32"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def tiny_model_dir(cache_dir=None, **params) -> Path:
    """Return the folder of a tiny model built with ``params``, building it once.

    ``params`` are the keyword arguments of :func:`build_tiny_model`. The model
    lives under ``cache_dir``, else ``$ZOOMR_CACHE_DIR``, else
    ``~/.cache/zoomr_sglang``, in ``tiny-<hash of the parameters>``. It is
    built in a temporary sibling folder and renamed into place, so concurrent
    callers never see a half-written model.
    """
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(build_tiny_model).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown tiny model parameters: {sorted(unknown)}")
    resolved = {**defaults, **params, "_format": _FORMAT_VERSION, "_init_std": _INIT_STD, "_prior": [_PRIOR_CARRIER, _PRIOR_STRENGTH, _PARAGRAPH_BONUS]}
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]

    root = Path(cache_dir) if cache_dir else cache_root()
    return build_into_place(root / f"tiny-{digest}", lambda folder: build_tiny_model(folder, **params),
                            lambda folder: (folder / "config.json").is_file())
