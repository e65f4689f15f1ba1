"""ZoomR settings: read once from ``ZOOMR_*`` environment variables into one frozen object.

SGLang has no channel for plug-in arguments, and its scheduler runs in spawned processes that
inherit the environment, so the environment is the input. Nothing else in the package reads it.
Every bad value raises ``ValueError`` naming the variable, the value and what is allowed; the
plug-in's resolution hook calls :func:`load_config` while the server arguments are resolved, so
a bad value stops the server at start.
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
    # Working-set policy and per-request budget of attended KV tokens (0: unbounded); a request
    # may override both (see RequestSettings).
    policy: str = "zoomr"
    budget: int = 0
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


def _int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; allowed: an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} is too small; allowed: an integer >= {minimum}")
    return value


def _gigabytes(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; allowed: a number of GiB >= 0 (0 turns the host tier off)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} is not allowed; allowed: a number of GiB >= 0 (0 turns the host tier off)")
    return value


SEGMENT_PROMPT_MODES = ("markers", "off")
IMPLICIT_ZOOM_UNITS = ("pages", "thoughts")
ADMISSION_MODES = ("observed", "bound", "sglang")


def _choice(name: str, raw: object, allowed: Tuple[str, ...]) -> str:
    if raw not in allowed:
        raise ValueError(f"{name}={raw!r} is not allowed; allowed: {', '.join(allowed)}")
    return raw


def _policy(name: str, raw: object) -> str:
    try:
        policy_class(raw)  # a research policy's module is imported here, where its setting is read
    except ValueError as error:
        raise ValueError(f"{name}={raw!r}: {error}") from None
    return raw


def _check_budget(name: str, budget: int, config: "ZoomRConfig") -> None:
    least = config.sink + MIN_WINDOW
    if budget and budget < least:
        raise ValueError(f"{name}={budget!r} is too small; allowed: 0 (unbounded) or an integer >= {least}"
                         f" (ZOOMR_SINK + {MIN_WINDOW} recent tokens)")


def _text(name: str, raw: str) -> str:
    if not raw:
        raise ValueError(f"{name}={raw!r} is empty; allowed: a non-empty string")
    return raw


def _json_list(name: str, raw: str, allowed: str, valid: Callable[[list], bool]) -> list:
    """``raw`` parsed as a JSON list that ``valid`` accepts."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{name}={raw!r} is not valid JSON; allowed: {allowed}") from None
    if not isinstance(value, list) or not valid(value):
        raise ValueError(f"{name}={raw!r} is not allowed; allowed: {allowed}")
    return value


def _layer_list(name: str, raw: str) -> Tuple[int, ...]:
    value = _json_list(name, raw, "a JSON list of distinct layer indices >= 0, e.g. [0, 1] (empty: every layer)",
                       lambda v: all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
                       and len(set(v)) == len(v))
    return tuple(sorted(value))


def _text_list(name: str, raw: str) -> Tuple[str, ...]:
    return tuple(_json_list(name, raw, 'a JSON list of non-empty strings, e.g. ["\\n\\n"]',
                            lambda v: bool(v) and all(isinstance(s, str) and s for s in v)))


_FIELDS: Mapping[str, Tuple[str, Callable[[str, str], object]]] = {
    "ZOOMR_TOPK": ("topk", lambda n, r: _int(n, r, 1)),
    "ZOOMR_NUM_THOUGHTS": ("num_thoughts", lambda n, r: _int(n, r, 0)),
    "ZOOMR_SINK": ("sink", lambda n, r: _int(n, r, 0)),
    "ZOOMR_THOUGHT_SINK": ("thought_sink", lambda n, r: _int(n, r, 0)),
    "ZOOMR_WINDOW": ("window", lambda n, r: _int(n, r, MIN_WINDOW)),
    "ZOOMR_MAX_THOUGHT_TOKENS": ("max_thought_tokens", lambda n, r: _int(n, r, 1)),
    "ZOOMR_BOUNDARIES": ("boundaries", _text_list),
    "ZOOMR_SUMMARY_BEGIN": ("summary_begin", _text),
    "ZOOMR_SUMMARY_END": ("summary_end", _text),
    "ZOOMR_SENTENCE_ENDS": ("sentence_ends", _text_list),
    "ZOOMR_REFRESH_INTERVAL": ("refresh_interval", lambda n, r: _int(n, r, 1)),
    "ZOOMR_STATS_HISTORY": ("stats_history", lambda n, r: _int(n, r, 0)),
    "ZOOMR_SELF_CHECK_INTERVAL": ("self_check_interval", lambda n, r: _int(n, r, 0)),
    "ZOOMR_HOST_POOL_GB": ("host_pool_gb", _gigabytes),
    "ZOOMR_ZOOM_CACHE": ("zoom_cache", lambda n, r: _int(n, r, 0)),
    "ZOOMR_POLICY": ("policy", lambda n, r: _policy(n, r)),
    "ZOOMR_BUDGET": ("budget", lambda n, r: _int(n, r, 0)),
    "ZOOMR_VOTE": ("vote", lambda n, r: _choice(n, r, VOTE_KINDS)),
    "ZOOMR_VOTE_SUMMARY_TOKENS": ("vote_summary_tokens", lambda n, r: _int(n, r, 1)),
    "ZOOMR_VOTE_LAYERS": ("vote_layers", _layer_list),
    "ZOOMR_IMPLICIT_ZOOM": ("implicit_zoom", lambda n, r: _choice(n, r, IMPLICIT_ZOOM_UNITS)),
    "ZOOMR_MAX_CANDIDATES": ("max_candidates", lambda n, r: _int(n, r, 1)),
    "ZOOMR_INDEX_ENTRIES": ("index_entries", lambda n, r: _int(n, r, 0)),
    "ZOOMR_SEGMENT_PROMPT": ("segment_prompt", lambda n, r: _choice(n, r, SEGMENT_PROMPT_MODES)),
    "ZOOMR_ADMISSION": ("admission", lambda n, r: _choice(n, r, ADMISSION_MODES)),
}

