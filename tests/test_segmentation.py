"""ThoughtSegmenter: hand-traced token streams with exact thoughts, commits and finalizations."""

import random

import pytest

from zoomr_sglang.algo.segmentation import (
    SegmentEvents,
    Thought,
    ThoughtSegmenter,
    TokenRole,
    key_role,
    prompt_reasoning_start,
)
from zoomr_sglang.algo.token_markers import TokenMarkers

BODY, SUMMARY = TokenRole.BODY, TokenRole.SUMMARY
VOCAB = [
    "a", "b", ".", "\n", "\n\n", "<|", "begin", "_of_summary|>", "end", "x\n\ny", " ",
    ".\n\nThe", "\n\nThe", "<|begin_of_summary|>", "<|end_of_summary|>", "z",
]
FIRST = 5  # the prompt occupies positions [0, 5)


def make(**overrides) -> ThoughtSegmenter:
    kwargs = dict(
        boundaries=["\n\n"],
        summary_begin="<|begin_of_summary|>",
        summary_end="<|end_of_summary|>",
        sentence_ends=[".", "\n"],
        max_thought_tokens=100,
        first_position=FIRST,
    )
    kwargs.update(overrides)
    return ThoughtSegmenter(VOCAB, **kwargs)


def feed_all(seg: ThoughtSegmenter, texts: list[str]) -> tuple[list[SegmentEvents], list[int]]:
    """Feed texts to a fresh segmenter from FIRST on; return the events and open_from after each feed."""
    events, open_froms = [], []
    for i, text in enumerate(texts):
        events.append(seg.feed(VOCAB.index(text), FIRST + i))
        open_froms.append(seg.open_from())
    return events, open_froms


def commits(events: list[SegmentEvents]) -> list[list]:
    return [e.commits for e in events]


def finalized(events: list[SegmentEvents]) -> list[list[int]]:
    return [e.finalized for e in events]


def test_plain_boundary_in_one_token_implicit_mode():
    seg = make()
    assert seg.open_from() == FIRST
    events, open_froms = feed_all(seg, ["a", "b", "\n\n", "a", "\n\n", "b"])
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [(0, BODY, [7])],
        [(1, BODY, [8])], [(1, BODY, [9])], [(2, BODY, [10])],
    ]
    # The previous thought is final only once the next non-whitespace token starts a new one.
    assert finalized(events) == [[], [], [], [0], [], [1]]
    assert open_froms == [5, 5, 5, 8, 8, 10]
    assert seg.thoughts[:2] == [
        Thought(index=0, start=5, body_end=8, final=True),
        Thought(index=1, start=8, body_end=10, final=True),
    ]
    assert seg.thoughts[2] == Thought(index=2, start=10, body_end=11)
    assert key_role(seg.thoughts[0]) is BODY


def test_boundary_split_over_two_tokens():
    seg = make()
    events, open_froms = feed_all(seg, ["a", "\n", "\n", "b"])
    # "\n" waits while "\n\n" is still possible, then both close the body together.
    assert commits(events) == [[(0, BODY, [5])], [], [(0, BODY, [6, 7])], [(1, BODY, [8])]]
    assert finalized(events) == [[], [], [], [0]]
    assert open_froms == [5, 5, 5, 8]
    assert seg.thoughts[0] == Thought(index=0, start=5, body_end=8, final=True)


def test_newline_followed_by_other_text_is_no_boundary():
    seg = make()
    events, _ = feed_all(seg, ["a", "\n", "b", "<|", "a", "\n\n"])
    assert commits(events) == [
        [(0, BODY, [5])], [], [(0, BODY, [6, 7])], [], [(0, BODY, [8, 9])], [(0, BODY, [10])],
    ]
    assert finalized(events) == [[]] * 6
    assert seg.thoughts == [Thought(index=0, start=5, body_end=11)]


def test_boundary_inside_a_token():
    seg = make()
    events, _ = feed_all(seg, ["a", ".\n\nThe", "b", "x\n\ny", "a"])
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [(1, BODY, [7])], [(1, BODY, [8])], [(2, BODY, [9])],
    ]
    assert finalized(events) == [[], [], [0], [], [1]]
    assert [(t.start, t.body_end, t.final) for t in seg.thoughts] == [(5, 7, True), (7, 9, True), (9, 10, False)]


