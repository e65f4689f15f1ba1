"""Token ids the tokenizer does not know (models pad their embedding past it: Qwen's 151,936 rows
for 151,669 entries) are served like any other token: in prompts, in outputs (a random-weight
model samples them) and through the zoomr radix cache into a second turn, with every count back."""

from __future__ import annotations

import json
import shutil

import pytest

from engine_utils import GREEDY, assert_idle_counts, engine, zoomr_env, zoomr_state

pytestmark = pytest.mark.engine

PADDED_VOCAB = 576  # the tiny model's tokenizer has 512 entries


def test_ids_past_the_tokenizer_are_served_and_inherited(model_path, tmp_path):
    padded = tmp_path / "padded"
    shutil.copytree(model_path, padded)
    config = json.loads((padded / "config.json").read_text())
    config["vocab_size"] = PADDED_VOCAB
    (padded / "config.json").write_text(json.dumps(config))
    unknown = list(range(512, PADDED_VOCAB, 9))
    first = [[0, 5, *unknown, 6, 7], [0, *unknown[::-1], 30, 31, 32]]
    sampling = {**GREEDY, "temperature": 1.0, "top_k": PADDED_VOCAB, "max_new_tokens": 400}
    with zoomr_env(sink=4, window=64, max_thought_tokens=48), engine(
            str(padded), "zoomr", load_format="dummy", radix_cache_backend="zoomr") as eng:
        start = zoomr_state(eng)
        turn1 = eng.generate(input_ids=first, sampling_params=sampling)
        second = [prompt + out["output_ids"] + [520, 8] for prompt, out in zip(first, turn1)]
        turn2 = eng.generate(input_ids=second, sampling_params={**sampling, "max_new_tokens": 100})
        state = zoomr_state(eng)
        sampled_unknown = sum(t >= 512 for out in turn1 + turn2 for t in out["output_ids"])
        assert [len(out["output_ids"]) for out in turn1 + turn2] == [400, 400, 100, 100]
        assert sampled_unknown > 0  # the model's own outputs hold such ids too
        assert all(out["meta_info"]["cached_tokens"] > 0 for out in turn2)  # turn 2 went through the tree
        assert_idle_counts(eng, state, start)
