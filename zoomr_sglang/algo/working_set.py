"""The positions a decode step attends to, as sorted disjoint [start, end) ranges."""

import math
from typing import Iterable, Sequence

import numpy as np

Range = tuple[int, int]  # [start, end) positions

# The host's view of a request's tokens lags up to two steps behind the device (the overlap
# scheduler); the recent window covers that lag plus the token being decoded, so no token is ever
# outside both the window and the selection while its thought is still being indexed.
SCHEDULER_LAG_TOKENS = 2
MIN_WINDOW = SCHEDULER_LAG_TOKENS + 1


def step_budget(budget: float, seq_len: int, least: int) -> int:
    """KV tokens a step of a ``seq_len``-token request may attend under ``budget``: an integer is a
    count of tokens; a float in (0, 1) is a share of the sequence, at least ``least`` tokens, so a
    budget of 0.2 means a fifth of what is there at 2K tokens and at 32K alike."""
    if isinstance(budget, float):
        return max(least, math.ceil(budget * seq_len))
    return budget


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, disjoint ranges; overlapping or adjacent ones are merged, empty ones dropped."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def ranges_size(ranges) -> int:
    """Total length of disjoint ranges: a sequence of pairs or an ``[n, 2]`` array."""
    if isinstance(ranges, np.ndarray):
        return int((ranges[:, 1] - ranges[:, 0]).sum())
    return sum(end - start for start, end in ranges)


def as_range_array(ranges: Sequence[Range]) -> np.ndarray:
    """``[n, 2]`` int64 array of ``[start, end)`` pairs (the working-set contract)."""
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


def with_tail(fixed: np.ndarray, tail_from: int, seq_len: int) -> np.ndarray:
    """``fixed`` ``[n, 2]`` followed by ``[tail_from, seq_len)`` when that is not empty (see
    ``Policy.working_set_parts``)."""
    if tail_from >= seq_len:
        return fixed
    return np.concatenate([fixed, np.array([[tail_from, seq_len]], dtype=np.int64)])


def merge_range_array(ranges: np.ndarray) -> np.ndarray:
    """:func:`merge_ranges` on an ``[n, 2]`` array: sorted, overlapping or adjacent ranges joined,
    empty ones dropped (vectorized)."""
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    if len(ranges) == 0:
        return ranges.reshape(0, 2)
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    reach = np.maximum.accumulate(ranges[:, 1])
    starts_group = np.ones(len(ranges), dtype=bool)
    starts_group[1:] = ranges[1:, 0] > reach[:-1]
    firsts = np.flatnonzero(starts_group)
    return np.stack([ranges[firsts, 0], np.maximum.reduceat(ranges[:, 1], firsts)], axis=1)


def subtract_ranges(ranges: Sequence[Range], holes: Sequence[Range]) -> list[Range]:
    """Parts of ascending disjoint ``ranges`` outside every hole (holes ascending, disjoint),
    in order; empty parts are dropped."""
    out: list[Range] = []
    for start, end in ranges:
        cursor = start
        for hole_start, hole_end in holes:
            if hole_end <= cursor or hole_start >= end:
                continue
            if hole_start > cursor:
                out.append((cursor, hole_start))
            cursor = max(cursor, hole_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def sorted_unique(positions: np.ndarray) -> np.ndarray:
    """The distinct values of int ``positions`` ``[n]``, ascending (a sort and a neighbour test:
    several times faster than ``np.unique``'s hashing at the few thousand positions a step wants)."""
    ordered = np.sort(positions)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def in_sorted(values: np.ndarray, ascending: np.ndarray) -> np.ndarray:
    """bool ``[len(values)]``: whether each of ``values`` is in the ascending array ``ascending``
    (binary search; ``np.isin`` sorts both arrays again)."""
    if not len(ascending):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(ascending, values), len(ascending) - 1)
    return ascending[at] == values