def test_text_after_the_boundary_does_not_make_an_empty_thought_close():
    # "\n\nThe" opens the first thought: nothing precedes its boundary, so the thought stays open
    # and "The" counts as its content when the next boundary arrives.
    seg = make()
    events, _ = feed_all(seg, ["\n\nThe", "\n\n", "a"])
    assert finalized(events) == [[], [], [0]]
    assert seg.thoughts[0] == Thought(index=0, start=5, body_end=7, final=True)


def test_earliest_ending_marker_wins_then_the_longer_one():
    # "\n\n" ends before "x\n\ny": the thought's "x" precedes the boundary, so it closes.
    seg = make(boundaries=["\n\n", "x\n\ny"])
    events, _ = feed_all(seg, ["x\n\ny", "a"])
    assert finalized(events) == [[], [0]]
    # ".\n\n" and "\n\n" end together: the longer wins, so "." is marker text and the
    # thought stays open as empty.
    seg = make(boundaries=["\n\n", ".\n\n"])
    events, _ = feed_all(seg, [".", "\n\n", "a"])
    assert commits(events) == [[], [(0, BODY, [5, 6])], [(0, BODY, [7])]]
    assert finalized(events) == [[], [], []]


def test_non_whitespace_before_boundary_while_awaiting_starts_a_closed_thought():
    seg = make()
    events, _ = feed_all(seg, ["a", "\n\n", ".\n\nThe", "b"])
    assert commits(events) == [[(0, BODY, [5])], [(0, BODY, [6])], [(1, BODY, [7])], [(2, BODY, [8])]]
    assert finalized(events) == [[], [], [0], [1]]


def test_summary_markers_split_over_tokens():
    seg = make()
    texts = ["a", "b", "<|", "begin", "_of_summary|>", "a", "\n\n", "b", "<|", "end", "_of_summary|>", "a"]
    events, open_froms = feed_all(seg, texts)
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [], [], [],  # begin marker tokens 7-9: no role
        [(0, SUMMARY, [10])], [(0, SUMMARY, [11])], [(0, SUMMARY, [12])],  # "\n\n" is content here
        [], [], [],  # end marker tokens 13-15: no role
        [(1, BODY, [16])],
    ]
    assert finalized(events) == [[]] * 10 + [[0], []]
    assert open_froms == [5] * 10 + [16, 16]
    assert seg.thoughts[0] == Thought(
        index=0, start=5, body_end=7, summary_start=7, summary_end=16, content_start=10, content_end=13, final=True
    )
    assert key_role(seg.thoughts[0]) is SUMMARY
    assert seg.thoughts[1] == Thought(index=1, start=16, body_end=17)


def test_summary_after_boundary_with_whitespace_between():
    seg = make()
    texts = ["a", "\n\n", " ", "<|begin_of_summary|>", "b", "<|end_of_summary|>", "\n\n", "a", "\n\n", "b"]
    events, open_froms = feed_all(seg, texts)
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [(0, BODY, [7])], [], [(0, SUMMARY, [9])], [],
        # After a summary no thought is open; whitespace opens one, which a boundary cannot close.
        [(1, BODY, [11])], [(1, BODY, [12])], [(1, BODY, [13])], [(2, BODY, [14])],
    ]
    assert finalized(events) == [[], [], [], [], [], [0], [], [], [], [1]]
    assert open_froms == [5, 5, 5, 5, 5, 11, 11, 11, 11, 14]
    assert seg.thoughts[0] == Thought(
        index=0, start=5, body_end=8, summary_start=8, summary_end=11, content_start=9, content_end=10, final=True
    )
    assert seg.thoughts[1] == Thought(index=1, start=11, body_end=14, final=True)


