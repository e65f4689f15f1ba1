"""The server serves zoomr and full; a research policy's module is imported only where a setting
names it, and a name that cannot be served says why."""

import json
import subprocess
import sys

import pytest

from zoomr_sglang.algo import policy_registry
from zoomr_sglang.config import load_config, request_settings

PROBE = r"""
import json, sys
from zoomr_sglang.config import load_config, request_settings
config = load_config({})
request_settings(config, {"zoomr_budget": 64})
before = sorted(m for m in sys.modules if m.startswith("testbed"))
request_settings(config, {"zoomr_policy": "h2o"})
after = sorted(m for m in sys.modules if m.startswith("testbed"))
print(json.dumps({"before": before, "after": after}))
"""


def test_research_policies_load_only_when_named():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["before"] == []
    assert probe["after"] == ["testbed", "testbed.attention_baselines"]


def test_every_name_resolves_to_its_policy():
    for name in policy_registry.POLICY_NAMES:
        assert policy_registry.policy_class(name).name == name
    served = {cls.name for cls in policy_registry.SERVED_POLICIES}
    assert served == {"zoomr", "full"} and served.isdisjoint(policy_registry.RESEARCH_POLICIES)


def test_a_policy_that_cannot_be_served_says_why(monkeypatch):
    with pytest.raises(ValueError, match=r"ZOOMR_CONFIG key 'policy' = 'nope': policy 'nope' is not allowed; allowed: "
                                         r"full, zoomr, streaming"):
        load_config({"ZOOMR_CONFIG": '{"policy": "nope"}'})
    monkeypatch.setitem(policy_registry.RESEARCH_POLICIES, "missing", "testbed.no_such_module")
    with pytest.raises(ValueError, match=r"zoomr_policy='missing': policy 'missing' is a research baseline in the "
                                         r"zoomr-sglang repository's testbed.no_such_module"):
        request_settings(load_config({}), {"zoomr_policy": "missing"})
