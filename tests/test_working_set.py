"""Working-set ranges: merging, clipping, sizes and positions."""

import numpy as np
import pytest
import torch

from paper_working_set import ranges_to_positions, working_set_ranges
from zoomr_sglang.algo.working_set import merge_ranges, ranges_size


@pytest.mark.parametrize(
    "ranges, merged",
    [
        ([], []),
        ([(5, 8), (0, 3), (2, 4)], [(0, 4), (5, 8)]),  # overlap
        ([(0, 3), (3, 6), (7, 9)], [(0, 6), (7, 9)]),  # adjacency merges, a gap does not
        ([(0, 10), (2, 3)], [(0, 10)]),  # nested
        ([(4, 4), (6, 5), (1, 2)], [(1, 2)]),  # empty and inverted ranges dropped
    ],
)
def test_merge_ranges(ranges, merged):
    assert merge_ranges(ranges) == merged


def test_working_set_union():
    ranges = working_set_ranges(
        seq_len=100, prompt_len=10, n_sink=4, n_window=8, open_from=90,
        summary_spans=[(20, 25), (40, 44)], zoomed_spans=[(24, 30), (60, 70)],
    )
    assert ranges == [(0, 10), (20, 30), (40, 44), (60, 70), (90, 100)]
    assert ranges_size(ranges) == 44


def test_window_reaches_back_past_open_region():
    ranges = working_set_ranges(
        seq_len=100, prompt_len=0, n_sink=4, n_window=16, open_from=95,
        summary_spans=[], zoomed_spans=[(50, 60)],
    )
    assert ranges == [(0, 4), (50, 60), (84, 100)]


def test_clipping_at_seq_len():
    # Sinks beyond the sequence, a zoomed span past the end, open_from beyond seq_len and a
    # window larger than the sequence all stay inside [0, seq_len).
    ranges = working_set_ranges(
        seq_len=50, prompt_len=5, n_sink=64, n_window=100, open_from=80,
        summary_spans=[], zoomed_spans=[(45, 60)],
    )
    assert ranges == [(0, 50)]
    ranges = working_set_ranges(
        seq_len=50, prompt_len=5, n_sink=2, n_window=0, open_from=50,
        summary_spans=[(10, 12)], zoomed_spans=[(45, 60)],
    )
    assert ranges == [(0, 5), (10, 12), (45, 50)]
    assert ranges_size(ranges) == 12
    assert working_set_ranges(
        seq_len=0, prompt_len=0, n_sink=4, n_window=4, open_from=0, summary_spans=[], zoomed_spans=[]
    ) == []


def test_ranges_to_positions():
    positions = ranges_to_positions([(0, 3), (5, 7)])
    assert positions.dtype == torch.int64
    assert positions.tolist() == [0, 1, 2, 5, 6]
    empty = ranges_to_positions([])
    assert empty.dtype == torch.int64 and empty.shape == (0,)


def test_negative_arguments_raise():
    with pytest.raises(ValueError, match="n_window"):
        working_set_ranges(seq_len=10, prompt_len=0, n_sink=0, n_window=-1, open_from=0,
                           summary_spans=[], zoomed_spans=[])


def test_subtract_ranges_cuts_holes_out_in_order():
    from zoomr_sglang.algo.working_set import subtract_ranges

    assert subtract_ranges([(0, 100)], [(10, 20), (40, 60)]) == [(0, 10), (20, 40), (60, 100)]
    assert subtract_ranges([(0, 30), (50, 80)], [(20, 60)]) == [(0, 20), (60, 80)]
    assert subtract_ranges([(16, 32)], [(0, 16), (32, 48)]) == [(16, 32)]  # adjacent holes touch nothing
    assert subtract_ranges([(16, 32)], [(0, 64)]) == []
    assert subtract_ranges([(5, 9)], []) == [(5, 9)]


def test_sorted_unique_and_in_sorted_agree_with_numpy():
    from zoomr_sglang.algo.working_set import in_sorted, sorted_unique

    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 500):
        values = rng.integers(0, 60, n)
        assert np.array_equal(sorted_unique(values), np.unique(values))
        ascending = np.unique(rng.integers(0, 60, n // 2))
        assert np.array_equal(in_sorted(values, ascending), np.isin(values, ascending))
