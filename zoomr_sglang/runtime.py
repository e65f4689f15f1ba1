"""The decode runtime registry: which zoomr backend, if any, decodes from a ``ReqToTokenPool``.

The backend factory attaches one :class:`DecodeRuntime` per pool when it builds zoomr as the decode
backend (the plug-in refuses zoomr for prefill alone, so a pool that only zoomr prefills never gets
one). Everything else finds it with :func:`runtime_of`, from the pool that the SGLang object it is
handed already holds (scheduler, tree cache, batch, model runner, prefill budget's tree); a pool
without one answers None and every hook then leaves SGLang alone.

Light on purpose: ``plugin.py`` imports it when SGLang loads the plug-in, before torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    from zoomr_sglang.attention_backend.controller import ZoomRController
    from zoomr_sglang.metrics import ZoomRMetrics
    from zoomr_sglang.tree_port import TreePort


@dataclass(eq=False)
class DecodeRuntime:
    """What one zoomr decode backend shares with the plug-in's hooks, its pool's radix tree and
    the metrics exporter. Per-request state is the controller's (docs/design.md, "Who holds what")."""

    controller: "ZoomRController"
    metrics: Optional["ZoomRMetrics"] = None  # made at SGLang's first stats log (metrics.py)

    @property
    def tree_port(self) -> "TreePort":
        """The backend as the zoomr radix tree of this pool sees it."""
        return self.controller


# ReqToTokenPool -> its runtime, by identity. An entry lasts as long as the process: its controller
# holds the pool, and SGLang keeps one pool per scheduler for the scheduler's whole life.
_RUNTIMES: Dict[object, DecodeRuntime] = {}


def attach(req_to_token_pool, controller: "ZoomRController") -> DecodeRuntime:
    """Record ``controller`` as the zoomr decode backend of ``req_to_token_pool``."""
    runtime = _RUNTIMES[req_to_token_pool] = DecodeRuntime(controller)
    return runtime


def runtime_of(req_to_token_pool) -> Optional[DecodeRuntime]:
    """The zoomr decode runtime reading ``req_to_token_pool`` (None: zoomr does not decode from it)."""
    return None if req_to_token_pool is None else _RUNTIMES.get(req_to_token_pool)


def attached() -> List[DecodeRuntime]:
    """Every runtime of this process (one per scheduler; the metrics hook has no pool to ask with)."""
    return list(_RUNTIMES.values())
