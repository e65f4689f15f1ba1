"""A model folder with a real architecture's shape and no weights, for speed measurements on a GPU.

SGLang's ``--load-format dummy`` fills the weights at random when it loads the model, so the folder
holds only ``config.json`` (Llama-3.1-8B's shape unless told otherwise) and a word-level tokenizer
with one token per id (``w<id>``), plus a blank line and the summary markers as their own tokens so
that ZoomR's start-up checks pass. The model writes noise; what a server on it measures is speed.

    python -m testbed.shaped_model OUT_DIR [--layers N]      # seconds, no download

``benchmarks/serving.py`` writes prompts for it whose ids hold the blank line and the summary
markers at the places a reasoning trace would (every other id is one word, ``w<id>``, with no
sentence end or blank line in it), so ZoomR segments them as pasted reasoning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Llama-3.1-8B (the shape the GPU benchmarks name).
LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
)
SPECIALS = ["<unk>", "<s>", "</s>", "\n\n", "<|begin_of_summary|>", "<|end_of_summary|>"]


def write_shaped_model(out_dir, **overrides) -> Path:
    """Write ``config.json`` (Llama-3.1-8B's shape, ``overrides`` applied) and the tokenizer into ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    shape = {**LLAMA_31_8B, **overrides}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), shape["vocab_size"])})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in SPECIALS[3:]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))
    config = LlamaConfig(**shape, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data["torch_dtype"] = data["dtype"] = "bfloat16"  # what SGLang loads it as (weights are random anyway)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def shape_overrides(layers: int, hidden_size: int, vocab_size: int) -> dict:
    """``write_shaped_model`` overrides for a model of ``layers``, ``hidden_size`` and ``vocab_size``;
    a smaller hidden size keeps the head shape (head_dim 128, four query heads per KV head where it can)."""
    overrides = dict(num_hidden_layers=layers, hidden_size=hidden_size, vocab_size=vocab_size)
    if hidden_size != LLAMA_31_8B["hidden_size"]:
        overrides.update(intermediate_size=2 * hidden_size,
                         num_attention_heads=hidden_size // 128, num_key_value_heads=max(1, hidden_size // 512))
    return overrides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=LLAMA_31_8B["num_hidden_layers"])
    parser.add_argument("--hidden-size", type=int, default=LLAMA_31_8B["hidden_size"])
    parser.add_argument("--vocab-size", type=int, default=LLAMA_31_8B["vocab_size"])
    args = parser.parse_args(argv)
    for name in ("layers", "hidden_size", "vocab_size"):
        if getattr(args, name) < (len(SPECIALS) + 1 if name == "vocab_size" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: too small")
    print(write_shaped_model(args.out_dir, **shape_overrides(args.layers, args.hidden_size, args.vocab_size)))


if __name__ == "__main__":
    main()
