"""ZOOMR_* parsing: defaults, every knob, and a clear error for every kind of bad value."""

import pytest

from zoomr_sglang.algo.working_set import MIN_WINDOW
from zoomr_sglang.config import ENV_VARS, ZoomRConfig, load_config


def test_defaults_without_variables():
    assert load_config({}) == ZoomRConfig()


def test_every_variable_is_read():
    environ = {
        "ZOOMR_TOPK": "3", "ZOOMR_NUM_THOUGHTS": "4", "ZOOMR_SINK": "0", "ZOOMR_THOUGHT_SINK": "5", "ZOOMR_WINDOW": "64",
        "ZOOMR_MAX_THOUGHT_TOKENS": "100", "ZOOMR_BOUNDARIES": '["\\n\\n", "###"]',
        "ZOOMR_SUMMARY_BEGIN": "<s>", "ZOOMR_SUMMARY_END": "</s>", "ZOOMR_SENTENCE_ENDS": '["."]',
        "ZOOMR_REFRESH_INTERVAL": "8", "ZOOMR_STATS_HISTORY": "5", "ZOOMR_SELF_CHECK_INTERVAL": "9",
        "ZOOMR_HOST_POOL_GB": "1.5", "ZOOMR_ZOOM_CACHE": "0", "ZOOMR_POLICY": "sumr", "ZOOMR_BUDGET": "200",
        "ZOOMR_VOTE": "count", "ZOOMR_VOTE_SUMMARY_TOKENS": "12", "ZOOMR_VOTE_LAYERS": "[2, 0]",
        "ZOOMR_IMPLICIT_ZOOM": "thoughts", "ZOOMR_MAX_CANDIDATES": "64",
        "ZOOMR_INDEX_ENTRIES": "4096",
        "ZOOMR_SEGMENT_PROMPT": "off", "ZOOMR_ADMISSION": "bound",
    }
    assert set(environ) == set(ENV_VARS)  # a new knob joins this test
    config = load_config(environ)
    assert config == ZoomRConfig(
        topk=3, num_thoughts=4, sink=0, thought_sink=5, window=64, max_thought_tokens=100, boundaries=("\n\n", "###"),
        summary_begin="<s>", summary_end="</s>", sentence_ends=(".",), refresh_interval=8, stats_history=5,
        self_check_interval=9, host_pool_gb=1.5, zoom_cache=0, policy="sumr", budget=200, vote="count",
        vote_summary_tokens=12, vote_layers=(0, 2), implicit_zoom="thoughts", max_candidates=64, index_entries=4096, segment_prompt="off",
        admission="bound",
    )


@pytest.mark.parametrize("name, value, words", [
    ("ZOOMR_TOPK", "-1", ">= 1"),
    ("ZOOMR_SEGMENT_PROMPT", "yes", "allowed: markers, off"),
    ("ZOOMR_ADMISSION", "loose", "allowed: observed, bound, sglang"),
    ("ZOOMR_TOPK", "0", ">= 1"),
    ("ZOOMR_THOUGHT_SINK", "-1", ">= 0"),
    ("ZOOMR_VOTE_SUMMARY_TOKENS", "0", ">= 1"),
    ("ZOOMR_VOTE", "max", "allowed: mass, count, mean_mass"),
    ("ZOOMR_IMPLICIT_ZOOM", "tokens", "allowed: pages, thoughts"),
    ("ZOOMR_VOTE_LAYERS", "[0, 0]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[-1]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[true]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "0", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[[0]]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[0", "not valid JSON"),
    ("ZOOMR_TOPK", "two", "not an integer"),
    ("ZOOMR_NUM_THOUGHTS", "1.5", "not an integer"),
    ("ZOOMR_SINK", "-3", ">= 0"),
    ("ZOOMR_WINDOW", str(MIN_WINDOW - 1), f">= {MIN_WINDOW}"),
    ("ZOOMR_MAX_THOUGHT_TOKENS", "0", ">= 1"),
    ("ZOOMR_BOUNDARIES", "\\n\\n", "not valid JSON"),
    ("ZOOMR_BOUNDARIES", '[""]', "non-empty strings"),
    ("ZOOMR_BOUNDARIES", "[]", "non-empty strings"),
    ("ZOOMR_SUMMARY_BEGIN", "", "non-empty"),
    ("ZOOMR_REFRESH_INTERVAL", "", "not an integer"),
    ("ZOOMR_HOST_POOL_GB", "-1", "a number of GiB >= 0"),
    ("ZOOMR_HOST_POOL_GB", "lots", "not a number"),
    ("ZOOMR_HOST_POOL_GB", "inf", "a number of GiB >= 0"),
    ("ZOOMR_ZOOM_CACHE", "-2", ">= 0"),
    ("ZOOMR_SELF_CHECK_INTERVAL", "x", "not an integer"),
    ("ZOOMR_MAX_CANDIDATES", "0", ">= 1"),
    ("ZOOMR_INDEX_ENTRIES", "-1", ">= 0"),
    ("ZOOMR_INDEX_ENTRIES", "many", "not an integer"),
])
def test_bad_value_names_variable_value_and_allowed(name, value, words):
    with pytest.raises(ValueError) as error:
        load_config({name: value})
    message = str(error.value)
    assert name in message and repr(value) in message and words in message


@pytest.mark.parametrize("name, value, message", [
    ("ZOOMR_TOPK", "-1", "ZOOMR_TOPK='-1' is too small; allowed: an integer >= 1"),
    ("ZOOMR_BOUNDARIES", "\\n\\n", "ZOOMR_BOUNDARIES='\\\\n\\\\n' is not valid JSON; allowed: a JSON list of non-empty strings"),
    ("ZOOMR_BOUNDARIES", "[]", "ZOOMR_BOUNDARIES='[]' is not allowed; allowed: a JSON list of non-empty strings"),
])
def test_bad_value_message_reads_name_value_then_what_is_allowed(name, value, message):
    """The whole message, as a server start prints it (the server test starts one bad server only)."""
    with pytest.raises(ValueError) as error:
        load_config({name: value})
    assert str(error.value).startswith(message)


def test_unknown_variable_is_refused():
    with pytest.raises(ValueError, match="unknown variable ZOOMR_TOP_K"):
        load_config({"ZOOMR_TOP_K": "2"})


def test_equal_summary_markers_are_refused():
    with pytest.raises(ValueError, match="ZOOMR_SUMMARY_BEGIN and ZOOMR_SUMMARY_END"):
        load_config({"ZOOMR_SUMMARY_BEGIN": "@@", "ZOOMR_SUMMARY_END": "@@"})


def test_working_set_bound_counts_each_part():
    config = ZoomRConfig(num_thoughts=2, sink=4, window=16, max_thought_tokens=10)
    # sinks + prompt + summaries + 2 zoomed bodies + open region (body and summary) + window
    assert config.working_set_bound(prompt_len=7, summary_tokens=5) == 4 + 7 + 5 + 20 + 20 + 16


def test_the_environment_is_parsed_once_per_set_of_values(monkeypatch):
    """Every request's validation asks for the server's settings: the same object comes back until
    a ZOOMR_* variable changes, and a bad value is refused at every ask."""
    monkeypatch.setenv("ZOOMR_BUDGET", "64")
    first = load_config()
    assert load_config() is first and first.budget == 64
    monkeypatch.setenv("ZOOMR_BUDGET", "96")
    assert load_config().budget == 96
    monkeypatch.setenv("ZOOMR_WINDOW", "1")
    for _ in range(2):
        with pytest.raises(ValueError, match="ZOOMR_WINDOW='1' is too small"):
            load_config()
