"""Build a decode step's sparse KV-slot list from per-request position ranges.

A ZoomR working set is a handful of ``[start, end)`` position ranges per request (sinks and prompt,
summaries, zoomed-in thoughts, the open thought, the recent window). The attention kernel wants the
KV *slots* of those positions, laid out request after request (FlashInfer's ``kv_indices`` with its
``kv_indptr``). The slots live in SGLang's ``req_to_token[row, position]`` table on the device, so
each range is one contiguous copy out of one row: that is :func:`ranges_to_kv_indices`.

* :func:`flatten_ranges` (host): Python ranges -> four small int64 tensors and ``kv_indptr``.
* :func:`ranges_to_kv_indices_triton`: one Triton program per (range, split); each program copies
  the blocks ``split, split + num_splits, ...`` of its range.
* :func:`ranges_to_kv_indices_torch`: the pure-torch reference, identical semantics.
* :func:`ranges_to_kv_indices`: the dispatcher. Triton on CUDA tensors, torch otherwise, except
  when the kernel was defined under ``TRITON_INTERPRET=1`` (Triton reads it when the module is
  imported): then the interpreted kernel runs on CPU tensors too, which is how CI tests it.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

try:  # Triton is optional: without it everything runs the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with every CUDA torch build we target
    triton = None
    tl = None

__all__ = [
    "BLOCK",
    "MAX_SPLITS",
    "flatten_ranges",
    "ranges_to_kv_indices",
    "ranges_to_kv_indices_torch",
    "ranges_to_kv_indices_triton",
    "triton_available",
    "triton_interpreted",
]

BLOCK = 512  # tokens copied per program and loop iteration
MAX_SPLITS = 64  # at most this many programs share one range

Range = Tuple[int, int]  # [start, end) positions


def flatten_ranges(
    rows: Sequence[int], ranges_per_request: Sequence[Sequence[Range]]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten every request's ``[start, end)`` ranges into kernel arguments (host helper).

    Args:
        rows: ``bs`` ``req_to_token`` rows, one per request.
        ranges_per_request: ``bs`` lists of ``(start, end)`` position ranges (end exclusive); a
            request's ranges are laid out in list order, empty ranges are kept (they copy nothing).

    Returns:
        ``(range_rows, range_starts, range_lens, out_offsets, kv_indptr)``, all on the CPU:
        the first four are int64 ``[n_ranges]`` (n_ranges = total number of ranges), and range r of
        request i lands at ``out_offsets[r]``, inside ``[kv_indptr[i], kv_indptr[i + 1])``;
        ``kv_indptr`` is int32 ``[bs + 1]``. ``int(kv_indptr[-1])`` is the ``total`` to pass to
        :func:`ranges_to_kv_indices`.
    """
    if len(rows) != len(ranges_per_request):
        raise ValueError(f"rows has {len(rows)} entries but ranges_per_request has {len(ranges_per_request)}")
    range_rows: List[int] = []
    range_starts: List[int] = []
    range_lens: List[int] = []
    out_offsets: List[int] = []
    indptr = [0]
    cursor = 0
    for row, ranges in zip(rows, ranges_per_request):
        for start, end in ranges:
            if start < 0 or end < start:
                raise ValueError(f"bad range ({start}, {end}) for row {row}: need 0 <= start <= end")
            range_rows.append(row)
            range_starts.append(start)
            range_lens.append(end - start)
            out_offsets.append(cursor)
            cursor += end - start
        indptr.append(cursor)
    packed = torch.tensor([range_rows, range_starts, range_lens, out_offsets], dtype=torch.int64)
    packed = packed.view(4, len(range_rows))  # keeps the shape [4, 0] when there are no ranges
    kv_indptr = torch.tensor(indptr, dtype=torch.int32)
    return packed[0], packed[1], packed[2], packed[3], kv_indptr


