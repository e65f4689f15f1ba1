"""``benchmarks/serving.py``'s pure pieces (prompts, cell statistics, the time-budget prediction)
without servers; its two parts run with servers in the rehearsal of the GPU check's second call
(``tests/test_gpu_check.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from serving import predicted_seconds  # noqa: E402
from serving_load import Stream, Vocabulary, cell_stats, reasoning_prompt  # noqa: E402
from serving_presets import BODY_TOKENS, QUESTION_TOKENS, SUMMARY_TOKENS  # noqa: E402

from testbed.shaped_model import SPECIALS  # noqa: E402
from zoomr_sglang.algo.segmentation import ThoughtSegmenter, prompt_reasoning_start  # noqa: E402

VOCAB = Vocabulary(bos=1, blank=3, summary_begin=4, summary_end=5, first_word=6, size=4096)
TEXTS = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB.size)]


def test_reasoning_prompt_is_pasted_reasoning_zoomr_cuts_into_summarised_thoughts():
    ids = reasoning_prompt(2048, "cell/0", VOCAB)
    assert len(ids) == 2048 and ids[0] == VOCAB.bos
    assert ids == reasoning_prompt(2048, "cell/0", VOCAB) != reasoning_prompt(2048, "cell/1", VOCAB)
    start = prompt_reasoning_start(ids, TEXTS, boundaries=["\n\n"], summary_begin="<|begin_of_summary|>")
    assert start is not None and QUESTION_TOKENS <= start <= QUESTION_TOKENS + BODY_TOKENS + 1
    segmenter = ThoughtSegmenter(TEXTS, boundaries=["\n\n"], summary_begin="<|begin_of_summary|>",
                                 summary_end="<|end_of_summary|>", sentence_ends=[".", "\n"], max_thought_tokens=256,
                                 first_position=start)
    for position in range(start, len(ids)):
        segmenter.feed(ids[position], position)
    closed = [t for t in segmenter.thoughts if t.final]
    whole = (2048 - QUESTION_TOKENS) // (BODY_TOKENS + SUMMARY_TOKENS + 4)
    assert len(closed) == whole and all(t.content_end - t.content_start == SUMMARY_TOKENS for t in closed)


def stream(sent: float, first: float, n: int) -> Stream:
    return Stream(rid="r", sent=sent, times=[first + i for i in range(n)], tokens=list(range(1, n + 1)))


def test_cell_stats_counts_output_while_every_request_decodes():
    together = cell_stats([stream(0.0, 1.0, 10), stream(0.0, 2.0, 10)])  # both decode over [2, 10]
    assert together["output_throughput"] == pytest.approx(16 / 8)  # 8 tokens each in the window
    assert together["e2e_output_throughput"] == pytest.approx(20 / 11, abs=0.01)
    assert together["peak_decoding"] == 2 and together["mean_ttft_s"] == pytest.approx(1.5)
    assert together["prefill_seconds"] == 2.0 and together["seconds"] == 11.0
    queued = cell_stats([stream(0.0, 1.0, 5), stream(0.0, 7.0, 5)])  # the second starts once the first ends
    assert queued["output_throughput"] is None and queued["peak_decoding"] == 1


def test_time_budget_prediction_scales_prefill_with_prompt_tokens():
    done = {(1024, 1): {"seconds": 1.0, "prefill_seconds": 0.5}, (1024, 4): {"seconds": 3.0, "prefill_seconds": 2.0}}
    assert predicted_seconds((1024, 8), {}, None) == 0.0
    assert predicted_seconds((1024, 8), done, None) == pytest.approx(2.0 * 2 + 1.0)  # from the 4-request cell
    assert predicted_seconds((1024, 8), done, {"seconds": 10.0}) == pytest.approx(11.0)  # zoomr: dense's, + 10%
