"""The load ``serving.py`` sends and what it reads back: prompts that hold a reasoning trace,
streamed ``/generate`` requests, SGLang's own gauges sampled while they run, and the numbers a
cell reports.

A random-weight model writes no blank line, summary or sentence end, so the context is given to it:
every prompt is a question followed by thoughts (``BODY_TOKENS`` word ids, a blank line, a
``SUMMARY_TOKENS``-token summary between the markers, a blank line) up to the cell's context, ending
inside an open thought that the output continues. ZoomR cuts such a prompt into thoughts like its
own output (``segment_prompt`` ``markers`` in ``ZOOMR_CONFIG``): indexed, voted on, moved to the host tier and back.
Both servers receive the same token ids; nothing runs in either server for the benchmark's sake.
"""

from __future__ import annotations

import bisect
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import requests

from serving_presets import BODY_TOKENS, QUESTION_TOKENS, SUMMARY_TOKENS
from servers import parse_metrics

GAUGES = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput",
          "sglang:zoomr_resident_tokens", "sglang:zoomr_host_tier_tokens")


@dataclass(frozen=True)
class Vocabulary:
    """Token ids of a shaped model (``testbed/shaped_model.py``): the markers, and the word ids
    ``[first_word, size)`` that hold no marker, sentence end or blank line."""

    bos: int
    blank: int
    summary_begin: int
    summary_end: int
    first_word: int
    size: int


def vocabulary(model_path: str) -> Vocabulary:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    names = {"bos": "<s>", "blank": "\n\n", "summary_begin": "<|begin_of_summary|>", "summary_end": "<|end_of_summary|>"}
    ids = {key: tokenizer.token_to_id(token) for key, token in names.items()}
    if None in ids.values():
        raise SystemExit(f"{model_path}: not a shaped model (testbed/shaped_model.py); its tokenizer lacks "
                         f"{[names[k] for k, v in ids.items() if v is None]}")
    size = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    return Vocabulary(**ids, first_word=max(ids.values()) + 1, size=size)


def reasoning_prompt(context: int, seed: str, vocab: Vocabulary) -> List[int]:
    """``context`` token ids: BOS and a question, whole thoughts, and the open thought's first words."""
    rng = random.Random(seed)

    def words(n: int) -> List[int]:
        return [rng.randrange(vocab.first_word, vocab.size) for _ in range(n)]

    ids = [vocab.bos] + words(QUESTION_TOKENS - 1)
    thought = BODY_TOKENS + SUMMARY_TOKENS + 4
    while len(ids) + thought <= context:
        ids += words(BODY_TOKENS) + [vocab.blank, vocab.summary_begin] + words(SUMMARY_TOKENS) + [vocab.summary_end, vocab.blank]
    return ids + words(context - len(ids))


# -- streamed requests -----------------------------------------------------------------------------
@dataclass
class Stream:
    """One streamed request: when it was sent, and each chunk's arrival with the output tokens so far."""

    rid: str
    sent: float
    times: List[float] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)

    def tokens_at(self, t: float) -> int:
        return self.tokens[bisect.bisect_right(self.times, t) - 1] if self.times and t >= self.times[0] else 0


def stream_generate(url: str, rid: str, input_ids: List[int], params: dict, deadline: float) -> Stream:
    """POST a streamed ``/generate``; raises if the server reports an error or ``deadline`` passes."""
    stream = Stream(rid=rid, sent=time.perf_counter())
    body = {"rid": rid, "input_ids": input_ids, "sampling_params": params, "stream": True}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=max(1.0, deadline - time.time())) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if time.time() > deadline:
                raise TimeoutError(f"{rid}: past the time budget after {stream.tokens[-1:] or [0]} output tokens")
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{rid}: {chunk['error']}")
            stream.times.append(time.perf_counter())
            stream.tokens.append(chunk["meta_info"]["completion_tokens"])
    return stream


