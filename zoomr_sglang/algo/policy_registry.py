"""Which working-set policy a name means: the served ones, and the research ones on request.

The installed package serves ``zoomr`` and ``full`` (:data:`policies.SERVED_POLICIES`). The
baselines and measurement policies live in the repository's ``testbed/`` (not installed): a
setting that names one imports its module, which registers it (:func:`register_policy`), in the
process that asks (every SGLang scheduler process reads the settings). A server that never names
one never imports them, and an installed copy without ``testbed/`` says where they are. (The
import is by name: ``algo/`` still imports nothing else of the package.)
"""

from __future__ import annotations

import importlib
from typing import Dict, Type

from zoomr_sglang.algo.policies import SERVED_POLICIES, Policy

_REGISTERED: Dict[str, Type[Policy]] = {cls.name: cls for cls in SERVED_POLICIES}
# name -> the testbed module that registers it
RESEARCH_POLICIES = {
    "streaming": "testbed.baselines", "sumr": "testbed.baselines", "zoomr_pages": "testbed.baselines",
    "oracle": "testbed.baselines", "random": "testbed.baselines",
    "h2o": "testbed.attention_baselines", "quest": "testbed.attention_baselines",
}
POLICY_NAMES = (*_REGISTERED, *RESEARCH_POLICIES)  # every name a setting may give


def register_policy(cls: Type[Policy]) -> Type[Policy]:
    """Class decorator: serve ``cls`` under ``cls.name``."""
    _REGISTERED[cls.name] = cls
    return cls


def policy_class(name: str) -> Type[Policy]:
    """The policy class named ``name``, its research module imported on first ask. A name that is
    no policy, or a research one whose module cannot be imported, is a ValueError that says why."""
    cls = _REGISTERED.get(name) if isinstance(name, str) else None
    if cls is not None:
        return cls
    module = RESEARCH_POLICIES.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"policy {name!r} is not allowed; allowed: {', '.join(POLICY_NAMES)}")
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"policy {name!r} is a research baseline in the zoomr-sglang repository's {module} "
                         f"(not installed with the package; run from a checkout): {error}") from error
    return _REGISTERED[name]
