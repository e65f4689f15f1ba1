"""Ingest, the first stage of a planned decode step: a request's new tokens into its segmenter,
their index-key commits, the thoughts they close and the refreshes they call for.

Tokens come from SGLang's own ``Req`` (``origin_input_ids`` + ``output_ids``); a token's meaning
for segmentation is looked up in :class:`TokenMarkers`, computed once per tokenizer. An id past the
tokenizer (models pad their embedding beyond it) reads as text with no marker.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from zoomr_sglang.algo.index_keys import IndexKeyStore
from zoomr_sglang.algo.segmentation import ThoughtSegmenter, TokenRole
from zoomr_sglang.algo.token_markers import TokenMarkers
from zoomr_sglang.attention_backend.request_state import RequestState
from zoomr_sglang.config import ZoomRConfig


class TokenIngest:
    """The tokenizer's markers and the index-key store, shared by every request's ingest."""

    def __init__(self, config: ZoomRConfig, token_texts: Sequence[str], index_keys: IndexKeyStore,
                 max_candidates: int) -> None:
        self.config, self.token_texts, self.index_keys, self.max_candidates = config, token_texts, index_keys, max_candidates
        self.token_markers = TokenMarkers(token_texts, boundaries=config.boundaries, summary_begin=config.summary_begin,
                                          summary_end=config.summary_end, sentence_ends=config.sentence_ends)
        self.refresh_tokens = refresh_token_mask(self.token_markers)
        self.token_flags, self.interval = self.token_markers.flags, config.refresh_interval  # read per token
        self.not_quiet = TokenMarkers.REFRESH | TokenMarkers.MARKER  # flags a quiet token has none of

    def segmenter(self, first_position: int) -> ThoughtSegmenter:
        """A new request's segmenter, starting at ``first_position``."""
        config = self.config
        return ThoughtSegmenter(
            self.token_texts, boundaries=config.boundaries, summary_begin=config.summary_begin,
            summary_end=config.summary_end, sentence_ends=config.sentence_ends,
            max_thought_tokens=config.max_thought_tokens, first_position=first_position,
            token_markers=self.token_markers,
        )

    def feed(self, state: RequestState, req, end: int, seq_len: int, commits: List[int], fresh: List[int],
             new_candidates: List[int]) -> bool:
        """Feed the segmenter the request's tokens up to position ``end``; their index commits and
        closed thoughts (flat into ``commits`` and ``new_candidates``) and refreshes. Returns
        whether the host asks the request to vote. (The common token, a body token of the thought
        the last one extended with nothing due, takes the first branches.)"""
        prompt, output, token_flags, interval = req.origin_input_ids, req.output_ids, self.token_flags, self.interval
        host_vote = False
        for position in range(state.fed_until, end):
            token = prompt[position] if position < len(prompt) else output[position - len(prompt)]
            flags = token_flags[token] if 0 <= token < len(token_flags) else 0  # past the tokenizer: no marker
            thought = state.segmenter.feed_quiet(flags, position)
            if thought >= 0 and thought == state.body_entry[0]:  # its key goes to that thought's body key
                commits += (state.row, position, state.body_entry[1])
                text_refresh = False  # a sentence end in it is a refresh token (TokenMarkers.REFRESH)
            else:
                text_refresh = self._settle(state, token, position, thought, commits, fresh, new_candidates)
            if text_refresh or flags & TokenMarkers.REFRESH or state.tokens_since_refresh + 1 >= interval:
                host_vote |= state.refresh(bool(flags & TokenMarkers.REFRESH), text_refresh, self.config, seq_len)
            else:  # RequestState.refresh with nothing due, written out
                state.tokens_since_refresh += 1
        state.fed_until = end
        return host_vote

    def feed_quiet(self, state: RequestState, req, end: int, entry: int, commits: List[int]) -> bool:
        """:meth:`feed` of one token (at ``end - 1``) at a position the request's ticket says its
        segmenter extends the open thought's body at (``ThoughtSegmenter.quiet_run``), whose body
        key is ``entry``, with no refresh due by the interval. True when the token is such a one
        (fed, committed); False, having changed nothing, when it refreshes or may be a marker."""
        position, prompt = end - 1, req.origin_input_ids
        token = prompt[position] if position < len(prompt) else req.output_ids[position - len(prompt)]
        flags = self.token_flags[token] if 0 <= token < len(self.token_flags) else 0
        if flags & self.not_quiet:
            return False
        state.segmenter.extend_body(flags, position)
        commits += (state.row, position, entry)
        state.tokens_since_refresh += 1
        state.fed_until = end
        return True

    def _settle(self, state: RequestState, token: int, position: int, thought: int, commits: List[int],
                fresh: List[int], new_candidates: List[int]) -> bool:
        """A token that is not a body token of the thought the last one extended: the first of a
        thought (``thought`` >= 0, taken by ``feed_quiet``: its body key is made) or one ``feed_quiet``
        left (``thought`` -1: fed through the segmenter's events). Returns whether it closed a
        thought or ended a sentence (a refresh point)."""
        row = state.row
        if thought >= 0:
            entry = state.entry(thought, TokenRole.BODY, self.index_keys, fresh)
            if entry is not None:
                state.body_entry = (thought, entry)
                commits += (row, position, entry)
            return False
        state.view_stale = True
        events = state.segmenter.feed(token, position)
        for thought, role, positions in events.commits:
            entry = state.entry(thought, role, self.index_keys, fresh)
            if entry is not None:
                for p in positions:
                    commits += (row, p, entry)
        for candidate in state.close_thoughts(events.finalized, self.index_keys, self.max_candidates):
            new_candidates += (row, *candidate)
        return events.sentence_end or bool(events.finalized)


def refresh_token_mask(token_markers: TokenMarkers) -> np.ndarray:
    """``[vocab + 1]`` bool: tokens a request refreshes its selection at the moment it decodes them
    (:attr:`TokenMarkers.REFRESH`). The last entry, False, stands for every id past the tokenizer
    (models pad their embedding beyond it): look ids up clamped to it."""
    return np.array([bool(f & TokenMarkers.REFRESH) for f in token_markers.flags] + [False], dtype=bool)