class GaugeSampler:
    """SGLang's Prometheus gauges (``GAUGES``), read every ``interval`` seconds in a thread."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        self.url, self.interval = url, interval
        self.samples: List[Dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = requests.get(f"{self.url}/metrics", timeout=5).text
                self.samples.append(parse_metrics(text, GAUGES))
            except requests.RequestException:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "GaugeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, name: str) -> Optional[float]:
        values = [s[name] for s in self.samples if name in s]
        return None if not values else int(max(values)) if name.startswith("sglang:num_") else max(values)


def run_requests(url: str, rids: Sequence[str], prompts: Sequence[List[int]], output_len: int,
                 deadline: float) -> tuple:
    """Send every prompt at once (greedy, ``ignore_eos``, ``output_len`` tokens each), streamed;
    ``(streams, sampler)`` once all finished. Raises if one failed or gave a short output."""
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    with GaugeSampler(url) as sampler, ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(stream_generate, url, rid, ids, params, deadline) for rid, ids in zip(rids, prompts)]
        streams = [f.result() for f in futures]
    short = [(s.rid, s.tokens[-1:]) for s in streams if s.tokens[-1:] != [output_len]]
    if short:
        raise RuntimeError(f"requests ended short of {output_len} output tokens: {short[:4]}")
    return streams, sampler


def generate(url: str, prompts: List[List[int]], max_new_tokens: int, rids: List[str], deadline: float,
             policy: Optional[str] = None) -> List[List[int]]:
    """Greedy output ids of ``prompts`` in one batch (zoomr's ``policy`` if given)."""
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    if policy is not None:
        params["custom_params"] = {"zoomr_policy": policy}
    reply = requests.post(f"{url}/generate", json={"input_ids": prompts, "rid": rids, "sampling_params": params},
                          timeout=max(1.0, deadline - time.time()))
    reply.raise_for_status()
    return [out["output_ids"] for out in reply.json()]


# -- what a cell reports ---------------------------------------------------------------------------
def cell_stats(streams: Sequence[Stream]) -> dict:
    """Output tokens/s of a cell's requests, sent at once:

    - ``output_throughput``: while every request was decoding (from the last first token to the
      first finish), the output tokens all of them received per second; None when that window is
      empty (the server never ran them all at once);
    - ``e2e_output_throughput``: all output tokens over the whole cell, prefill and queueing included;
    - ``peak_decoding``: the most requests between their first and last token at any time.
    """
    first = [s.times[0] for s in streams]
    last = [s.times[-1] for s in streams]
    began = min(s.sent for s in streams)
    total = sum(s.tokens[-1] for s in streams)
    window_start, window_end = max(first), min(last)
    steady = None
    if window_end > window_start:
        in_window = sum(s.tokens_at(window_end) - s.tokens_at(window_start) for s in streams)
        steady = in_window / (window_end - window_start)
    events = sorted([(t, 1) for t in first] + [(t, -1) for t in last], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    tpot = [(b - a) / (s.tokens[-1] - 1) for s, a, b in zip(streams, first, last) if s.tokens[-1] > 1]
    return {
        "output_throughput": None if steady is None else round(steady, 2),
        "steady_seconds": round(max(0.0, window_end - window_start), 2),
        "e2e_output_throughput": round(total / (max(last) - began), 2),
        "seconds": round(max(last) - began, 2),
        "prefill_seconds": round(window_start - began, 2),  # to the last first token
        "output_tokens": total,
        "peak_decoding": peak,
        "mean_ttft_s": round(statistics.fmean(a - s.sent for s, a in zip(streams, first)), 3),
        "median_tpot_ms": round(1000 * statistics.median(tpot), 3) if tpot else None,
    }


ACTIVITY_SUMS = ("steps", "refreshes", "votes_held", "selection_changes", "thoughts_closed", "summaries",
                 "self_checks", "attended_total", "dense_total")


def zoomr_activity(state: Optional[dict], rids: Sequence[str], before: Optional[dict]) -> Optional[dict]:
    """What zoomr did for ``rids`` (finished): summed per-request counters, the largest device
    residency, and the server's bulk commits and host-tier moves since the state ``before``;
    None from a dense server."""
    if state is None:
        return None
    before = before or {}
    finished = [state["finished"][rid] for rid in rids if rid in state["finished"]]
    activity = {key: sum(f[key] for f in finished) for key in ACTIVITY_SUMS}
    activity.update(requests_seen=len(finished), resident_max=max((f["resident_max"] for f in finished), default=0),
                    self_check_max_error=max((f["self_check_max_error"] for f in finished), default=0.0),
                    **{key: state[key] - before.get(key, 0) for key in ("commits_bulk", "over_bound_steps")})
    tier = state.get("host_tier")
    if tier is not None:
        activity["host_tier"] = {key: value - (before.get("host_tier") or {}).get(key, 0) for key, value in tier.items()
                                 if key not in ("capacity_tokens", "used_tokens")}
        activity["host_tier"].update(capacity_tokens=tier["capacity_tokens"], used_tokens=tier["used_tokens"])
    return activity
