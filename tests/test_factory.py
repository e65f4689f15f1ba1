"""Start-up checks of the backend factory: models it cannot serve and markers the tokenizer cannot write."""

from types import SimpleNamespace

import pytest
import torch

from zoomr_sglang.attention_backend import factory
from zoomr_sglang.config import ZoomRConfig


def _runner(**changes):
    model_config = SimpleNamespace(model_path="/models/m", is_encoder_decoder=False, vocab_size=8)
    runner = SimpleNamespace(model_config=model_config, use_mla_backend=False, sliding_window_size=None,
                             is_draft_worker=False, kv_cache_dtype=torch.bfloat16, dtype=torch.bfloat16)
    for key, value in changes.items():
        target = model_config if key == "is_encoder_decoder" else runner
        setattr(target, key, value)
    return runner


def test_plain_gqa_model_is_accepted():
    factory.check_model_supported(_runner())


@pytest.mark.parametrize("change, words", [
    (dict(use_mla_backend=True), "MLA attention"),
    (dict(sliding_window_size=4096), "sliding-window attention (window 4096)"),
    (dict(is_encoder_decoder=True), "cross attention"),
    (dict(is_draft_worker=True), "draft model"),
    (dict(kv_cache_dtype=torch.float8_e4m3fn), "drop --kv-cache-dtype"),
])
def test_unsupported_model_is_refused_with_the_reason(change, words):
    with pytest.raises(ValueError) as error:
        factory.check_model_supported(_runner(**change))
    assert "/models/m" in str(error.value) and words in str(error.value)
    assert "Choose another --attention-backend" in str(error.value)


class _CharTokenizer:
    """Knows only the characters it was given; anything else becomes <unk> (id 0)."""

    def __init__(self, chars):
        self.vocab = ["<unk>", *chars]

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.index(c) if c in self.vocab else 0 for c in text]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def _load_texts(monkeypatch, tokenizer, config):
    import sglang.srt.utils.hf_transformers.tokenizer as hf_tokenizer

    monkeypatch.setattr(hf_tokenizer, "get_tokenizer", lambda *args, **kwargs: tokenizer)
    server_args = SimpleNamespace(tokenizer_path=None, model_path="/models/m", tokenizer_mode="auto", trust_remote_code=False)
    return factory.load_token_texts(SimpleNamespace(server_args=server_args, model_config=_runner().model_config), config)


def test_token_texts_cover_the_model_vocabulary(monkeypatch):
    config = ZoomRConfig(boundaries=("\n\n",), summary_begin="<", summary_end=">")
    texts = _load_texts(monkeypatch, _CharTokenizer("\n<>ab"), config)
    assert texts == ["<unk>", "\n", "<", ">", "a", "b", "", ""]  # padded to the model's vocab_size 8


def test_marker_the_tokenizer_cannot_write_is_refused(monkeypatch):
    config = ZoomRConfig(boundaries=("\n\n",), summary_begin="<", summary_end="##")
    with pytest.raises(ValueError) as error:
        _load_texts(monkeypatch, _CharTokenizer("\n<>ab"), config)
    assert "ZOOMR_SUMMARY_END" in str(error.value) and "'##'" in str(error.value)


def test_host_tier_is_off_at_zero():
    """ZOOMR_HOST_POOL_GB=0 builds no tier, whatever the tensor parallelism (with TP > 1 the tier
    is built per rank; tests/test_tp.py runs it)."""
    assert factory.build_tiering(_runner(), ZoomRConfig(host_pool_gb=0), num_kv_heads=2, attn_tp_size=4) is None
