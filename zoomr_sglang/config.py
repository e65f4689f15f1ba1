"""ZoomR settings: read once from the environment into one frozen object.

SGLang has no channel for plug-in arguments, and its scheduler runs in spawned processes that
inherit the environment, so the environment is the input. Nothing else in the package reads it.
It comes in two kinds (docs/configuration.md):

- user settings, each its own ``ZOOMR_*`` variable (``USER_VARIABLES``): the budget, the host
  tier's size, the working set's shape, the model's thought and summary markers and the layers
  that vote, what a user sets for a model and a machine;
- ``ZOOMR_CONFIG``, one JSON object holding any other field of :class:`ZoomRConfig` by name, for
  ablations and measurement, e.g. ``ZOOMR_CONFIG='{"vote": "count", "stats_history": 100000}'``.

Every bad value raises ``ValueError`` naming the variable (or the ``ZOOMR_CONFIG`` key), the value
and what is allowed; the plug-in's resolution hook calls :func:`load_config` while the server
arguments are resolved, so a bad value stops the server at start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple

from zoomr_sglang.algo.batched_votes import VOTE_KINDS
from zoomr_sglang.algo.policy_registry import policy_class
from zoomr_sglang.algo.working_set import MIN_WINDOW



@dataclass(frozen=True)
class ZoomRConfig:
    """Hyper-parameters of the method (docs/design.md); token counts are per request."""

    topk: int = 2  # k: thoughts each (layer, query head) votes for
    num_thoughts: int = 2  # c: thoughts zoomed in after the vote
    sink: int = 32  # first tokens always attended
    thought_sink: int = 16  # under a budget, first tokens of the thought being written always attended
    window: int = 256  # last tokens always attended
    max_thought_tokens: int = 512  # forced thought boundary
    boundaries: Tuple[str, ...] = ("\n\n",)
    summary_begin: str = "<|begin_of_summary|>"
    summary_end: str = "<|end_of_summary|>"
    sentence_ends: Tuple[str, ...] = (".", "?", "!", "\n")
    refresh_interval: int = 64  # at most this many tokens between two refreshes
    stats_history: int = 1024  # finished requests whose counters stay readable
    # Every this many decode steps, recompute each request's attention output with the dense
    # masked reference over the same working set and record the error (0: off; for tests/debug).
    self_check_interval: int = 0
    # Host tier for cold thoughts' KV, in GiB of host memory; None: eight device KV pools;
    # 0: off (all KV stays in SGLang's pool).
    host_pool_gb: Optional[float] = None
    zoom_cache: int = 2  # zoomed-in thoughts kept on the device after they leave the selection
    # Working-set policy and per-request budget of attended KV tokens: 0 (unbounded), a count of
    # tokens (int) or a share of the sequence (float in (0, 1)); a request may override both (see
    # RequestSettings).
    policy: str = "zoomr"
    budget: float = 0
    # How (layer, head) queries choose thoughts: "count" (the paper: each votes for its top-k by
    # q . index_key), "mass" (each adds the attention mass it gives each thought's summary, key by
    # key) or "mean_mass" (that mass estimated from the summary's mean key).
    vote: str = "mass"
    # Summary tokens a mass vote scores one by one; a longer summary's mass is scaled up from them.
    vote_summary_tokens: int = 64
    # Layers whose queries vote (empty: every layer). Layers whose heads spread their attention over
    # all summaries alike add the same to every thought and can drown the few heads that look a
    # thought up; benchmarks/vote_probe.py counts, per layer, how often each layer alone finds it.
    vote_layers: Tuple[int, ...] = ()
    # What zoomr zooms into under a budget when thoughts close without summaries (a model that
    # writes none): "pages" (pages voted by key bounds, refined to the tokens the last step attended
    # most; algo/fine_zoom.py) or "thoughts" (whole voted thoughts, as with summaries).
    implicit_zoom: str = "pages"
    # The budget of a zoomr request that has none (``budget`` 0) once its thoughts close without
    # summaries (a model that writes none), as a share of the sequence: at least its skeleton and
    # window, at most ZoomR's own bound; 0: none (whole thoughts by their bodies' mean keys). On
    # SmolLM2 0.35 kept the full cache's output as long as no budget did, with more of its attention
    # mass, working sets of 0.38 of the sequence instead of 0.62, and less on the device; 0.5 kept
    # more on the device for the same output (benchmarks/README.md, "A real pretrained model").
    implicit_budget: float = 0.35
    # When zoomr's page and token levels read the decode queries: "step" (every bounded step: the
    # tokens kept are the ones the last step attended most) or "refresh" (at refresh points only, as
    # thought votes: the steps between observe nothing, so they need no eager step and no host pass
    # over the last step's attention).
    fine_observe: str = "refresh"
    # Closed thoughts per request that can be zoomed back into; later ones are attended through
    # their summaries only. Sizes the device's candidate table and vote buffers.
    max_candidates: int = 1024
    # Index-key entries on the device (each as large as one token's K and V); 0: one per 32 tokens
    # of SGLang's KV pool, at least 1024. When they run out, new thoughts are summary-only.
    index_entries: int = 0
    # Reasoning pasted into a prompt: "markers" segments a prompt holding the summary begin marker
    # into thoughts (indexed, zoomable, tiered like generated ones); "off" keeps it all prompt.
    segment_prompt: str = "markers"
    # What SGLang's admission charges a request whose KV the host tier moves (attention_backend/
    # admission.py): "observed" (what it keeps, over-admitting with retraction as the valve),
    # "bound" (its working-set bound: never retracted for it) or "sglang" (its whole output).
    admission: str = "observed"

    def markers(self) -> Mapping[str, Tuple[str, ...]]:
        """Every configured marker string under its variable name (for tokenizer checks)."""
        return {
            "ZOOMR_BOUNDARIES": self.boundaries,
            "ZOOMR_SUMMARY_BEGIN": (self.summary_begin,),
            "ZOOMR_SUMMARY_END": (self.summary_end,),
        }

    def working_set_bound(self, prompt_len: int, summary_tokens: int) -> int:
        """Most KV tokens one decode step may attend: sinks + prompt + summaries + c zoomed-in
        thoughts' bodies + the open region (at most one thought body and one summary, each capped
        at ``max_thought_tokens``) + window."""
        open_tokens = 2 * self.max_thought_tokens
        zoomed_tokens = self.num_thoughts * self.max_thought_tokens
        return self.sink + prompt_len + summary_tokens + zoomed_tokens + open_tokens + self.window


@dataclass(frozen=True)
class _Rule:
    """What one field accepts: ``valid`` judges a ``ZOOMR_CONFIG`` value or a variable's text read by
    ``from_text`` (it may raise ValueError saying why not); ``typed`` gives the field's type."""

    allowed: str
    valid: Callable[[object], bool]
    from_text: Callable[[str], object] = str
    reads_as: str = "text"  # what ``from_text`` needs, for its error
    typed: Callable[[object], object] = lambda value: value

    def check(self, subject: str, value: object) -> object:
        """``value`` as the field holds it; ``subject`` opens the error (``NAME='value'``)."""
        try:
            if self.valid(value):
                return self.typed(value)
        except ValueError as error:
            raise ValueError(f"{subject}: {error}") from None
        raise ValueError(f"{subject} is not allowed; allowed: {self.allowed}")

    def read_text(self, name: str, raw: str) -> object:
        """Variable ``name``'s text ``raw`` as the field holds it."""
        try:
            value = self.from_text(raw)
        except ValueError:  # json.JSONDecodeError is one
            raise ValueError(f"{name}={raw!r} is not {self.reads_as}; allowed: {self.allowed}") from None
        return self.check(f"{name}={raw!r}", value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(minimum: int) -> _Rule:
    return _Rule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum,
                 from_text=lambda raw: int(raw.strip()), reads_as="an integer")


