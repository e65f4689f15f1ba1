"""Kernels: ``ranges_to_kv_indices`` (Triton) against its torch reference, and the pure ZoomR
algorithm on CUDA tensors.

CPU suite: the torch reference against a plain Python loop, ``flatten_ranges``, the dispatcher, the
Triton kernel in Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess: Triton reads the
variable when the kernel is defined, i.e. at import) and an ahead-of-time compile of the kernel for
sm_90 (no GPU needed). ``cuda`` suite: the compiled kernel on CUDA tensors (and that the dispatcher
never syncs), ``IndexKeyStore``, ``score_thoughts``/``head_votes`` and ``gather_decode_attention``
on ``device="cuda"``; their CPU twins are in test_index_keys.py, test_voting.py and
test_backend_cpu.py. The vote kernel on odd shapes (GQA group 3, head_dim 64, summaries around the
scored width, ties) against its torch reference is here too; the vote and commit kernels' other tests
are in test_batched_votes.py. Nothing here imports SGLang, so the ``cuda`` tests run on a bare torch+triton
GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from triton_checks import assert_compiles_for_sm90, run_script
from zoomr_sglang.algo.batched_votes import COUNT, MASS, MEAN_MASS, SummaryKeys, accumulate_votes
from zoomr_sglang.kernels import kv_indices as kvi
from zoomr_sglang.kernels.kv_indices import (
    flatten_ranges,
    ranges_to_kv_indices,
    ranges_to_kv_indices_torch,
)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

# 3 requests over a [5, 300] table (rows 4, 1, 2 are used; rows 0 and 3 are other requests):
# ranges of length 1, 97 and 0, adjacent ranges (5..102 then 102..110), a range ending at
# max_context, and a whole row.
MAX_CONTEXT = 300
ODD_ROWS = [4, 1, 2]
ODD_RANGES = [
    [(0, 1), (5, 102), (102, 110), (299, 300)],
    [(7, 7), (200, 300)],
    [(0, 300)],
]


def _table(rows: int, max_context: int, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (rows, max_context), generator=gen, dtype=torch.int32).to(device)


def _loop_reference(req_to_token, rows, ranges_per_request) -> torch.Tensor:
    """The obvious Python loop: each request's ranges, in order."""
    parts = [req_to_token[row, start:end] for row, ranges in zip(rows, ranges_per_request) for start, end in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def _run(fn, req_to_token, rows, ranges_per_request):
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges(rows, ranges_per_request)
    device = req_to_token.device
    return fn(req_to_token, range_rows.to(device), range_starts.to(device), range_lens.to(device),
              out_offsets.to(device), int(kv_indptr[-1]))


def _random_case(gen: torch.Generator, bs: int, max_context: int, max_ranges: int):
    """bs requests with random lengths and up to max_ranges random sorted disjoint ranges each."""
    rows = torch.randperm(2 * bs, generator=gen)[:bs].tolist()
    ranges_per_request = []
    for _ in range(bs):
        seq_len = int(torch.randint(1, max_context + 1, (1,), generator=gen))
        cuts = sorted(set(torch.randint(0, seq_len + 1, (2 * max_ranges,), generator=gen).tolist()))
        ranges_per_request.append([(a, b) for a, b in zip(cuts[::2], cuts[1::2])])
    return rows, ranges_per_request


# -- CPU: reference, host helper, dispatcher -----------------------------------------------------
def test_flatten_ranges_layout():
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges(ODD_ROWS, ODD_RANGES)
    assert [t.dtype for t in (range_rows, range_starts, range_lens, out_offsets)] == [torch.int64] * 4
    assert kv_indptr.dtype == torch.int32 and kv_indptr.device.type == "cpu"
    assert range_rows.tolist() == [4, 4, 4, 4, 1, 1, 2]
    assert range_starts.tolist() == [0, 5, 102, 299, 7, 200, 0]
    assert range_lens.tolist() == [1, 97, 8, 1, 0, 100, 300]
    assert out_offsets.tolist() == [0, 1, 98, 106, 107, 107, 207]
    assert kv_indptr.tolist() == [0, 107, 207, 507]

    empty = flatten_ranges([], [])
    assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0,), (0,), (1,)]
    no_ranges = flatten_ranges([3, 5], [[], []])
    assert no_ranges[0].shape == (0,) and no_ranges[4].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="bad range"):
        flatten_ranges([0], [[(5, 4)]])
    with pytest.raises(ValueError, match="ranges_per_request"):
        flatten_ranges([0, 1], [[(0, 1)]])