def test_summary_without_boundary_and_empty_summary():
    seg = make()
    texts = ["a", "<|begin_of_summary|>", "<|end_of_summary|>", "<|begin_of_summary|>", "b", "<|end_of_summary|>"]
    events, _ = feed_all(seg, texts)
    assert commits(events) == [[(0, BODY, [5])], [], [], [], [(1, SUMMARY, [9])], []]
    assert finalized(events) == [[], [], [0], [], [], [1]]
    # An empty summary leaves the body key in charge.
    assert seg.thoughts[0] == Thought(index=0, start=5, body_end=6, summary_start=6, summary_end=8, final=True)
    assert key_role(seg.thoughts[0]) is BODY
    # A summary with no thought before it gets an empty-bodied thought of its own.
    assert seg.thoughts[1] == Thought(
        index=1, start=8, body_end=8, summary_start=8, summary_end=11, content_start=9, content_end=10, final=True
    )


def test_forced_cap_ends_body():
    seg = make(max_thought_tokens=3)
    events, open_froms = feed_all(seg, ["a"] * 7)
    assert commits(events) == [[(0, BODY, [p])] for p in (5, 6, 7)] + [[(1, BODY, [p])] for p in (8, 9, 10)] + [
        [(2, BODY, [11])]
    ]
    assert finalized(events) == [[], [], [], [0], [], [], [1]]
    assert open_froms == [5, 5, 5, 8, 8, 8, 11]


def test_forced_cap_also_bounds_whitespace():
    seg = make(max_thought_tokens=2)
    events, _ = feed_all(seg, ["a", "a", " ", " ", " "])
    # Whitespace may not push a capped body past the cap, and a whitespace-only thought is capped too.
    assert commits(events) == [[(0, BODY, [5])], [(0, BODY, [6])], [(1, BODY, [7])], [(1, BODY, [8])], [(2, BODY, [9])]]
    assert finalized(events) == [[], [], [0], [], [1]]


def test_runaway_summary_is_force_ended():
    seg = make(max_thought_tokens=4)
    events, _ = feed_all(seg, ["a", "\n\n", "<|begin_of_summary|>", "a", "b", "<|", "a"])
    # The summary span 7..10 reaches 4 tokens at position 10; the pending "<|" becomes content.
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [], [(0, SUMMARY, [8])], [(0, SUMMARY, [9])],
        [(0, SUMMARY, [10])], [(1, BODY, [11])],
    ]
    assert finalized(events) == [[], [], [], [], [], [0], []]
    assert seg.thoughts[0] == Thought(
        index=0, start=5, body_end=7, summary_start=7, summary_end=11, content_start=8, content_end=11, final=True
    )


def test_consecutive_boundaries_make_no_empty_thoughts():
    seg = make()
    events, _ = feed_all(seg, ["\n\n", "\n\n", "a", "\n\n", "\n\n", "\n", "\n", "b"])
    assert commits(events) == [
        [(0, BODY, [5])], [(0, BODY, [6])], [(0, BODY, [7])], [(0, BODY, [8])], [(0, BODY, [9])],
        [], [(0, BODY, [10, 11])], [(1, BODY, [12])],
    ]
    assert finalized(events) == [[]] * 7 + [[0]]
    assert [(t.start, t.body_end) for t in seg.thoughts] == [(5, 12), (12, 13)]