def _choice(allowed: Tuple[str, ...]) -> _Rule:
    return _Rule(", ".join(allowed), lambda v: isinstance(v, str) and v in allowed)


def _json_list(allowed: str, valid: Callable[[list], bool], typed: Callable[[list], tuple]) -> _Rule:
    return _Rule(allowed, lambda v: isinstance(v, list) and valid(v), from_text=json.loads, reads_as="valid JSON",
                 typed=typed)


SEGMENT_PROMPT_MODES = ("markers", "off")
IMPLICIT_ZOOM_UNITS = ("pages", "thoughts")
FINE_OBSERVE_POINTS = ("step", "refresh")
ADMISSION_MODES = ("observed", "bound", "sglang")
_GIGABYTES = _Rule("a number of GiB >= 0 (0 turns the host tier off)",
                   lambda v: (_is_int(v) or isinstance(v, float)) and 0 <= v < float("inf"),
                   from_text=lambda raw: float(raw.strip()), reads_as="a number", typed=float)
_TEXT = _Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
_TEXTS = _json_list('a JSON list of non-empty strings, e.g. ["\\n\\n"]',
                    lambda v: bool(v) and all(isinstance(s, str) and s for s in v), tuple)
_LAYERS = _json_list("a JSON list of distinct layer indices >= 0, e.g. [0, 1] (empty: every layer)",
                     lambda v: all(_is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v),
                     lambda v: tuple(sorted(v)))
_BUDGET = _Rule("0 (unbounded), an integer count of KV tokens, or a share of the sequence in (0, 1), e.g. 0.2",
                lambda v: _is_int(v) and v >= 0 or isinstance(v, float) and 0 < v < 1,
                from_text=json.loads, reads_as="a number")