def test_torch_reference_matches_python_loop():
    table = _table(5, MAX_CONTEXT)
    got = _run(ranges_to_kv_indices_torch, table, ODD_ROWS, ODD_RANGES)
    assert got.dtype == torch.int32 and got.shape == (507,)
    assert torch.equal(got, _loop_reference(table, ODD_ROWS, ODD_RANGES))
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        rows, ranges = _random_case(gen, bs=5, max_context=MAX_CONTEXT, max_ranges=6)
        table = _table(10, MAX_CONTEXT, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        assert torch.equal(_run(ranges_to_kv_indices_torch, table, rows, ranges), _loop_reference(table, rows, ranges))


def test_torch_reference_honours_out_offsets_and_strides():
    # A column slice of a wider table (row stride 512) and ranges written out of order.
    wide = _table(3, 512, seed=5)
    table = wide[:, :MAX_CONTEXT]
    rows = torch.tensor([2, 0, 1])
    starts = torch.tensor([10, 0, 250])
    lens = torch.tensor([3, 4, 50])
    offsets = torch.tensor([54, 50, 0])
    out = ranges_to_kv_indices_torch(table, rows, starts, lens, offsets, 57)
    expected = torch.cat([table[1, 250:300], table[0, 0:4], table[2, 10:13]])
    assert torch.equal(out, expected)


def test_empty_inputs_and_bad_arguments():
    table = _table(2, 16)
    none = torch.zeros(0, dtype=torch.int64)
    for fn in (ranges_to_kv_indices_torch, ranges_to_kv_indices):
        out = fn(table, none, none, none, none, 0)
        assert out.shape == (0,) and out.dtype == torch.int32
        zero_len = torch.tensor([1])
        assert fn(table, zero_len, torch.tensor([3]), torch.tensor([0]), torch.tensor([0]), 0).shape == (0,)
    with pytest.raises(ValueError, match="int64"):
        ranges_to_kv_indices(table, none.int(), none, none, none, 0)
    with pytest.raises(ValueError, match="shape"):
        ranges_to_kv_indices(table, torch.zeros(2, dtype=torch.int64), none, none, none, 0)
    with pytest.raises(ValueError, match="req_to_token"):
        ranges_to_kv_indices(table[0], none, none, none, none, 0)
    with pytest.raises(ValueError, match="total"):
        ranges_to_kv_indices(table, none, none, none, none, -1)


def test_dispatcher_uses_torch_on_cpu_without_interpreter(monkeypatch):
    if kvi.triton_interpreted():
        pytest.skip("this process imported the kernel under TRITON_INTERPRET=1")

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors")

    monkeypatch.setattr(kvi, "ranges_to_kv_indices_triton", no_triton)
    table = _table(5, MAX_CONTEXT)
    assert torch.equal(_run(ranges_to_kv_indices, table, ODD_ROWS, ODD_RANGES), _loop_reference(table, ODD_ROWS, ODD_RANGES))


# -- CPU: the Triton kernel itself ----------------------------------------------------------------
INTERPRETER_SCRIPT = r"""
import json, torch
from zoomr_sglang.kernels import kv_indices as kvi
from test_kernels import ODD_RANGES, ODD_ROWS, MAX_CONTEXT, _table, _run, _random_case, _loop_reference

assert kvi.triton_interpreted(), "TRITON_INTERPRET=1 did not reach the kernel definition"
results = []
table = _table(5, MAX_CONTEXT)
cases = [(table, ODD_ROWS, ODD_RANGES)]
# Long ranges: several splits per range and several blocks per split.
cases.append((_table(3, 5000, seed=2), [0, 2], [[(0, 4100), (4100, 4101)], [(13, 2613)]]))
# A column slice (row stride 512 != max_context) and random cases.
cases.append((_table(5, 512, seed=3)[:, :MAX_CONTEXT], ODD_ROWS, ODD_RANGES))
gen = torch.Generator().manual_seed(7)
for _ in range(4):
    rows, ranges = _random_case(gen, bs=3, max_context=MAX_CONTEXT, max_ranges=5)
    cases.append((_table(6, MAX_CONTEXT, seed=len(cases)), rows, ranges))
for table, rows, ranges in cases:
    triton_out = _run(kvi.ranges_to_kv_indices_triton, table, rows, ranges)
    dispatched = _run(kvi.ranges_to_kv_indices, table, rows, ranges)
    torch_out = _run(kvi.ranges_to_kv_indices_torch, table, rows, ranges)
    results.append(dict(
        total=int(torch_out.numel()),
        dtype=str(triton_out.dtype),
        triton_equal=bool(torch.equal(triton_out, torch_out)),
        dispatch_equal=bool(torch.equal(dispatched, torch_out)),
        loop_equal=bool(torch.equal(torch_out, _loop_reference(table, rows, ranges))),
    ))
print(json.dumps(results))
"""


def test_triton_kernel_in_interpreter_matches_torch():
    results = run_script(INTERPRETER_SCRIPT, interpret=True, timeout=300)
    assert len(results) == 7 and results[0]["total"] == 507 and results[1]["total"] == 6701
    for result in results:
        assert result == dict(result, dtype="torch.int32", triton_equal=True, dispatch_equal=True, loop_equal=True)


def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    """Ahead-of-time compile to a cubin for H100/H200 (sm_90): catches typing errors the
    interpreter lets through, on a machine without a GPU."""
    types = {"req_to_token": "*i32", "stride_col": "constexpr", "range_rows": "*i64", "range_starts": "*i64",
             "range_lens": "*i64", "out_offsets": "*i64", "out": "*i32"}
    constants = {"stride_col": 1, "BLOCK": kvi.BLOCK, "BOUND_ON_HOST": False}
    assert_compiles_for_sm90(kvi, "_ranges_to_kv_indices_kernel", types, constants)


# -- CUDA: the compiled kernel --------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
def test_triton_kernel_on_cuda_matches_torch():
    assert not kvi.triton_interpreted()
    cases = [(_table(5, MAX_CONTEXT, device="cuda"), ODD_ROWS, ODD_RANGES),
             (_table(5, 512, seed=3, device="cuda")[:, :MAX_CONTEXT], ODD_ROWS, ODD_RANGES),
             (_table(3, 40_000, seed=2, device="cuda"), [0, 2], [[(0, 32_768), (32_768, 32_769)], [(13, 2613)]])]
    gen = torch.Generator().manual_seed(11)
    for bs, max_context in ((3, MAX_CONTEXT), (16, 4096), (64, 32_768)):
        rows, ranges = _random_case(gen, bs=bs, max_context=max_context, max_ranges=12)
        cases.append((_table(2 * bs, max_context, seed=bs, device="cuda"), rows, ranges))
    for table, rows, ranges in cases:
        got = _run(kvi.ranges_to_kv_indices_triton, table, rows, ranges)
        dispatched = _run(ranges_to_kv_indices, table, rows, ranges)
        expected = _run(ranges_to_kv_indices_torch, table, rows, ranges)
        assert got.is_cuda and got.dtype == torch.int32
        assert torch.equal(got, expected) and torch.equal(dispatched, expected)
        assert torch.equal(expected.cpu(), _loop_reference(table.cpu(), rows, ranges))


@pytest.mark.cuda
@needs_cuda
def test_dispatcher_on_cuda_never_syncs():
    table = _table(8, 4096, device="cuda")
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges([1, 5], [[(0, 100), (900, 3000)], [(4, 4000)]])
    args = [t.cuda() for t in (range_rows, range_starts, range_lens, out_offsets)]
    total = int(kv_indptr[-1])
    ranges_to_kv_indices(table, *args, total)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ranges_to_kv_indices(table, *args, total)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.cpu(), torch.cat([table[1, 0:100], table[1, 900:3000], table[5, 4:4000]]).cpu())