def test_sentence_end_flag():
    seg = make()
    events, _ = feed_all(seg, ["a", ".", "b", ".\n\nThe", "\n", "a", "<|begin_of_summary|>"])
    assert [e.sentence_end for e in events] == [False, True, False, True, True, False, False]


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_keep_every_position_in_exactly_one_place(seed):
    rng = random.Random(seed)
    max_tokens = rng.choice([2, 3, 8])
    seg = make(max_thought_tokens=max_tokens)
    texts = [rng.choice(VOCAB) for _ in range(60)] + ["z"]  # "z" is in no marker: flushes all
    events, open_froms = feed_all(seg, texts)
    end = FIRST + len(texts)

    committed: dict[int, tuple[int, TokenRole]] = {}
    for event in events:
        for index, role, positions in event.commits:
            assert positions == sorted(positions)
            for p in positions:
                assert p not in committed, f"position {p} committed twice"
                committed[p] = (index, role)
    span_cursor = FIRST
    for t in seg.thoughts:
        assert t.start == span_cursor  # spans tile the generated positions
        assert t.body_end - t.start <= max_tokens
        for p in range(t.start, t.body_end):
            assert committed.pop(p) == (t.index, BODY)
        if t.summary_start is not None:
            assert t.summary_start == t.body_end
            assert t.summary_end is None or t.summary_end - t.summary_start <= max_tokens
            summary_end = t.summary_end if t.summary_end is not None else end
            content = [p for p in range(t.summary_start, summary_end) if p in committed]
            assert all(committed.pop(p) == (t.index, SUMMARY) for p in content)
            assert t.has_summary_content == bool(content)
            # The content span is exactly the committed SUMMARY positions, contiguous.
            assert content == (list(range(t.content_start, t.content_end)) if content else [])
        span_cursor = t.span_end() if t.summary_start is None or t.summary_end is not None else end
    assert not committed and span_cursor == end
    # Only the last thought may be non-final, and finalization is reported once, in order.
    assert all(t.final for t in seg.thoughts[:-1])
    assert [i for e in events for i in e.finalized] == [t.index for t in seg.thoughts if t.final]
    last = seg.thoughts[-1]
    assert open_froms[-1] == (last.span_end() if last.final else last.start)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(max_thought_tokens=0), "max_thought_tokens"),
        (dict(first_position=-1), "first_position"),
        (dict(boundaries=["\n\n", ""]), "boundaries"),
        (dict(summary_begin=""), "summary_begin"),
        (dict(summary_end=""), "summary_end"),
        (dict(sentence_ends=[""]), "sentence_ends"),
    ],
)
def test_bad_constructor_arguments(overrides, name):
    with pytest.raises(ValueError, match=name):
        make(**overrides)


def test_bad_feed_arguments():
    seg = make()
    with pytest.raises(ValueError, match="position"):
        seg.feed(0, FIRST + 1)
    seg.feed(0, FIRST)
    with pytest.raises(ValueError, match="position"):
        seg.feed(0, FIRST)
    assert seg.feed_quiet(0, FIRST) == -1 and seg.feed_quiet(0, FIRST + 2) == -1  # fed already / not next


def _segment(seg: ThoughtSegmenter, ids: list[int], quiet: bool) -> tuple[list, list[Thought]]:
    """Each token's (commits, finalized, sentence end, taken quietly), fed by ``feed`` alone or,
    with ``quiet``, by ``feed_quiet`` first (its one commit written as ``feed`` reports it)."""
    reports = []
    for position, token in enumerate(ids, start=FIRST):
        flags = seg._vocab.flags_of(token)
        thought = seg.feed_quiet(flags, position) if quiet else -1
        if thought >= 0:
            reports.append(([(thought, BODY, [position])], [], bool(flags & TokenMarkers.SENTENCE_END), True))
        else:
            events = seg.feed(token, position)
            reports.append((events.commits, events.finalized, events.sentence_end, False))
    return reports, seg.thoughts


@pytest.mark.parametrize("seed", range(6))
def test_quiet_feeding_settles_exactly_what_feeding_does(seed):
    """Random streams of every token (split markers, blanks, sentence ends, ids past the tokenizer):
    ``feed_quiet`` takes only tokens it can settle alone, and settles them as ``feed`` would."""
    rng = random.Random(seed)
    ids = [rng.choice(range(len(VOCAB) + 2)) for _ in range(400)]
    kwargs = dict(max_thought_tokens=rng.choice([7, 30, 100]))
    fed, fed_thoughts = _segment(make(**kwargs), ids, quiet=False)
    quiet, quiet_thoughts = _segment(make(**kwargs), ids, quiet=True)
    assert [r[:3] for r in quiet] == [r[:3] for r in fed] and quiet_thoughts == fed_thoughts
    assert sum(len(r[1]) for r in fed) > 5 and sum(r[3] for r in quiet) > 50  # thoughts closed, tokens taken quietly