ENV_VARS = tuple(_FIELDS)


def load_config(environ: Optional[Mapping[str, str]] = None) -> ZoomRConfig:
    """Parse every ``ZOOMR_*`` variable of ``environ`` (default ``os.environ``: parsed once per
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


def _parse(environ: Mapping[str, str]) -> ZoomRConfig:
    unknown = sorted(k for k in environ if k.startswith("ZOOMR_") and k not in _FIELDS and k not in _PASSIVE)
    if unknown:
        raise ValueError(f"unknown variable {unknown[0]}; allowed ZOOMR_* variables: {', '.join(ENV_VARS)}")
    values = {}
    for name, (field, parse) in _FIELDS.items():
        if name in environ:
            values[field] = parse(name, environ[name])
    if values.get("summary_begin", ZoomRConfig.summary_begin) == values.get("summary_end", ZoomRConfig.summary_end):
        raise ValueError("ZOOMR_SUMMARY_BEGIN and ZOOMR_SUMMARY_END are equal; allowed: two different strings")
    config = ZoomRConfig(**values)
    _check_budget("ZOOMR_BUDGET", config.budget, config)
    if config.policy == "oracle":
        raise ValueError("ZOOMR_POLICY='oracle' needs each request's task dependencies; allowed as a server"
                         " default: every other policy (a request selects oracle with custom_params)")
    return config


@dataclass(frozen=True)
class RequestSettings:
    """One request's policy, budget and measurement switches: the server's defaults, overridden by
    the request's ``sampling_params.custom_params`` keys ``zoomr_policy``, ``zoomr_budget``,
    ``zoomr_vote``, ``zoomr_oracle`` (oracle policy: per thought, the earlier thoughts it reads) and
    ``zoomr_fidelity`` (measure attention-mass coverage and output error against dense attention
    at every step; keeps the request's KV out of the host tier)."""

    policy: str
    budget: int
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
    policy = _policy("zoomr_policy", params.get("zoomr_policy", config.policy))
    budget = params.get("zoomr_budget", config.budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"zoomr_budget={budget!r} is not allowed; allowed: an integer >= 0 (0: unbounded)")
    _check_budget("zoomr_budget", budget, config)
    vote = _choice("zoomr_vote", params.get("zoomr_vote", config.vote), VOTE_KINDS)
    fidelity = params.get("zoomr_fidelity", False)
    if not isinstance(fidelity, bool):
        raise ValueError(f"zoomr_fidelity={fidelity!r} is not allowed; allowed: true or false")
    oracle = params.get("zoomr_oracle")
    if (oracle is None) != (policy != "oracle"):
        raise ValueError(f"zoomr_oracle is {'missing' if oracle is None else 'given'} with zoomr_policy={policy!r};"
                         " allowed: zoomr_oracle exactly when the policy is 'oracle'")
    if oracle is not None:
        if not isinstance(oracle, list) or not all(
                isinstance(d, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in d)
                for d in oracle):
            raise ValueError("zoomr_oracle is not allowed; allowed: a list (one entry per thought) of lists of"
                             " earlier thought indices >= 0")
        oracle = tuple(tuple(d) for d in oracle)
    return RequestSettings(policy=policy, budget=budget, vote=vote, oracle=oracle, fidelity=fidelity)


# Variables with the prefix that belong to tooling, not to the backend.
_PASSIVE = frozenset({"ZOOMR_CACHE_DIR"})