# -- CUDA: the pure algorithm on device="cuda" (CPU twins: test_index_keys, test_voting, test_backend_cpu)
@pytest.mark.cuda
@needs_cuda
def test_index_key_store_on_cuda_matches_cpu():
    from zoomr_sglang.algo.index_keys import IndexKeyStore

    gen = torch.Generator().manual_seed(0)
    stores = {dev: IndexKeyStore(3, 2, 64, dev, capacity=16) for dev in ("cpu", "cuda")}
    entries = {dev: [store.alloc() for _ in range(9)] for dev, store in stores.items()}
    assert entries["cpu"] == entries["cuda"]
    for layer in range(3):
        for _ in range(10):
            n = int(torch.randint(1, 40, (1,), generator=gen))
            ids = torch.tensor(entries["cpu"])[torch.randint(0, 9, (n,), generator=gen)]
            keys = torch.randn(n, 2, 64, generator=gen).to(torch.bfloat16)
            for dev, store in stores.items():
                store.add(layer, ids.to(dev), keys.to(dev))
    ids = torch.tensor(entries["cpu"])
    for layer in range(3):
        torch.testing.assert_close(stores["cuda"].means(layer, ids.cuda()).cpu(), stores["cpu"].means(layer, ids),
                                   rtol=1e-5, atol=1e-6)
    for store in stores.values():
        store.free(entries["cpu"][3:])
    again = torch.tensor([stores["cuda"].alloc() for _ in range(2)], device="cuda")
    stores["cuda"].zero(again)
    assert torch.equal(stores["cuda"].means(0, again).cpu(), torch.zeros(2, 2, 64))


