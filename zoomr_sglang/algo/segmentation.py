"""Cut a request's generated tokens into thoughts and their summaries.

Markers are matched on decoded token text, not token ids, so a marker split over several
tokens ("\\n" + "\\n") or hidden inside one token (".\\n\\nThe") is still found. Positions are
assigned whole: a token belongs to exactly one thought's body or summary span. Most tokens can take
no part in any marker: :class:`TokenMarkers` knows them by id, and the segmenter settles them
without string work.
"""

import bisect
import enum
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from zoomr_sglang.algo.token_markers import TokenMarkers


class TokenRole(enum.Enum):
    """Which index key of a thought a token's key is added to."""

    BODY = "body"  # the thought's own tokens (implicit summary key)
    SUMMARY = "summary"  # summary content tokens (between the markers, markers excluded)

    # Members are singletons: hash by identity in C (Enum's own hashes the name in Python), as
    # (thought, role) keys are looked up for every decoded token.
    __hash__ = object.__hash__


@dataclass
class Thought:
    """One thought of a request; positions are absolute sequence positions."""

    index: int  # ordinal within the request, 0, 1, 2, ...
    start: int  # first position of the thought body
    body_end: int  # one past the last body position (grows while open)
    summary_start: Optional[int] = None  # position of the first token of the begin marker
    summary_end: Optional[int] = None  # one past the token that completed the end marker
    # The summary's content: its SUMMARY-role positions [content_start, content_end), contiguous
    # (between the markers); None while no content token was committed.
    content_start: Optional[int] = None
    content_end: Optional[int] = None
    final: bool = False  # closed: a candidate for voting, its key will not change any more

    @property
    def has_summary_content(self) -> bool:
        return self.content_start is not None

    def span_end(self) -> int:
        """One past the last position the thought owns."""
        return self.summary_end if self.summary_end is not None else self.body_end


@dataclass(slots=True)
class SegmentEvents:
    """What one `ThoughtSegmenter.feed` call changed."""

    # (thought index, role, positions) whose keys must now be added to that key; positions ascending
    commits: list[tuple[int, TokenRole, list[int]]] = field(default_factory=list)
    finalized: list[int] = field(default_factory=list)  # thoughts that became final, ascending
    sentence_end: bool = False  # the fed token's text contains one of sentence_ends


def key_role(thought: Thought) -> TokenRole:
    """The key that indexes a thought: its summary's if the summary had content, else its body's."""
    return TokenRole.SUMMARY if thought.has_summary_content else TokenRole.BODY


def summary_span(thought: Thought) -> tuple[int, int]:
    """``(first position, length)`` of the summary content a mass vote scores; ``(0, 0)`` without one."""
    if not thought.has_summary_content:
        return 0, 0
    return thought.content_start, thought.content_end - thought.content_start


class _State(enum.Enum):
    BODY = "body"  # writing the open thought's body (or no thought open yet)
    AWAIT = "await"  # the open thought's body ended; a summary may follow
    SUMMARY = "summary"  # writing the open thought's summary


@dataclass
class _Pending:
    position: int
    text: str
    offset: int  # where `text` starts in the concatenated pending text

    def end(self) -> int:
        return self.offset + len(self.text)


def _is_blank(text: str) -> bool:
    return not text.strip()


