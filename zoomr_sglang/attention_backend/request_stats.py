"""The counters of one running request, readable through SGLang's server info."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional


@dataclass(slots=True)
class RequestStats:
    """Counters of one request, readable through SGLang's server info (``internal_states``)."""

    rid: Optional[str]
    prompt_len: int
    policy: str = "zoomr"
    budget: float = 0  # as RequestSettings.budget
    steps: int = 0
    attended_last: int = 0
    attended_max: int = 0
    attended_total: int = 0
    dense_last: int = 0
    dense_total: int = 0
    bound_last: int = 0
    over_bound_steps: int = 0  # steps over the bound: ZoomR's (must stay 0) or the budget's
    refreshes: int = 0
    votes_held: int = 0
    selection_changes: int = 0
    thoughts_closed: int = 0
    summaries: int = 0
    agreement_sum: float = 0.0  # count votes only: share of votes that landed in the chosen thoughts
    agreement_votes: int = 0
    inherited_thoughts: int = 0  # closed thoughts taken over from the radix tree (zoomr tree)
    inherited_keys: int = 0  # of those, with an index key (entries reused, not recomputed)
    resident_last: int = 0  # KV slots the request holds on the device at its last step (page bounds too)
    resident_max: int = 0
    offloaded_last: int = 0  # its tokens whose device slots were given back (in the host tier only)
    self_checks: int = 0  # (step, layer) outputs compared with the dense masked reference
    self_check_max_error: float = 0.0
    zoomed: List[int] = field(default_factory=list)
    zoom_history: List[List[int]] = field(default_factory=list)  # each distinct selection, in order
    zoom_steps: List[int] = field(default_factory=list)  # the decode step each of them took effect at
    # zoomr_fidelity: per layer, sums over steps of the share of dense attention probability mass
    # inside the working set and of the relative error of the output against dense attention.
    fidelity_steps: int = 0
    fidelity_mass_sum: List[float] = field(default_factory=list)
    fidelity_error_sum: List[float] = field(default_factory=list)
    fidelity_step_mass: List[float] = field(default_factory=list)  # per decode step, summed over layers
    # Per decode step, the least mass any (layer, query head) kept: low when one head's target is gone.
    fidelity_step_min_head: List[float] = field(default_factory=list)

    def add_fidelity(self, layer_id: int, mass: float, rel_error: float, min_head_mass: float) -> None:
        while len(self.fidelity_mass_sum) <= layer_id:
            self.fidelity_mass_sum.append(0.0)
            self.fidelity_error_sum.append(0.0)
        self.fidelity_mass_sum[layer_id] += mass
        self.fidelity_error_sum[layer_id] += rel_error
        self.fidelity_steps += layer_id == 0
        if layer_id == 0:
            self.fidelity_step_mass.append(0.0)
            self.fidelity_step_min_head.append(1.0)
        self.fidelity_step_mass[-1] += mass
        self.fidelity_step_min_head[-1] = min(self.fidelity_step_min_head[-1], min_head_mass)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["agreement_mean"] = self.agreement_sum / self.agreement_votes if self.agreement_votes else None
        out["resident_fraction"] = self.attended_total / self.dense_total if self.dense_total else None
        if self.fidelity_steps:
            out["fidelity"] = {
                "steps": self.fidelity_steps,
                "mass": [m / self.fidelity_steps for m in self.fidelity_mass_sum],
                "rel_error": [e / self.fidelity_steps for e in self.fidelity_error_sum],
                "step_mass": [m / len(self.fidelity_mass_sum) for m in self.fidelity_step_mass],  # mean over layers
                "step_min_head_mass": list(self.fidelity_step_min_head),
            }
        return out