@pytest.mark.cuda
@needs_cuda
def test_scoring_and_votes_on_cuda():
    from zoomr_sglang.algo.voting import head_votes, score_thoughts, select_thoughts

    # The hand-computed case of test_voting.py, on the GPU.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], device="cuda")
    index_keys = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [2.0, 2.0]], [[0.0, -1.0], [-1.0, 1.0]]],
                              device="cuda")
    scores = score_thoughts(query.to(torch.bfloat16), index_keys)
    assert scores.is_cuda and scores.dtype == torch.float32
    assert scores.cpu().tolist() == [[1.0, 3.0, 0.0], [2.0, 0.0, -1.0], [1.0, 4.0, 0.0], [-1.0, 2.0, -3.0]]
    votes, sums = head_votes(scores, k=2)
    assert votes.is_cuda and votes.cpu().tolist() == [4, 4, 0] and sums.cpu().tolist() == [3.0, 9.0, -4.0]
    assert select_thoughts(votes, sums, c=2) == [1, 0]
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]], device="cuda")
    assert head_votes(tied, k=2)[0].cpu().tolist() == [2, 3, 1, 0]  # ties go to the lower index

    # Model-sized: 32 heads over 8 KV heads, head_dim 128, 300 thoughts.
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(32, 128, generator=gen).to(torch.bfloat16)
    index_keys = torch.randn(300, 8, 128, generator=gen)
    gpu_scores = score_thoughts(query.cuda(), index_keys.cuda())
    torch.testing.assert_close(gpu_scores.cpu(), score_thoughts(query, index_keys), rtol=1e-3, atol=2e-2)
    # Same scores in, same votes out (sort and bincount on the GPU vs the CPU).
    gpu_votes, gpu_sums = head_votes(gpu_scores, k=8)
    cpu_votes, cpu_sums = head_votes(gpu_scores.cpu(), k=8)
    assert torch.equal(gpu_votes.cpu(), cpu_votes) and int(gpu_votes.sum()) == 32 * 8
    torch.testing.assert_close(gpu_sums.cpu(), cpu_sums, rtol=1e-5, atol=1e-4)


