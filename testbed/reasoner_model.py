"""The committed tiny reasoner for the program-trace task, and its word-level tokenizer.

The checkpoints in ``testbed/reasoner/`` (the short task) and ``testbed/reasoner_long/`` (the
long one) are each a plain ``LlamaForCausalLM`` saved with
``save_pretrained`` (fp32 safetensors, tokenizer files, ``training.json``); it is written by
``testbed/train_reasoner.py`` and SGLang serves the folder as is::

    sglang.Engine(model_path=str(reasoner_dir()), ...)

Its tokenizer is word-level: every word of :func:`program_trace.vocabulary` is one token
(``"\\n\\n"``, ``"\\n"``, ``<|begin_of_summary|>`` and ``<|end_of_summary|>`` included), BOS is
prepended to a prompt, EOS ends the reasoning, and decoding joins tokens with single spaces,
which is the task's canonical text (so :func:`program_trace.score` parses a decoded generation).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BOS", "EOS", "PAD", "UNK", "SPECIAL_TOKENS", "reasoner_dir", "load_tokenizer", "load_model"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3


def reasoner_dir(task: str = "short") -> Path:
    """The folder of the committed checkpoint for ``task`` (``program_trace.TASKS``): ``reasoner``
    for the short task, ``reasoner_long`` for the long one (pass it to SGLang as ``model_path``)."""
    return Path(__file__).resolve().parent / ("reasoner" if task == "short" else f"reasoner_{task}")


def load_tokenizer(path: Path | str | None = None):
    """The checkpoint's tokenizer (a ``PreTrainedTokenizerFast``); ``path`` defaults to :func:`reasoner_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or reasoner_dir()))


def load_model(path: Path | str | None = None):
    """The checkpoint as a ``LlamaForCausalLM`` in fp32, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path or reasoner_dir()), dtype=torch.float32)
    return model.eval()
