"""What the zoomr tree keeps on its nodes and what a request inherits from a matched path."""

from __future__ import annotations

import torch

from zoomr_sglang.algo.segmentation import Thought, TokenRole
from zoomr_sglang.radix_ext.notes import HostPiece, NodeNotes, inherit
from zoomr_sglang.tree_port import ThoughtRecord


def _record(index, start, body_end, summary_end=None, key=True):
    thought = Thought(index=index, start=start, body_end=body_end, summary_start=None if summary_end is None else body_end,
                      summary_end=summary_end, final=True)
    sums = torch.full((2, 1, 4), float(index)) if key else None
    return ThoughtRecord(thought=thought, reasoning_start=10, role=TokenRole.BODY, key_sums=sums,
                         key_counts=torch.ones(2) if key else None)


def _piece(start, end, first_slot):
    return HostPiece(start, end, torch.arange(first_slot, first_slot + end - start))


def test_split_moves_pieces_and_records_to_the_side_that_holds_them():
    # A node at absolute 100 with a hole [8, 24) and two thoughts ending at 110 and 130.
    notes = NodeNotes(pieces=[_piece(8, 24, 500)], records=[_record(0, 96, 108, 110), _record(1, 110, 126, 130)])
    head, tail = notes.split(16, node_start=100)
    assert [(p.start, p.end) for p in head.pieces] == [(8, 16)] and head.pieces[0].host_slots.tolist() == list(range(500, 508))
    assert [(p.start, p.end) for p in tail.pieces] == [(0, 8)] and tail.pieces[0].host_slots.tolist() == list(range(508, 516))
    assert [r.thought.index for r in head.records] == [0] and [r.thought.index for r in tail.records] == [1]
    assert head.host_tokens + tail.host_tokens == notes.host_tokens == 16


def test_a_hole_split_over_two_nodes_is_inherited_whole_and_renumbered():
    path = [
        (0, 10, None),  # the prompt
        (10, 20, NodeNotes(pieces=[_piece(6, 20, 100)], records=[_record(7, 10, 14, 16)])),
        (30, 30, NodeNotes(pieces=[_piece(0, 8, 114)], records=[_record(8, 16, 38, 40), _record(9, 40, 52, 60)])),
    ]
    cut, inheritance = inherit(path, accept_holes=True)
    assert cut == 60 and inheritance.prefix_len == 60 and inheritance.reasoning_start == 10
    assert [r.thought.index for r in inheritance.records] == [0, 1, 2]  # renumbered for the new request
    assert inheritance.resume_from == 60
    [(owner, start, end, slots)] = inheritance.cold
    assert (owner, start, end) == (1, 16, 38) and slots.tolist() == list(range(100, 122))


def test_a_request_that_cannot_attend_around_holes_stops_at_the_first():
    path = [(0, 10, None), (10, 50, NodeNotes(pieces=[_piece(16, 32, 0)], records=[_record(0, 10, 14, 16),
                                                                                   _record(1, 16, 40, 44)]))]
    cut, inheritance = inherit(path, accept_holes=False)
    assert cut == 26 and [r.thought.start for r in inheritance.records] == [10] and inheritance.cold == []


def test_unexplained_or_doubled_holes_cut_the_match_before_them():
    # The thought owning the second hole was evicted with its leaf: its record is gone.
    orphan = [(0, 40, NodeNotes(pieces=[_piece(12, 16, 0), _piece(24, 32, 4)], records=[_record(0, 10, 20, 22)]))]
    cut, inheritance = inherit(orphan, accept_holes=True)
    assert cut == 24 and len(inheritance.records) == 1 and len(inheritance.cold) == 1
    # Two separate holes in one thought: the tier never makes that; refuse it rather than guess.
    doubled = [(0, 40, NodeNotes(pieces=[_piece(12, 16, 0), _piece(20, 24, 4)], records=[_record(0, 10, 30, 32)]))]
    cut, inheritance = inherit(doubled, accept_holes=True)
    assert cut == 12 and inheritance is None


def test_overlapping_writers_keep_the_earlier_thought():
    path = [(0, 20, NodeNotes(records=[_record(0, 4, 12, 14)])), (20, 20, NodeNotes(records=[_record(0, 10, 30, 32),
                                                                                           _record(1, 32, 36, 38)]))]
    cut, inheritance = inherit(path, accept_holes=True)
    assert cut == 40 and [(r.thought.start, r.thought.span_end()) for r in inheritance.records] == [(4, 14), (32, 38)]
