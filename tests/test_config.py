"""Settings: user variables, ``ZOOMR_CONFIG`` keys, defaults, and a clear error for every kind of
bad value, misplaced setting and former variable."""

import json
import os

import pytest

from testbed.process_env import default_zoomr_environment, zoomr_environment
from zoomr_sglang.algo.working_set import MIN_WINDOW, step_budget
from zoomr_sglang.config import CONFIG_KEYS, ENV_VARS, USER_VARIABLES, ZoomRConfig, load_config, request_settings

EVERY_FIELD = dict(
    topk=3, num_thoughts=4, sink=0, thought_sink=5, window=64, max_thought_tokens=100, boundaries=("\n\n", "###"),
    summary_begin="<s>", summary_end="</s>", sentence_ends=(".",), refresh_interval=8, stats_history=5,
    self_check_interval=9, host_pool_gb=1.5, zoom_cache=0, policy="sumr", budget=200, vote="count",
    vote_summary_tokens=12, vote_layers=(0, 2), implicit_zoom="thoughts", max_candidates=64, index_entries=4096,
    segment_prompt="off", admission="bound", implicit_budget=0.5, fine_observe="step",
)


def test_defaults_without_variables():
    assert load_config({}) == ZoomRConfig()


def test_few_user_variables_and_every_other_field_a_config_key():
    assert len(ENV_VARS) <= 11 and ENV_VARS[-1] == "ZOOMR_CONFIG"
    assert set(USER_VARIABLES) | set(CONFIG_KEYS) == set(ZoomRConfig.__dataclass_fields__)
    assert not set(USER_VARIABLES) & set(CONFIG_KEYS)


def test_every_field_is_read_from_its_one_place():
    environ = {
        "ZOOMR_BUDGET": "200", "ZOOMR_HOST_POOL_GB": "1.5", "ZOOMR_NUM_THOUGHTS": "4", "ZOOMR_SINK": "0",
        "ZOOMR_WINDOW": "64", "ZOOMR_MAX_THOUGHT_TOKENS": "100", "ZOOMR_BOUNDARIES": '["\\n\\n", "###"]',
        "ZOOMR_SUMMARY_BEGIN": "<s>", "ZOOMR_SUMMARY_END": "</s>", "ZOOMR_VOTE_LAYERS": "[2, 0]",
        "ZOOMR_CONFIG": json.dumps({
            "topk": 3, "thought_sink": 5, "sentence_ends": ["."], "refresh_interval": 8, "stats_history": 5,
            "self_check_interval": 9, "zoom_cache": 0, "policy": "sumr", "vote": "count", "vote_summary_tokens": 12,
            "implicit_zoom": "thoughts", "max_candidates": 64, "index_entries": 4096, "segment_prompt": "off",
            "admission": "bound", "implicit_budget": 0.5, "fine_observe": "step"}),
    }
    assert set(environ) == set(ENV_VARS)  # a new variable joins this test
    assert set(json.loads(environ["ZOOMR_CONFIG"])) == set(CONFIG_KEYS)  # and so does a new key
    assert load_config(environ) == ZoomRConfig(**EVERY_FIELD)


def test_the_environment_helper_writes_what_the_config_reads():
    """testbed.process_env.zoomr_environment: user fields as their variables, the rest as one JSON."""
    environ = zoomr_environment(**EVERY_FIELD)
    assert set(environ) == set(ENV_VARS) and environ["ZOOMR_VOTE_LAYERS"] == "[0, 2]"
    assert load_config(environ) == ZoomRConfig(**EVERY_FIELD)
    assert zoomr_environment(sink=4) == {"ZOOMR_SINK": "4"}
    assert zoomr_environment(vote="count") == {"ZOOMR_CONFIG": '{"vote": "count"}'}
    with pytest.raises(ValueError, match="unknown ZoomR field 'top_k'"):
        zoomr_environment(top_k=1)


def test_benchmark_defaults_go_under_the_environment(monkeypatch):
    """default_zoomr_environment: a variable already set wins; an ablation's ZOOMR_CONFIG keeps
    its keys and gains the benchmark's others (not replacing the benchmark's whole config)."""
    monkeypatch.setenv("ZOOMR_SINK", "8")
    monkeypatch.setenv("ZOOMR_CONFIG", '{"vote": "count"}')
    monkeypatch.delenv("ZOOMR_WINDOW", raising=False)
    default_zoomr_environment(sink=4, window=64, vote="mass", topk=1)
    assert os.environ["ZOOMR_SINK"] == "8" and os.environ["ZOOMR_WINDOW"] == "64"
    assert json.loads(os.environ["ZOOMR_CONFIG"]) == {"vote": "count", "topk": 1}


