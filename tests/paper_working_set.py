"""The paper's working set from scratch, and ranges as positions: the oracles the cached, packed
production paths are tested against (nothing in the package needs them)."""

from typing import Sequence

import torch

from zoomr_sglang.algo.working_set import Range, merge_ranges


def working_set_ranges(
    *,
    seq_len: int,
    prompt_len: int,
    n_sink: int,
    n_window: int,
    open_from: int,
    summary_spans: Sequence[Range],
    zoomed_spans: Sequence[Range],
) -> list[Range]:
    """Union, clipped to [0, seq_len), of: sinks [0, n_sink), prompt [0, prompt_len), every summary
    span, every zoomed-in thought span, the open region [open_from, seq_len) and the recent window
    [seq_len - n_window, seq_len)."""
    for name, value in (("seq_len", seq_len), ("prompt_len", prompt_len), ("n_sink", n_sink),
                        ("n_window", n_window), ("open_from", open_from)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    parts = [
        (0, n_sink),
        (0, prompt_len),
        *summary_spans,
        *zoomed_spans,
        (open_from, seq_len),
        (seq_len - n_window, seq_len),
    ]
    return merge_ranges((max(start, 0), min(end, seq_len)) for start, end in parts)


def ranges_to_positions(ranges: Sequence[Range]) -> torch.Tensor:
    """Positions int64 [ranges_size(ranges)] in range order (ascending for merged ranges)."""
    if not ranges:
        return torch.empty(0, dtype=torch.int64)
    bounds = torch.tensor(ranges, dtype=torch.int64)  # [n_ranges, 2]
    lengths = bounds[:, 1] - bounds[:, 0]
    # Position j of range r is start_r + (j - first output index of r): one arange, no Python loop.
    shift = torch.repeat_interleave(bounds[:, 0] - (torch.cumsum(lengths, 0) - lengths), lengths)
    return torch.arange(int(lengths.sum()), dtype=torch.int64) + shift