def _check_args(req_to_token, range_rows, range_starts, range_lens, out_offsets, total) -> None:
    """Shape/dtype/device checks that read metadata only (no device sync)."""
    if req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be [rows, max_context], got shape {tuple(req_to_token.shape)}")
    if req_to_token.dtype.is_floating_point or req_to_token.dtype.is_complex or req_to_token.dtype == torch.bool:
        raise ValueError(f"req_to_token must be an integer tensor, got {req_to_token.dtype}")
    n = range_rows.shape
    for name, t in (("range_rows", range_rows), ("range_starts", range_starts),
                    ("range_lens", range_lens), ("out_offsets", out_offsets)):
        if t.dim() != 1 or t.shape != n:
            raise ValueError(f"{name} must be 1-D with the shape of range_rows {tuple(n)}, got {tuple(t.shape)}")
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}")
        if t.device != req_to_token.device:
            raise ValueError(f"{name} is on {t.device} but req_to_token is on {req_to_token.device}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")


def ranges_to_kv_indices_torch(
    req_to_token: torch.Tensor,
    range_rows: torch.Tensor,
    range_starts: torch.Tensor,
    range_lens: torch.Tensor,
    out_offsets: torch.Tensor,
    total: int,
    out: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`ranges_to_kv_indices` (same arguments, same result).

    For every range r: ``out[out_offsets[r] : out_offsets[r] + range_lens[r]] =
    req_to_token[range_rows[r], range_starts[r] : range_starts[r] + range_lens[r]]``.
    Entries of ``out`` that no range covers are left uninitialized. On CUDA tensors this syncs
    (``repeat_interleave`` sizes its output from the device), which is why the dispatcher prefers
    Triton there.
    """
    _check_args(req_to_token, range_rows, range_starts, range_lens, out_offsets, total)
    device = req_to_token.device
    out = _output(out, total, device)
    if total == 0 or range_rows.numel() == 0:
        return out
    # Each copied token: its range, its offset inside the range.
    which = torch.repeat_interleave(torch.arange(range_rows.numel(), device=device), range_lens)
    first_of_range = torch.cumsum(range_lens, 0) - range_lens  # exclusive prefix sum
    local = torch.arange(which.numel(), device=device) - first_of_range[which]
    src = req_to_token[range_rows[which], range_starts[which] + local]
    out[out_offsets[which] + local] = src.to(torch.int32)
    return out


if triton is not None:

    @triton.jit
    def _ranges_to_kv_indices_kernel(
        req_to_token,  # [rows, max_context] int32 (any int dtype)
        stride_row,
        stride_col,
        range_rows,  # [n_ranges] int64
        range_starts,  # [n_ranges] int64
        range_lens,  # [n_ranges] int64
        out_offsets,  # [n_ranges] int64
        out,  # [total] int32
        num_splits,
        host_bound,  # an upper bound of every range length, a host int (used when BOUND_ON_HOST)
        BLOCK: tl.constexpr,
        BOUND_ON_HOST: tl.constexpr,
    ):
        r = tl.program_id(0)
        split = tl.program_id(1).to(tl.int64)
        row = tl.load(range_rows + r)
        start = tl.load(range_starts + r)
        length = tl.load(range_lens + r)
        dst = tl.load(out_offsets + r)
        src = req_to_token + row * stride_row + start * stride_col
        offs = tl.arange(0, BLOCK).to(tl.int64)
        # Older Triton interpreters (3.6) cannot take a loaded value as a loop bound; compiled
        # kernels loop to the range's own length, interpreted ones to a host bound, masked.
        if BOUND_ON_HOST:
            loop_end = host_bound
        else:
            loop_end = length
        for block_start in range(split * BLOCK, loop_end, num_splits * BLOCK):
            idx = block_start + offs
            mask = idx < length
            slots = tl.load(src + idx * stride_col, mask=mask)
            tl.store(out + dst + idx, slots.to(tl.int32), mask=mask)

else:  # pragma: no cover
    _ranges_to_kv_indices_kernel = None


def triton_available() -> bool:
    """Triton imported and the kernel defined."""
    return _ranges_to_kv_indices_kernel is not None


def triton_interpreted() -> bool:
    """The kernel was defined under ``TRITON_INTERPRET=1`` and runs in Triton's CPU interpreter."""
    return triton_available() and type(_ranges_to_kv_indices_kernel).__name__ == "InterpretedFunction"


def fixed_shapes(device: torch.device) -> bool:
    """Whether the per-layer calls on ``device`` run Triton kernels over fixed-size buffers (CUDA,
    or Triton's interpreter), as a captured CUDA graph needs; else the torch path sizes each call."""
    return triton_available() and (device.type == "cuda" or triton_interpreted())


def _num_splits(total: int, n_ranges: int) -> int:
    """Programs per range: enough that the average range is covered in about two rounds of blocks,
    rounded to a power of two (it is a runtime argument, so this only bounds idle programs)."""
    per_range_blocks = -(-total // max(n_ranges * BLOCK, 1))
    splits = 1
    while splits < per_range_blocks and splits < MAX_SPLITS:
        splits *= 2
    return splits


def ranges_to_kv_indices_triton(
    req_to_token: torch.Tensor,
    range_rows: torch.Tensor,
    range_starts: torch.Tensor,
    range_lens: torch.Tensor,
    out_offsets: torch.Tensor,
    total: int,
    out: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """Triton version of :func:`ranges_to_kv_indices`: one launch, no host sync.

    Grid ``(n_ranges, num_splits)``; ``num_splits`` comes from ``total`` and ``n_ranges`` (both
    known on the host), and a program strides over its range's blocks, so a long range never needs
    its length on the host.
    """
    if not triton_available():
        raise RuntimeError("triton is not installed")
    _check_args(req_to_token, range_rows, range_starts, range_lens, out_offsets, total)
    out = _output(out, total, req_to_token.device)
    n_ranges = range_rows.numel()
    if total == 0 or n_ranges == 0:
        return out
    splits = _num_splits(total, n_ranges)
    _ranges_to_kv_indices_kernel[(n_ranges, splits)](
        req_to_token,
        req_to_token.stride(0),
        req_to_token.stride(1),
        range_rows,
        range_starts,
        range_lens,
        out_offsets,
        out,
        splits,
        total,
        BLOCK=BLOCK,
        BOUND_ON_HOST=triton_interpreted(),
        num_warps=4,
    )
    return out


def ranges_to_kv_indices(
    req_to_token: torch.Tensor,
    range_rows: torch.Tensor,
    range_starts: torch.Tensor,
    range_lens: torch.Tensor,
    out_offsets: torch.Tensor,
    total: int,
    out: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """Copy each range's KV slots out of ``req_to_token`` into one flat list.

    For every range r: ``out[out_offsets[r] : out_offsets[r] + range_lens[r]] =
    req_to_token[range_rows[r], range_starts[r] : range_starts[r] + range_lens[r]]``.

    Args:
        req_to_token: ``[rows, max_context]`` int32 (SGLang's ``ReqToTokenPool.req_to_token``).
        range_rows, range_starts, range_lens, out_offsets: ``[n_ranges]`` int64, on
            ``req_to_token``'s device (see :func:`flatten_ranges`). Ranges must lie inside their
            row and their output spans must not overlap; neither is checked (that would sync).
        total: output length, a host int (e.g. ``int(kv_indptr[-1])`` on the CPU).
        out: an int32 buffer of at least ``total`` entries to write into (a CUDA graph's fixed
            index buffer); None allocates one.

    Returns:
        ``[total]`` int32 on ``req_to_token``'s device (``out[:total]`` when given); entries no
        range covers are uninitialized.

    Runs the Triton kernel on CUDA tensors (no host sync) and the torch reference otherwise, unless
    ``TRITON_INTERPRET=1`` was set when this module was imported: then the interpreted Triton
    kernel runs on CPU tensors as well.
    """
    if triton_available() and (req_to_token.is_cuda or triton_interpreted()):
        return ranges_to_kv_indices_triton(req_to_token, range_rows, range_starts, range_lens, out_offsets, total, out)
    return ranges_to_kv_indices_torch(req_to_token, range_rows, range_starts, range_lens, out_offsets, total, out)


def _output(out: "torch.Tensor | None", total: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty(total, dtype=torch.int32, device=device)
    if out.dtype != torch.int32 or out.dim() != 1 or out.numel() < total or out.device != torch.device(device):
        raise ValueError(f"out must be a 1-D int32 buffer of >= {total} entries on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out[:total]