_SHARE = _Rule("0 (none) or a share of the sequence in (0, 1), e.g. 0.5",
               lambda v: _is_int(v) and v == 0 or isinstance(v, float) and 0 < v < 1,
               from_text=json.loads, reads_as="a number")
# policy_class imports a research policy's module where its setting is read, or raises saying what is allowed.
_POLICY = _Rule("a policy name", lambda v: isinstance(v, str) and policy_class(v) is not None)

_RULES: Mapping[str, _Rule] = {
    "topk": _integer(1), "num_thoughts": _integer(0), "sink": _integer(0), "thought_sink": _integer(0),
    "window": _integer(MIN_WINDOW), "max_thought_tokens": _integer(1), "boundaries": _TEXTS,
    "summary_begin": _TEXT, "summary_end": _TEXT, "sentence_ends": _TEXTS, "refresh_interval": _integer(1),
    "stats_history": _integer(0), "self_check_interval": _integer(0), "host_pool_gb": _GIGABYTES,
    "zoom_cache": _integer(0), "policy": _POLICY, "budget": _BUDGET, "vote": _choice(VOTE_KINDS),
    "vote_summary_tokens": _integer(1), "vote_layers": _LAYERS, "implicit_zoom": _choice(IMPLICIT_ZOOM_UNITS),
    "implicit_budget": _SHARE, "fine_observe": _choice(FINE_OBSERVE_POINTS), "max_candidates": _integer(1),
    "index_entries": _integer(0), "segment_prompt": _choice(SEGMENT_PROMPT_MODES),
    "admission": _choice(ADMISSION_MODES),
}

# User settings, each its own variable; every other field is a key of ZOOMR_CONFIG.
USER_VARIABLES: Mapping[str, str] = {field: f"ZOOMR_{field.upper()}" for field in (
    "budget", "host_pool_gb", "num_thoughts", "sink", "window", "max_thought_tokens", "boundaries",
    "summary_begin", "summary_end", "vote_layers")}
CONFIG_VARIABLE = "ZOOMR_CONFIG"
CONFIG_KEYS = tuple(field for field in _RULES if field not in USER_VARIABLES)
ENV_VARS = (*USER_VARIABLES.values(), CONFIG_VARIABLE)
_CONFIG_EXAMPLE = """ZOOMR_CONFIG='{"vote": "count", "stats_history": 100000}'"""
# Variables of earlier releases, one per key that ZOOMR_CONFIG now holds.
_FORMER = {f"ZOOMR_{key.upper()}": key for key in CONFIG_KEYS}
# Variables with the prefix that belong to tooling, not to the backend.
_PASSIVE = frozenset({"ZOOMR_CACHE_DIR", "ZOOMR_VENV"})


def least_budget(config: "ZoomRConfig") -> int:
    """The fewest KV tokens a budget may give a step: the sinks and the shortest recent window."""
    return config.sink + MIN_WINDOW


def _check_budget(name: str, budget: float, config: "ZoomRConfig") -> None:
    least = least_budget(config)
    if _is_int(budget) and 0 < budget < least:
        raise ValueError(f"{name}={budget!r} is too small; allowed: 0 (unbounded), an integer >= {least}"
                         f" (ZOOMR_SINK + {MIN_WINDOW} recent tokens) or a share of the sequence in (0, 1)")


def load_config(environ: Optional[Mapping[str, str]] = None) -> ZoomRConfig:
    """Parse the ``ZOOMR_*`` variables of ``environ`` (default ``os.environ``: parsed once per
    process and set of values, then the same object, as every request's validation asks for it).

    An unknown ``ZOOMR_*`` name is an error too: a typo must not silently fall back to a default.
    """
    if environ is None:
        key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("ZOOMR_")))
        if _LOADED[0] != key:
            _LOADED[:] = [key, _parse(os.environ)]
        return _LOADED[1]
    return _parse(environ)


_LOADED: list = [None, None]  # [the ZOOMR_* items of os.environ last parsed, their config]