SPARSE_SEQ_LENS = [1, 777, 5000]
SPARSE_RANGES = [[(0, 1)], [(0, 4), (100, 197), (197, 240), (700, 777)], [(0, 64), (1000, 1800), (4872, 5000)]]


def sparse_decode_case(dtype):
    """Three requests over a 20,000-slot CUDA pool (each request's slots a random permutation of it)
    attending the ranges ``SPARSE_RANGES``: k/v caches, table, kv_indptr (CPU), kv_indices, query."""
    gen = torch.Generator().manual_seed(4)
    num_heads, num_kv_heads, head_dim, num_slots = 32, 8, 128, 20_000
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).cuda()
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).cuda()
    table = torch.zeros(3, 8192, dtype=torch.int32)
    for i, n in enumerate(SPARSE_SEQ_LENS):
        table[i, :n] = (torch.randperm(num_slots - 1, generator=gen)[:n] + 1).to(torch.int32)
    table = table.cuda()
    range_rows, range_starts, range_lens, out_offsets, kv_indptr = flatten_ranges([0, 1, 2], SPARSE_RANGES)
    kv_indices = ranges_to_kv_indices(table, range_rows.cuda(), range_starts.cuda(), range_lens.cuda(),
                                      out_offsets.cuda(), int(kv_indptr[-1]))
    query = torch.randn(3, num_heads, head_dim, generator=gen).to(dtype).cuda()
    return k_cache, v_cache, table, kv_indptr, kv_indices, query