class ThoughtSegmenter:
    """Incremental segmenter for one request; `feed` it every generated token in order.

    States: BODY (writing the open thought, or none open yet), AWAIT (the open thought's body
    ended at a boundary or the cap; a summary may follow), SUMMARY (writing its summary). Tokens
    that may still be part of a marker wait in `_pending` until the marker completes or fails.
    """

    def __init__(
        self,
        token_texts: Sequence[str],
        *,
        boundaries: Sequence[str],
        summary_begin: str,
        summary_end: str,
        sentence_ends: Sequence[str],
        max_thought_tokens: int,
        first_position: int,
        token_markers: Optional[TokenMarkers] = None,
    ):
        """``token_markers``: built from the same ``token_texts`` and markers (shared by every
        request of one tokenizer); None builds them here."""
        named_markers = [(f"boundaries[{i}]", m) for i, m in enumerate(boundaries)]
        named_markers += [(f"sentence_ends[{i}]", m) for i, m in enumerate(sentence_ends)]
        named_markers += [("summary_begin", summary_begin), ("summary_end", summary_end)]
        for name, marker in named_markers:
            if not isinstance(marker, str) or not marker:
                raise ValueError(f"{name} must be a non-empty string, got {marker!r}")
        if max_thought_tokens < 1:
            raise ValueError(f"max_thought_tokens must be >= 1, got {max_thought_tokens}")
        if first_position < 0:
            raise ValueError(f"first_position must be >= 0, got {first_position}")
        settings = (tuple(boundaries), summary_begin, summary_end, tuple(sentence_ends))
        if token_markers is None:
            token_markers = TokenMarkers(token_texts, boundaries=boundaries, summary_begin=summary_begin,
                                         summary_end=summary_end, sentence_ends=sentence_ends)
        elif token_markers.texts is not token_texts or token_markers.settings != settings:
            raise ValueError("token_markers must be built from these token_texts and markers")
        self._vocab = token_markers
        self._boundaries = tuple(boundaries)
        self._summary_begin = summary_begin
        self._summary_end = summary_end
        self._max_tokens = max_thought_tokens
        self._first_position = first_position
        self._next_position = first_position
        self.thoughts: list[Thought] = []
        self._state = _State.BODY
        # The one non-final thought (cur in BODY/SUMMARY, prev in AWAIT); thoughts finalize in
        # order, so it is always thoughts[-1] when set.
        self._open: Optional[Thought] = None
        self._open_nonblank = False  # the open thought's body has non-whitespace text
        self._pending: list[_Pending] = []

    def quiet_run(self) -> Tuple[int, int]:
        """``(thought, limit)``: until anything else is fed, a token at the next position ``p <
        limit`` whose flags hold no :attr:`TokenMarkers.MARKER` extends thought ``thought``'s body
        and changes nothing else, and :meth:`extend_body` feeds it so; ``(-1, -1)`` when no token
        would (a marker may be pending, no thought is open, or its body is at its cap)."""
        thought = self._open
        if thought is None or self._state is not _State.BODY or self._pending:
            return -1, -1
        return thought.index, thought.start + self._max_tokens - 1

    def extend_body(self, flags: int, position: int) -> None:
        """:meth:`feed_quiet` of a token the caller knows :meth:`quiet_run` admits (no check: the
        caller's promise)."""
        self._next_position = self._open.body_end = position + 1
        if flags & TokenMarkers.NONBLANK:
            self._open_nonblank = True

    def open_from(self) -> int:
        """Smallest position not inside a final thought's span; all later positions stay attended."""
        if self._open is not None:
            return self._open.start
        return self.thoughts[-1].span_end() if self.thoughts else self._first_position

    def feed(self, token_id: int, position: int) -> SegmentEvents:
        """Take the token generated at `position` and report the keys and thoughts it settled."""
        if position != self._next_position:
            raise ValueError(f"position must be {self._next_position} (consecutive), got {position}")
        self._next_position += 1
        vocab = self._vocab
        flags = vocab.flags_of(token_id)
        events = SegmentEvents(sentence_end=bool(flags & TokenMarkers.SENTENCE_END))
        text = vocab.text_of(token_id)  # an id past the tokenizer: empty
        if not self._pending and not flags & TokenMarkers.MARKER:
            # Nothing waits to complete a marker and this text can be no part of one: what the
            # marker search would conclude, without it.
            self._assign(position, text, text, events)
        else:
            offset = self._pending[-1].end() if self._pending else 0
            self._pending.append(_Pending(position, text, offset))
            while self._complete_marker(events):
                pass
        if self._state is _State.SUMMARY:
            self._cap_summary(position, events)
        return events

    def feed_quiet(self, flags: int, position: int) -> int:
        """:meth:`feed` for the common token, with nothing to report but one commit: one that takes
        no part in a marker, extending the open thought's body while nothing waits. ``flags``: the
        token's :meth:`TokenMarkers.flags_of` (the caller looked them up already). Returns that
        thought's index (the position's key goes to its BODY key); -1 when the token is not such a
        one, and then nothing was done: :meth:`feed` it. No events are made: the caller reads a
        sentence end from the flags."""
        thought = self._open
        if (flags & TokenMarkers.MARKER or thought is None or self._state is not _State.BODY or self._pending
                or position != self._next_position):
            return -1
        self.extend_body(flags, position)
        if position + 1 - thought.start >= self._max_tokens:
            self._state = _State.AWAIT  # the cap, as in _grow_body
        return thought.index

    # --- marker matching -------------------------------------------------------------------

    def _active_markers(self) -> tuple[str, ...]:
        if self._state is _State.SUMMARY:
            return (self._summary_end,)
        return (self._summary_begin, *self._boundaries)

    def _complete_marker(self, events: SegmentEvents) -> bool:
        """Handle the earliest-ending complete marker in the pending text; False when none."""
        text = "".join(p.text for p in self._pending)
        best: Optional[tuple[int, int, str]] = None  # (start, end, marker)
        for marker in self._active_markers():
            start = text.find(marker)
            if start < 0:
                continue
            end = start + len(marker)
            if best is None or (end, -len(marker)) < (best[1], -len(best[2])):
                best = (start, end, marker)
        if best is None:
            self._flush_unambiguous(text, events)
            return False
        start, end, marker = best
        # Whole tokens up to the one holding the marker's last character; text after the marker
        # inside that token is not searched again (a position cannot be split between roles).
        taken = self._take(next(i for i, p in enumerate(self._pending) if p.end() >= end) + 1)
        if self._state is _State.SUMMARY:
            self._end_summary(taken, start, events)
        elif marker == self._summary_begin:
            self._begin_summary(taken, start, events)
        else:
            self._complete_boundary(taken, start, events)
        return True

    def _flush_unambiguous(self, text: str, events: SegmentEvents) -> None:
        """Assign the pending tokens that cannot be part of a marker that is still being written."""
        markers = self._active_markers()
        longest = max(len(m) for m in markers)
        keep_from = len(text)
        for length in range(min(len(text), longest - 1), 0, -1):
            suffix = text[-length:]
            if any(len(m) > length and m.startswith(suffix) for m in markers):
                keep_from = len(text) - length
                break
        for p in self._take(sum(1 for p in self._pending if p.end() <= keep_from)):
            self._assign(p.position, p.text, p.text, events)

    def _take(self, count: int) -> list[_Pending]:
        """Remove the first `count` pending tokens; the rest are re-based to offset 0."""
        taken, self._pending = self._pending[:count], self._pending[count:]
        base = self._pending[0].offset if self._pending else 0
        for p in self._pending:
            p.offset -= base
        return taken

    # --- state transitions -----------------------------------------------------------------

    def _assign(self, position: int, text: str, counted_text: str, events: SegmentEvents) -> None:
        """Give one token to a thought with the current state's rule.

        `counted_text` is the part of `text` that counts as content of the open thought when a
        boundary decides whether that thought is still empty.
        """
        if self._state is _State.SUMMARY:
            if self._open.content_start is None:
                self._open.content_start = position
            self._open.content_end = position + 1
            self._commit(events, self._open, TokenRole.SUMMARY, position)
            return
        if self._state is _State.AWAIT:
            prev = self._open
            if _is_blank(text) and prev.body_end - prev.start < self._max_tokens:
                prev.body_end = position + 1
                self._commit(events, prev, TokenRole.BODY, position)
                return
            self._finalize(events)
        if self._open is None:
            self._open = Thought(index=len(self.thoughts), start=position, body_end=position)
            self.thoughts.append(self._open)
            self._open_nonblank = False
        self._commit(events, self._open, TokenRole.BODY, position)
        self._grow_body(position, counted_text)

    def _grow_body(self, position: int, counted_text: str) -> None:
        """The open thought's body takes ``position`` (BODY state)."""
        thought = self._open
        thought.body_end = position + 1
        self._open_nonblank = self._open_nonblank or not _is_blank(counted_text)
        if thought.body_end - thought.start >= self._max_tokens:
            # Forced cap: a model that never writes a boundary still gets bounded thoughts.
            self._state = _State.AWAIT

    def _complete_boundary(self, taken: list[_Pending], start: int, events: SegmentEvents) -> None:
        for p in taken:
            self._assign(p.position, p.text, p.text[: max(0, start - p.offset)], events)
        if self._state is not _State.BODY or self._open is None:
            return
        if self._open_nonblank:
            self._state = _State.AWAIT
        else:
            # No empty thoughts: the thought stays open, and what follows the marker is content.
            self._open_nonblank = any(
                not _is_blank(p.text) for p in taken if p.position >= self._open.start
            )

    def _begin_summary(self, taken: list[_Pending], start: int, events: SegmentEvents) -> None:
        before = [p for p in taken if p.end() <= start]
        for p in before:
            self._assign(p.position, p.text, p.text, events)
        summary_start = taken[len(before)].position
        if self._open is None:
            # A summary with no thought before it gets an empty-bodied thought of its own, so
            # every position still belongs to exactly one thought.
            self._open = Thought(index=len(self.thoughts), start=summary_start, body_end=summary_start)
            self.thoughts.append(self._open)
        self._open.summary_start = summary_start
        self._state = _State.SUMMARY

    def _end_summary(self, taken: list[_Pending], start: int, events: SegmentEvents) -> None:
        for p in taken:
            if p.end() <= start:
                self._assign(p.position, p.text, p.text, events)
        self._open.summary_end = taken[-1].position + 1
        self._finalize(events)

    def _cap_summary(self, position: int, events: SegmentEvents) -> None:
        """Force-end a summary whose span reached max_thought_tokens so it cannot grow forever."""
        if position + 1 - self._open.summary_start < self._max_tokens:
            return
        for p in self._take(len(self._pending)):
            self._assign(p.position, p.text, p.text, events)
        self._open.summary_end = position + 1
        self._finalize(events)

    def _finalize(self, events: SegmentEvents) -> None:
        self._open.final = True
        events.finalized.append(self._open.index)
        self._open = None
        self._state = _State.BODY

    @staticmethod
    def _commit(events: SegmentEvents, thought: Thought, role: TokenRole, position: int) -> None:
        last = events.commits[-1] if events.commits else None
        if last is not None and last[0] == thought.index and last[1] is role:
            last[2].append(position)
        else:
            events.commits.append((thought.index, role, [position]))


def prompt_reasoning_start(token_ids: Sequence[int], token_texts: Sequence[str], *, boundaries: Sequence[str],
                           summary_begin: str) -> Optional[int]:
    """Where reasoning pasted into a prompt begins, or None when the prompt holds no summary marker.

    The first thought of a pasted trace is the text before its first ``summary_begin`` marker, back
    to the last boundary before it: reasoning starts at the token after that boundary (at the
    marker's first token when no boundary precedes it). Everything before stays prompt.
    """
    texts = [token_texts[t] if 0 <= t < len(token_texts) else "" for t in token_ids]
    joined = "".join(texts)
    marker = joined.find(summary_begin)
    if marker < 0:
        return None
    ends = list(itertools.accumulate(len(t) for t in texts))  # ends[i]: one past token i's last char
    boundary_end = max((joined.rfind(b, 0, marker) + len(b) for b in boundaries if joined.rfind(b, 0, marker) >= 0),
                       default=None)
    if boundary_end is None:
        return bisect.bisect_right(ends, marker)
    return bisect.bisect_left(ends, boundary_end) + 1