@pytest.mark.parametrize("name, value, words", [
    ("ZOOMR_NUM_THOUGHTS", "1.5", "not an integer; allowed: an integer >= 0"),
    ("ZOOMR_NUM_THOUGHTS", "-1", "not allowed; allowed: an integer >= 0"),
    ("ZOOMR_SINK", "-3", ">= 0"),
    ("ZOOMR_WINDOW", str(MIN_WINDOW - 1), f">= {MIN_WINDOW}"),
    ("ZOOMR_MAX_THOUGHT_TOKENS", "0", ">= 1"),
    ("ZOOMR_BUDGET", "-1", "0 (unbounded), an integer count of KV tokens, or a share"),
    ("ZOOMR_BUDGET", "10", f"0 (unbounded), an integer >= {32 + MIN_WINDOW}"),
    ("ZOOMR_BOUNDARIES", "\\n\\n", "not valid JSON"),
    ("ZOOMR_BOUNDARIES", '[""]', "non-empty strings"),
    ("ZOOMR_BOUNDARIES", "[]", "non-empty strings"),
    ("ZOOMR_SUMMARY_BEGIN", "", "non-empty"),
    ("ZOOMR_SUMMARY_END", "", "non-empty"),
    ("ZOOMR_HOST_POOL_GB", "-1", "a number of GiB >= 0"),
    ("ZOOMR_HOST_POOL_GB", "lots", "not a number"),
    ("ZOOMR_HOST_POOL_GB", "inf", "a number of GiB >= 0"),
    ("ZOOMR_VOTE_LAYERS", "[0, 0]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[-1]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[true]", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "0", "distinct layer indices"),
    ("ZOOMR_VOTE_LAYERS", "[0", "not valid JSON"),
])
def test_bad_user_variable_names_variable_value_and_allowed(name, value, words):
    with pytest.raises(ValueError) as error:
        load_config({name: value})
    message = str(error.value)
    assert message.startswith(name) and (repr(value) in message or value in message) and words in message


@pytest.mark.parametrize("key, value, words", [
    ("topk", 0, "allowed: an integer >= 1"),
    ("topk", "2", "allowed: an integer >= 1"),  # JSON values keep their type: a string is no integer
    ("topk", True, "allowed: an integer >= 1"),
    ("thought_sink", -1, ">= 0"),
    ("sentence_ends", [], "non-empty strings"),
    ("sentence_ends", ".", "a JSON list of non-empty strings"),
    ("refresh_interval", 0, ">= 1"),
    ("stats_history", 1.5, ">= 0"),
    ("self_check_interval", None, ">= 0"),
    ("zoom_cache", -2, ">= 0"),
    ("policy", "sparse", "policy 'sparse' is not allowed; allowed: full, zoomr"),
    ("policy", 3, "allowed: a policy name"),
    ("vote", "max", "allowed: mass, count, mean_mass"),
    ("vote_summary_tokens", 0, ">= 1"),
    ("implicit_zoom", "tokens", "allowed: pages, thoughts"),
    ("implicit_budget", 200, "allowed: 0 (none) or a share of the sequence in (0, 1)"),
    ("fine_observe", "layer", "allowed: step, refresh"),
    ("max_candidates", 0, ">= 1"),
    ("index_entries", -1, ">= 0"),
    ("segment_prompt", "yes", "allowed: markers, off"),
    ("admission", "loose", "allowed: observed, bound, sglang"),
])
def test_bad_config_key_names_key_value_and_allowed(key, value, words):
    with pytest.raises(ValueError) as error:
        load_config({"ZOOMR_CONFIG": json.dumps({key: value})})
    message = str(error.value)
    assert message.startswith(f"ZOOMR_CONFIG key {key!r} = {value!r}") and words in message


@pytest.mark.parametrize("name, value, message", [
    ("ZOOMR_WINDOW", "1", f"ZOOMR_WINDOW='1' is not allowed; allowed: an integer >= {MIN_WINDOW}"),
    ("ZOOMR_BOUNDARIES", "\\n\\n", "ZOOMR_BOUNDARIES='\\\\n\\\\n' is not valid JSON; allowed: a JSON list of non-empty strings"),
    ("ZOOMR_CONFIG", '{"vote": "max"}', "ZOOMR_CONFIG key 'vote' = 'max' is not allowed; allowed: mass, count, mean_mass"),
    ("ZOOMR_CONFIG", '{"policy": "oracle"}', "ZOOMR_CONFIG key 'policy' = 'oracle' needs each request's task dependencies"),
])
def test_bad_value_message_reads_name_value_then_what_is_allowed(name, value, message):
    """The whole message, as a server start prints it (the server test checks a refusal in process)."""
    with pytest.raises(ValueError) as error:
        load_config({name: value})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("raw", ["[1]", '"vote"', "3", "vote=count", "{'vote': 'count'}"])