def check_sparse_decode(case, out, lse, scaling, tol) -> None:
    """``out`` equals the float64 masked reference per request, ``lse`` (natural log) the log-sum-exp
    of the scaled logits over each request's kept positions."""
    from zoomr_sglang.algo.torch_attention import masked_decode_reference

    k_cache, v_cache, table, _, _, query = case
    group = query.shape[1] // k_cache.shape[1]
    for i, n in enumerate(SPARSE_SEQ_LENS):
        slots = table[i, :n].long()
        keep = torch.zeros(n, dtype=torch.bool, device="cuda")
        for start, end in SPARSE_RANGES[i]:
            keep[start:end] = True
        expected = masked_decode_reference(query[i], k_cache[slots], v_cache[slots], keep, scaling)
        torch.testing.assert_close(out[i].double(), expected, rtol=tol, atol=tol)
        kept = k_cache[slots][keep].double().repeat_interleave(group, dim=1)
        natural = torch.logsumexp(torch.einsum("hd,nhd->hn", query[i].double(), kept) * scaling, dim=1)
        torch.testing.assert_close(lse[i].double(), natural, rtol=tol, atol=2 * tol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_decode_attention_on_cuda_matches_masked_reference(dtype):
    from zoomr_sglang.algo.torch_attention import gather_decode_attention

    case = sparse_decode_case(dtype)
    k_cache, v_cache, _, kv_indptr, kv_indices, query = case
    scaling = query.shape[-1] ** -0.5
    out, lse = gather_decode_attention(query, k_cache, v_cache, kv_indptr, kv_indices, scaling)
    assert out.is_cuda and out.dtype == dtype and out.shape == query.shape
    check_sparse_decode(case, out, lse, scaling, {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype])


# -- The vote kernel (grid: voter slot, KV head, candidate split) on odd shapes ----------------------
# Voter slots: a mass voter, a count voter, a mean-mass voter, an unused slot, a count voter whose 17
# candidates share 3 index entries (ties at every rank), and a mass voter with 3 candidates.
VOTE_KINDS_OF_SLOTS = [MASS, COUNT, MEAN_MASS, MASS, COUNT, MASS]
VOTE_SLOT_CANDIDATES = [17, 17, 17, 0, 17, 3]
SUMMARY_LENGTHS = [0, 1, 63, 64, 100]  # around the scored width 64 (vote_summary_tokens' default)
SUMMARY_WIDTH = 64
VOTE_SHAPES = [(4, 128, 2), (3, 64, 3)]  # (GQA group, head_dim, KV heads)


def odd_vote_case(group: int, head_dim: int, num_kv_heads: int, seed: int = 0, device="cpu"):
    """Arguments of ``accumulate_votes`` (but votes, weights, scaling, topk) for the voter slots above,
    17 candidate columns, summaries of ``SUMMARY_LENGTHS`` tokens in turn, bf16 query and KV pool.

    Queries and keys are small integers and counts powers of two, so every score is exact in float32
    whatever the order of the sums: equal scores are real ties for the kernel and the torch
    reference alike (with random floats, the reference's batched matmul can round two columns of
    the same index key apart)."""
    gen = torch.Generator().manual_seed(seed)
    max_candidates, n_entries, rows, max_len, n_slots = 17, 50, 8, 200, 400
    bs, num_heads = 7, group * num_kv_heads
    candidates = torch.randint(0, n_entries, (rows, max_candidates), generator=gen, dtype=torch.int32)
    voter_rows = torch.tensor([5, 0, 7, 2, 3, 6])
    candidates[voter_rows[4]] = torch.tensor([11, 4, 29])[torch.randint(0, 3, (max_candidates,), generator=gen)].int()
    lengths = torch.tensor(SUMMARY_LENGTHS).repeat(rows * max_candidates // len(SUMMARY_LENGTHS) + 1)
    spans = torch.stack([torch.randint(0, max_len - 100, (rows, max_candidates), generator=gen),
                         lengths[: rows * max_candidates].reshape(rows, max_candidates)], dim=2).to(torch.int32)

    def small_ints(*shape, bound=2):
        return torch.randint(-bound, bound + 1, shape, generator=gen).float()

    case = dict(
        query=small_ints(bs, num_heads, head_dim).to(torch.bfloat16),
        log_normalizer=torch.randn(bs, num_heads, generator=gen).abs() + 4,
        sums=small_ints(n_entries, num_kv_heads, head_dim, bound=4),
        counts=torch.tensor([0.0, 1, 2, 4, 8])[torch.randint(0, 5, (n_entries,), generator=gen)],
        candidates=candidates, voter_rows=voter_rows, voter_batch=torch.tensor([6, 0, 3, 1, 2, 4]),
        num_candidates=torch.tensor(VOTE_SLOT_CANDIDATES), vote_kind=torch.tensor(VOTE_KINDS_OF_SLOTS),
        summary=SummaryKeys(spans, torch.randint(0, n_slots, (rows, max_len), generator=gen, dtype=torch.int32),
                            small_ints(n_slots, num_kv_heads, head_dim).to(torch.bfloat16),
                            SUMMARY_WIDTH),
    )
    return {k: SummaryKeys(*(t.to(device) for t in (v.spans, v.req_to_token, v.key_buffer)), v.width)
            if k == "summary" else v.to(device) for k, v in case.items()}


def cast_votes(fn, case, *, topk: int, **extra):
    """``votes, weights`` ``[6, 17]`` after one call of ``fn`` (one layer's votes) on accumulators that
    already hold other layers' values."""
    earlier = torch.arange(len(VOTE_SLOT_CANDIDATES) * 17, device=case["query"].device).reshape(-1, 17) / 1024
    votes, weights = earlier.clone(), earlier.flip(1).clone()
    fn(**case, votes=votes, weights=weights, scaling=case["query"].shape[-1] ** -0.5, topk=topk, **extra)
    return votes - earlier, weights - earlier.flip(1)


VOTE_INTERPRETER_SCRIPT = r"""
import json, time, torch
from zoomr_sglang.algo.batched_votes import accumulate_votes as torch_votes
from zoomr_sglang.kernels import thought_index as ti
from test_kernels import VOTE_SHAPES, odd_vote_case, cast_votes
assert ti.triton_interpreted(), "TRITON_INTERPRET=1 did not reach the kernels"
group, head_dim, num_kv_heads = VOTE_SHAPES[{shape}]
case = odd_vote_case(group, head_dim, num_kv_heads)
out = []
for topk in (1, 3, 20):
    scratch = ti.vote_scratch(6, group * num_kv_heads, 17, "cpu")
    began = time.perf_counter()
    kernel = cast_votes(ti.accumulate_votes_triton, case, topk=topk, scratch=scratch)
    seconds = time.perf_counter() - began
    reference = cast_votes(torch_votes, case, topk=topk)
    out.append(dict(kernel=[t.tolist() for t in kernel], torch=[t.tolist() for t in reference], seconds=seconds))
print(json.dumps(out))
"""


@pytest.mark.parametrize("shape", range(len(VOTE_SHAPES)), ids=[f"group{g}-dim{d}-kv{k}" for g, d, k in VOTE_SHAPES])
def test_vote_kernel_in_interpreter_matches_torch_on_odd_shapes(shape):
    """Group 3 and 4, head_dim 64 and 128, 2 and 3 KV heads, 17 candidates, summaries of 0 to 100
    tokens (width 64), an unused slot, ties in count top-k, top-k 1, 3 and past the candidates."""
    results = run_script(VOTE_INTERPRETER_SCRIPT.replace("{shape}", str(shape)), interpret=True, timeout=300)
    assert len(results) == 3
    for result in results:
        (votes, weights), (ref_votes, ref_weights) = (map(torch.tensor, result[k]) for k in ("kernel", "torch"))
        assert torch.equal(votes, ref_votes)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-4, atol=1e-4)
        assert votes[3].abs().sum() == 0 and weights[3].abs().sum() == 0  # the unused slot
        assert (weights[5, 3:] == 0).all()  # columns past a slot's candidates
        assert votes[[0, 2, 5]].abs().sum() == 0 and (weights[[0, 2, 5]][:, :3] > 0).all()
    # Top-1 among 3 index entries shared by 17 candidates: each head's vote goes to its best entry's oldest candidate.
    group, _, num_kv_heads = VOTE_SHAPES[shape]
    case = odd_vote_case(*VOTE_SHAPES[shape])
    entries = case["candidates"][case["voter_rows"][4], :17].tolist()
    oldest = [column for column, entry in enumerate(entries) if entries.index(entry) == column]
    top1_votes = torch.tensor(results[0]["kernel"][0][4])
    assert top1_votes.sum() == group * num_kv_heads and set(top1_votes.nonzero().flatten().tolist()) <= set(oldest)


def test_odd_vote_case_exercises_summaries_and_ties():
    """The case above is one the kernel can fail: mass votes differ from mean-mass votes where a
    summary is scored, summaries past the width are scaled up, and count ties decide top-k."""
    case = odd_vote_case(4, 128, 2)
    _, mass = cast_votes(accumulate_votes, case, topk=3)
    _, mean_mass = cast_votes(accumulate_votes, dict(case, vote_kind=torch.full((6,), MEAN_MASS)), topk=3)
    lengths = case["summary"].spans[case["voter_rows"][0], :17, 1]
    assert torch.equal(mass[0][lengths == 0], mean_mass[0][lengths == 0])
    assert ((mass[0] - mean_mass[0]).abs() > 1e-3 * mean_mass[0])[lengths > 0].all()
    assert set(lengths.tolist()) == set(SUMMARY_LENGTHS)
    entries = case["candidates"][case["voter_rows"][4], :17]
    assert len(set(entries.tolist())) == 3  # 17 candidates, 3 distinct scores per head


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", VOTE_SHAPES)
def test_vote_kernel_on_cuda_matches_torch_and_never_syncs(shape):
    from zoomr_sglang.kernels import thought_index as ti

    case = odd_vote_case(*shape, device="cuda")
    cpu_case = odd_vote_case(*shape)
    scratch = ti.vote_scratch(6, shape[0] * shape[2], 17, "cuda")
    for topk in (1, 3, 20):
        votes, weights = cast_votes(ti.accumulate_votes, case, topk=topk, scratch=scratch)
        ref_votes, ref_weights = cast_votes(accumulate_votes, cpu_case, topk=topk)
        assert torch.equal(votes.cpu(), ref_votes)
        torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cast_votes(ti.accumulate_votes, case, topk=3, scratch=scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
