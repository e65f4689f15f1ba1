"""ZoomR's aggregate counters on SGLang's Prometheus ``/metrics`` (with ``--enable-metrics``).

Named in SGLang's style (``sglang:`` prefix, SGLang's labels) and updated each time SGLang's
scheduler logs its own stats (a hook AFTER ``SchedulerMetricsCollector.log_stats``), in the
scheduler process, through SGLang's multiprocess Prometheus directory. Gauges are levels; counters
(exported with ``_total``) grow by what changed since the last update.
"""

from __future__ import annotations

from typing import Dict

from zoomr_sglang.runtime import attached

GAUGES = {
    "sglang:zoomr_resident_tokens": "Device-resident KV tokens of the running zoomr requests at their last step.",
    "sglang:zoomr_host_tier_tokens": "Tokens in zoomr's host tier (running requests and the zoomr radix cache).",
}
COUNTERS = {
    "sglang:zoomr_evicted_tokens": "Tokens whose device slots the host tier gave back to SGLang's pool.",
    "sglang:zoomr_zoomed_in_tokens": "Tokens copied back from the host tier (zoom-ins).",
    "sglang:zoomr_copied_bytes": "Bytes copied between the device KV pool and the host tier.",
    "sglang:zoomr_host_tier_full": "Thoughts that stayed on the device because the host tier was full.",
    "sglang:zoomr_zoom_in_failures": "Zoom-ins the device pool could not serve at once (retried next step).",
    "sglang:zoomr_copy_failures": "Copies to or from the host tier that failed (that request kept its KV).",
    "sglang:zoomr_over_bound_steps": "Request decode steps that attended more than their bound.",
    "sglang:zoomr_index_entries_reused": "Index keys taken from the zoomr radix cache instead of recomputed.",
}


class ZoomRMetrics:
    def __init__(self, labels: Dict[str, str]) -> None:
        from prometheus_client import Counter, Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self.labels = labels
        self.gauges = {name: Gauge(name=name, documentation=doc, labelnames=list(labels), multiprocess_mode="mostrecent")
                       for name, doc in GAUGES.items()}
        self.counters = {name: Counter(name=name, documentation=doc, labelnames=list(labels))
                         for name, doc in COUNTERS.items()}
        self.last: Dict[str, float] = {name: 0 for name in COUNTERS}
        for counter in self.counters.values():
            counter.labels(**labels)  # exported from the start, at 0

    def update(self, values: Dict[str, float]) -> None:
        for name, gauge in self.gauges.items():
            gauge.labels(**self.labels).set(values[name])
        for name, counter in self.counters.items():
            if values[name] > self.last[name]:
                counter.labels(**self.labels).inc(values[name] - self.last[name])
                self.last[name] = values[name]


def after_log_stats(result, collector, *args, **kwargs):
    for runtime in attached():
        if runtime.metrics is None:
            runtime.metrics = ZoomRMetrics(dict(collector.labels))
        runtime.metrics.update(runtime.controller.metric_values())
    return result