@pytest.mark.parametrize("seed", range(4))
def test_a_token_quiet_run_admits_extends_the_body_as_feeding_does(seed):
    """What the planner's quiet steps rely on: while ``quiet_run`` admits a position and the token
    holds no marker, ``extend_body`` settles it as ``feed`` would."""
    rng = random.Random(100 + seed)
    ids = [rng.choice(range(len(VOCAB) + 2)) for _ in range(400)]
    kwargs = dict(max_thought_tokens=[3, 5, 30, 100][seed])  # short caps: bodies end at the cap too
    fed, fed_thoughts = _segment(make(**kwargs), ids, quiet=False)
    seg, reports, extended = make(**kwargs), [], 0
    for position, token in enumerate(ids, start=FIRST):
        flags = seg._vocab.flags_of(token)
        thought, limit = seg.quiet_run()
        if thought >= 0 and position < limit and not flags & TokenMarkers.MARKER:
            seg.extend_body(flags, position)
            reports.append(([(thought, BODY, [position])], [], bool(flags & TokenMarkers.SENTENCE_END)))
            extended += 1
        else:
            events = seg.feed(token, position)
            reports.append((events.commits, events.finalized, events.sentence_end))
    assert reports == [r[:3] for r in fed] and seg.thoughts == fed_thoughts
    assert extended > 50


def test_an_id_past_the_tokenizer_reads_as_empty_text():
    """Models pad their embedding beyond the tokenizer and may sample those ids: such a token is
    segmented as a token whose text is empty (it holds no marker, not even inside a split one)."""
    with_empty = VOCAB + [""]
    texts = ["a", "\n\n", "b", "<|", "", "begin", "_of_summary|>", "z", "", "<|end_of_summary|>", "", "a"]
    padded = make(), [VOCAB.index(t) if t else len(VOCAB) + 7 for t in texts]
    empty = ThoughtSegmenter(with_empty, boundaries=["\n\n"], summary_begin="<|begin_of_summary|>",
                             summary_end="<|end_of_summary|>", sentence_ends=[".", "\n"], max_thought_tokens=100,
                             first_position=FIRST), [with_empty.index(t) for t in texts]
    reports = [_segment(seg, ids, quiet=True) for seg, ids in (padded, empty)]
    assert reports[0] == reports[1]
    thoughts = [(t.start, t.summary_start, t.final) for t in reports[0][1]]
    assert thoughts == [(5, None, True), (7, 8, True), (15, None, False)]
    markers = TokenMarkers(VOCAB, boundaries=["\n\n"], summary_begin="<|begin_of_summary|>",
                           summary_end="<|end_of_summary|>", sentence_ends=["."])
    assert markers.flags_of(len(VOCAB)) == markers.flags_of(-1) == 0
    assert markers.flags_of(VOCAB.index(".")) == TokenMarkers.SENTENCE_END | TokenMarkers.REFRESH | TokenMarkers.NONBLANK
    assert markers.flags_of(VOCAB.index("<|")) == TokenMarkers.MARKER | TokenMarkers.NONBLANK  # a marker's beginning
    assert markers.flags_of(VOCAB.index("\n\n")) == TokenMarkers.MARKER | TokenMarkers.REFRESH


def test_token_markers_must_match_the_segmenter():
    markers = TokenMarkers(VOCAB, boundaries=["\n"], summary_begin="<|begin_of_summary|>",
                           summary_end="<|end_of_summary|>", sentence_ends=[".", "\n"])
    with pytest.raises(ValueError, match="token_markers"):
        make(token_markers=markers)


@pytest.mark.parametrize("texts, expected", [
    (["a", "b", "a"], None),  # no summary marker: all prompt
    (["a", "\n\n", "b", ".", "<|", "begin", "_of_summary|>", "z"], 2),  # after the last boundary before it
    (["a", "x\n\ny", "b", "<|begin_of_summary|>", "\n\n", "<|begin_of_summary|>"], 2),  # boundary inside a token
    (["a", "b", "<|begin_of_summary|>", "z"], 2),  # no boundary before it: from the marker
])
def test_pasted_reasoning_starts_after_the_boundary_before_the_first_summary(texts, expected):
    ids = [VOCAB.index(t) for t in texts]
    assert prompt_reasoning_start(ids, VOCAB, boundaries=["\n\n"], summary_begin="<|begin_of_summary|>") == expected
