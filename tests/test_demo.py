"""``python -m testbed.demo`` end to end on a short problem: both answers with their verdicts, zoomr
reading less KV per step than full within its budget, and zoom-ins that name thoughts already closed."""

from __future__ import annotations

import re

import pytest

from engine_utils import zoomr_env
from testbed import demo
from testbed.policy_runs import TASK_SETTINGS

pytestmark = pytest.mark.engine


def test_demo_shows_both_answers_less_kv_and_zoom_ins_into_closed_thoughts(capsys):
    # 5 steps, about 380 tokens per run; at 30% of the sequence the reasoner keeps the task's format
    # here (at 20% a problem this short leaves zoomr less budget than sinks + prompt + window).
    with zoomr_env(**TASK_SETTINGS):  # start_engine sets them for the demo; put the environment back after
        shown = demo.main(["--seed", "0", "--steps", "5", "--problem", "2", "--budget", "0.3"])
    out = capsys.readouterr().out
    full, zoomr = shown["runs"]["full"], shown["runs"]["zoomr"]

    answers = re.search(r"answer \(expected (V\d)\)\s+(\S+)  (right|wrong)\s+(\S+)  (right|wrong)", out)
    assert answers, out
    expected = shown["expected"]
    for run, (answer, verdict) in zip((full, zoomr), (answers.group(2, 3), answers.group(4, 5))):
        assert answer == (run["answer"] or "none")
        assert verdict == ("right" if run["answer"] == expected else "wrong")
    assert answers.group(1) == expected

    assert full["attended_per_step"] == full["dense_per_step"] and full["attended_max"] == full["dense_last"]
    assert zoomr["attended_per_step"] < full["attended_per_step"]
    assert zoomr["attended_max"] <= zoomr["budget"] < full["dense_last"]

    # One row per closed thought plus the answer line; every zoom-in names a thought closed before
    # the one being written, and the table prints exactly those zoom-ins.
    assert len(shown["summaries"]) == shown["thoughts_closed"] == 5
    assert shown["zooms"], out
    for selection, _, thought in shown["zooms"]:
        assert all(0 <= t < thought for t in selection), shown["zooms"]
    printed = re.findall(r"([\d,]+|-)@(\d+)", out)
    assert printed == [(",".join(map(str, selection)) or "-", str(step)) for selection, step, _ in shown["zooms"]]
    assert 0 <= shown["detail_hits"] <= shown["detail_reads"] == 2