def variable_text(value: object) -> str:
    """A user setting's value as its variable's text: a string as it is, a number or list as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _json_or_text(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _check_names(environ: Mapping[str, str]) -> None:
    names = sorted(k for k in environ if k.startswith("ZOOMR_") and k not in ENV_VARS and k not in _PASSIVE)
    former = [name for name in names if name in _FORMER]
    if former:
        example = json.dumps({_FORMER[name]: _json_or_text(environ[name]) for name in former})
        raise ValueError(f"{', '.join(former)} {'is' if len(former) == 1 else 'are'} now set through ZOOMR_CONFIG,"
                         f" a JSON object of settings by name: ZOOMR_CONFIG='{example}'")
    if names:
        raise ValueError(f"unknown variable {names[0]}; allowed ZOOMR_* variables: {', '.join(ENV_VARS)}"
                         f" (other settings go in {_CONFIG_EXAMPLE})")


def _config_values(raw: str) -> dict:
    """The fields ``ZOOMR_CONFIG``'s text ``raw`` sets."""
    allowed = f"a JSON object of settings by name, e.g. {_CONFIG_EXAMPLE}"
    given = _json_or_text(raw)
    if not isinstance(given, dict):
        raise ValueError(f"ZOOMR_CONFIG={raw!r} is not a JSON object; allowed: {allowed}")
    values = {}
    for key, value in given.items():
        if key in USER_VARIABLES:
            raise ValueError(f"ZOOMR_CONFIG key {key!r} = {value!r} is a user setting; allowed: its own variable"
                             f" only, {USER_VARIABLES[key]}={variable_text(value)!r}")
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown ZOOMR_CONFIG key {key!r}; allowed keys: {', '.join(CONFIG_KEYS)}")
        values[key] = _RULES[key].check(f"ZOOMR_CONFIG key {key!r} = {value!r}", value)
    return values


def _parse(environ: Mapping[str, str]) -> ZoomRConfig:
    _check_names(environ)
    values = {field: _RULES[field].read_text(name, environ[name])
              for field, name in USER_VARIABLES.items() if name in environ}
    if CONFIG_VARIABLE in environ:
        values.update(_config_values(environ[CONFIG_VARIABLE]))
    if values.get("summary_begin", ZoomRConfig.summary_begin) == values.get("summary_end", ZoomRConfig.summary_end):
        raise ValueError("ZOOMR_SUMMARY_BEGIN and ZOOMR_SUMMARY_END are equal; allowed: two different strings")
    config = ZoomRConfig(**values)
    _check_budget("ZOOMR_BUDGET", config.budget, config)
    if config.policy == "oracle":
        raise ValueError("ZOOMR_CONFIG key 'policy' = 'oracle' needs each request's task dependencies; allowed as a"
                         " server default: every other policy (a request selects oracle with custom_params)")
    return config


@dataclass(frozen=True)
class RequestSettings:
    """One request's policy, budget and measurement switches: the server's defaults, overridden by
    the request's ``sampling_params.custom_params`` keys ``zoomr_policy``, ``zoomr_budget``,
    ``zoomr_vote``, ``zoomr_oracle`` (oracle policy: per thought, the earlier thoughts it reads) and
    ``zoomr_fidelity`` (measure attention-mass coverage and output error against dense attention
    at every step; keeps the request's KV out of the host tier)."""

    policy: str
    budget: float  # as ZoomRConfig.budget
    vote: str = "mass"
    oracle: Optional[Tuple[Tuple[int, ...], ...]] = None
    fidelity: bool = False


REQUEST_KEYS = ("zoomr_policy", "zoomr_budget", "zoomr_vote", "zoomr_oracle", "zoomr_fidelity")


def request_settings(config: ZoomRConfig, custom_params: Optional[Mapping[str, object]]) -> RequestSettings:
    """Resolve a request's settings; raises ValueError naming the bad key and value."""
    params = {k: v for k, v in (custom_params or {}).items() if k.startswith("zoomr_")}
    unknown = sorted(set(params) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown custom_params key {unknown[0]!r}; allowed zoomr keys: {', '.join(REQUEST_KEYS)}")
    policy = params.get("zoomr_policy", config.policy)
    policy = _POLICY.check(f"zoomr_policy={policy!r}", policy)
    budget = params.get("zoomr_budget", config.budget)
    budget = _BUDGET.check(f"zoomr_budget={budget!r}", budget)
    _check_budget("zoomr_budget", budget, config)
    vote = params.get("zoomr_vote", config.vote)
    vote = _RULES["vote"].check(f"zoomr_vote={vote!r}", vote)
    fidelity = params.get("zoomr_fidelity", False)
    if not isinstance(fidelity, bool):
        raise ValueError(f"zoomr_fidelity={fidelity!r} is not allowed; allowed: true or false")
    oracle = params.get("zoomr_oracle")
    if (oracle is None) != (policy != "oracle"):
        raise ValueError(f"zoomr_oracle is {'missing' if oracle is None else 'given'} with zoomr_policy={policy!r};"
                         " allowed: zoomr_oracle exactly when the policy is 'oracle'")
    if oracle is not None:
        if not isinstance(oracle, list) or not all(
                isinstance(d, list) and all(_is_int(i) and i >= 0 for i in d)
                for d in oracle):
            raise ValueError("zoomr_oracle is not allowed; allowed: a list (one entry per thought) of lists of"
                             " earlier thought indices >= 0")
        oracle = tuple(tuple(d) for d in oracle)
    return RequestSettings(policy=policy, budget=budget, vote=vote, oracle=oracle, fidelity=fidelity)