def test_config_that_is_no_json_object_is_refused(raw):
    with pytest.raises(ValueError) as error:
        load_config({"ZOOMR_CONFIG": raw})
    assert str(error.value).startswith(f"ZOOMR_CONFIG={raw!r} is not a JSON object; allowed: a JSON object")


def test_unknown_config_key_lists_the_keys():
    with pytest.raises(ValueError) as error:
        load_config({"ZOOMR_CONFIG": '{"top_k": 1}'})
    assert str(error.value) == f"unknown ZOOMR_CONFIG key 'top_k'; allowed keys: {', '.join(CONFIG_KEYS)}"


@pytest.mark.parametrize("key, value, variable", [
    ("budget", 300, "ZOOMR_BUDGET='300'"), ("vote_layers", [0], "ZOOMR_VOTE_LAYERS='[0]'"),
    ("summary_end", "##", "ZOOMR_SUMMARY_END='##'"), ("host_pool_gb", 0, "ZOOMR_HOST_POOL_GB='0'"),
])
def test_user_setting_in_config_points_to_its_variable(key, value, variable):
    """One place per setting: a user setting inside ZOOMR_CONFIG is refused with its variable."""
    with pytest.raises(ValueError) as error:
        load_config({"ZOOMR_CONFIG": json.dumps({key: value})})
    assert str(error.value) == (f"ZOOMR_CONFIG key {key!r} = {value!r} is a user setting; allowed: its own"
                                f" variable only, {variable}")


@pytest.mark.parametrize("environ, example", [
    ({"ZOOMR_VOTE": "count"}, '{"vote": "count"}'),
    ({"ZOOMR_STATS_HISTORY": "100000", "ZOOMR_SENTENCE_ENDS": '["<"]'}, '{"sentence_ends": ["<"], "stats_history": 100000}'),
])
def test_former_variable_says_it_is_now_a_config_key(environ, example):
    with pytest.raises(ValueError) as error:
        load_config(environ)
    message = str(error.value)
    assert all(name in message for name in environ) and "now set through ZOOMR_CONFIG" in message
    assert message.endswith(f"ZOOMR_CONFIG='{example}'")
    assert load_config({"ZOOMR_CONFIG": example}) != ZoomRConfig()  # the example works as given


def test_unknown_variable_is_refused_and_tooling_variables_are_not_read():
    with pytest.raises(ValueError, match="unknown variable ZOOMR_TOP_K; allowed ZOOMR_\\* variables: ZOOMR_BUDGET"):
        load_config({"ZOOMR_TOP_K": "2"})
    assert load_config({"ZOOMR_CACHE_DIR": "/tmp/models"}) == ZoomRConfig()


def test_equal_summary_markers_are_refused():
    with pytest.raises(ValueError, match="ZOOMR_SUMMARY_BEGIN and ZOOMR_SUMMARY_END"):
        load_config({"ZOOMR_SUMMARY_BEGIN": "@@", "ZOOMR_SUMMARY_END": "@@"})


def test_budget_is_checked_against_the_sink_it_comes_with():
    assert load_config({"ZOOMR_SINK": "0", "ZOOMR_BUDGET": str(MIN_WINDOW)}).budget == MIN_WINDOW
    with pytest.raises(ValueError, match=f"ZOOMR_BUDGET={MIN_WINDOW} is too small"):
        load_config({"ZOOMR_SINK": "1", "ZOOMR_BUDGET": str(MIN_WINDOW)})


def test_budget_is_a_count_of_tokens_or_a_share_of_the_sequence():
    assert load_config({"ZOOMR_BUDGET": "0.2"}).budget == 0.2 and load_config({"ZOOMR_BUDGET": "300"}).budget == 300
    for bad in ("1.0", "-0.1", "300.5", "20%"):
        with pytest.raises(ValueError, match=f"ZOOMR_BUDGET={bad!r} is (not allowed|not a number); allowed: 0"):
            load_config({"ZOOMR_BUDGET": bad})
    assert request_settings(ZoomRConfig(), {"zoomr_budget": 0.35}).budget == 0.35
    with pytest.raises(ValueError, match="zoomr_budget=1.5 is not allowed; allowed: 0 \\(unbounded\\), an integer"):
        request_settings(ZoomRConfig(), {"zoomr_budget": 1.5})
    # A share means the same at 2K and 32K; it never goes below the sinks and the shortest window.
    assert step_budget(0.2, 2048, 7) == 410 and step_budget(0.2, 32768, 7) == 6554
    assert step_budget(0.2, 10, 7) == 7 and step_budget(300, 32768, 7) == 300


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
    monkeypatch.setenv("ZOOMR_CONFIG", '{"vote": "count"}')
    assert load_config().vote == "count" and load_config().budget == 64
    monkeypatch.setenv("ZOOMR_WINDOW", "1")
    for _ in range(2):
        with pytest.raises(ValueError, match="ZOOMR_WINDOW='1' is not allowed"):
            load_config()
