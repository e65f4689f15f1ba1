"""Reasoning a new request's prompt already holds, decided when it takes its pool row.

- Inherited: the zoomr radix cache (``radix_ext``) matched a path whose thoughts it recorded; the
  request takes them over and segments from where they end.
- Pasted: the prompt holds the summary begin marker (``segment_prompt`` ``markers`` in ``ZOOMR_CONFIG``); the request
  segments it from where that reasoning starts, and SGLang's tree is kept below that point while
  the request runs, so the host tier can move the pasted thoughts like generated ones.
- Retracted: SGLang re-prefills a retracted request's earlier output as prompt; without an
  inheritance the request segments it again from where its output began, as it first did.
- Otherwise the request segments its own output only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from zoomr_sglang.algo.segmentation import prompt_reasoning_start
from zoomr_sglang.config import ZoomRConfig
from zoomr_sglang.tree_port import Inheritance


@dataclass
class PromptReasoning:
    reasoning_start: int  # the prompt before it is always attended
    segment_from: int  # first position the request segments itself
    own_from: int  # positions below may be SGLang's radix tree's: the host tier never moves them
    inheritance: Optional[Inheritance] = None

    @property
    def tree_floor(self) -> Optional[int]:
        """While the request runs, SGLang's tree may take its positions below this (None: all)."""
        return None if self.inheritance is not None else self.own_from


def prompt_reasoning(req, config: ZoomRConfig, token_texts: Sequence[str],
                     inheritance: Optional[Inheritance] = None) -> Optional[PromptReasoning]:
    """What SGLang's ``Req`` (matched, about to be prefilled) brings, with what its radix-tree
    match inherits (``inheritance``); None: nothing."""
    if inheritance is not None and inheritance.prefix_len == req.prefix_len:  # the match it was scheduled with
        prompt_len = len(req.origin_input_ids) + len(req.output_ids)
        return PromptReasoning(inheritance.reasoning_start, inheritance.resume_from, prompt_len, inheritance)
    start = None
    if config.segment_prompt == "markers":
        start = prompt_reasoning_start(req.origin_input_ids, token_texts, boundaries=config.boundaries,
                                       summary_begin=config.summary_begin)
    if start is None and req.output_ids:
        start = len(req.origin_input_ids)
    return None if start is None else PromptReasoning(start, start, max(start, req.prefix_len))
