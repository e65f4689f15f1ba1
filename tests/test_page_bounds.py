"""The fine levels' page bounds and votes, batched: bounds in KV slots and votes against the eager
per-request ``PageScorer``, padding commits, the engine's slot bookkeeping (``PageBoundSlots``), and
the Triton vote kernel against the torch reference (interpreter, sm_90 compile, CUDA)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from triton_checks import assert_compiles_for_sm90, run_script
from zoomr_sglang.algo.page_bounds import (
    PAGE_TOKENS,
    accumulate_page_votes,
    candidate_pages,
    commit_page_bounds,
    page_upper_bounds,
    select_pages,
)
from zoomr_sglang.algo.page_scores import PageScorer
from zoomr_sglang.attention_backend.page_slots import PageBoundSlots
from zoomr_sglang.kernels import page_votes as pv

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

# Five lanes over a [6, 160] pool table: row 0 is a real lane (padding commits read its first page);
# lengths at two steps (pages complete between them; lane 4 never completes one, so never votes);
# pages wanted (lane 3 wants more than it has candidates).
ROWS = [4, 0, 5, 2, 1]
LENGTHS = [[70, 33, 130, 16, 10], [81, 48, 131, 32, 12]]
WANTED = [2, 3, 1, 5, 2]
N_ROWS, MAX_LEN = 6, 160
MAX_PAGES = MAX_LEN // PAGE_TOKENS
BOUND_SLOTS = 40  # slots past the positions' that the pages' bounds take


def fine_case(seed: int, *, integer: bool = False, num_heads=8, num_kv_heads=2, head_dim=24, num_layers=3):
    """Cached keys and values (bf16) per layer behind a shuffled ``req_to_token`` (the bounds take
    slots past the positions' in the same buffers, min in K, max in V), queries per step and layer,
    and each lane's attended ranges per step: sinks, a random span, a recent window cut in two
    abutting ranges. ``integer``: small integer keys and queries, so that bounds tie exactly."""
    gen = torch.Generator().manual_seed(seed)

    def values(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=gen).float()
        return torch.randn(*shape, generator=gen) * 2

    n_slots = N_ROWS * MAX_LEN + 1  # slot 0: SGLang's padding slot
    req_to_token = (torch.randperm(n_slots - 1, generator=gen) + 1).reshape(N_ROWS, MAX_LEN).to(torch.int32)
    ranges = []
    for lengths in LENGTHS:
        step = []
        for length in lengths:
            start = int(torch.randint(0, length, (1,), generator=gen))
            span = (start, min(length, start + int(torch.randint(0, 40, (1,), generator=gen))))
            window = max(0, length - 20)
            step.append([(0, 4), span, (window, window + 7), (window + 7, length)])
        ranges.append(step)
    return dict(
        req_to_token=req_to_token,
        keys=values(num_layers, n_slots + BOUND_SLOTS, num_kv_heads, head_dim).to(torch.bfloat16),
        values=values(num_layers, n_slots + BOUND_SLOTS, num_kv_heads, head_dim).to(torch.bfloat16),
        queries=values(len(LENGTHS), num_layers, len(ROWS), num_heads, head_dim).to(torch.bfloat16),
        ranges=ranges,
    )


def eager_step(scorers, case, step):
    """One step of the per-request reference (``FineZoom``'s use of ``PageScorer``): ask for the
    pages the ranges leave uncovered, observe every layer's query and the new pages' keys."""
    for lane, scorer in enumerate(scorers):
        length = LENGTHS[step][lane]
        covered = torch.zeros(length, dtype=torch.bool)
        for start, end in case["ranges"][step][lane]:
            covered[start:end] = True
        complete = length // PAGE_TOKENS
        outside = ~covered[: complete * PAGE_TOKENS].reshape(complete, PAGE_TOKENS).all(dim=1)
        scorer.ask(torch.nonzero(outside).flatten(), WANTED[lane])
    new_pages = [scorer.new_pages(LENGTHS[step][lane])[0] for lane, scorer in enumerate(scorers)]
    for layer in range(case["keys"].shape[0]):
        for lane, scorer in enumerate(scorers):
            slots = case["req_to_token"][ROWS[lane], new_pages[lane][0]:new_pages[lane][1]].long()
            scorer.observe(layer, case["queries"][step, layer, lane], case["keys"][layer, slots])


def step_commits(store, step, padding=2):
    """``[n + padding, 3]`` (row, page, slot) for the pages completed since the last step (slots
    handed out in order), and the real ones; a padding commit is ``(0, 0, 0)``."""
    rows = []
    for lane, row in enumerate(ROWS):
        first = LENGTHS[step - 1][lane] // PAGE_TOKENS if step else 0
        for page in range(first, LENGTHS[step][lane] // PAGE_TOKENS):
            rows.append((row, page, store.next_slot))
            store.next_slot += 1
    real = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    return torch.cat([real, torch.zeros(padding, 3, dtype=torch.int64)]), real


def batched_step(store, case, step, vote_fn, **extra):
    """One step of the batched path: commits, candidates, every layer's commit and vote, top pages."""
    commits, real = step_commits(store, step)
    store.row_pages[real[:, 0], real[:, 1]] = real[:, 2].to(torch.int32)
    spans = [(lane, start, end - start) for lane, lane_ranges in enumerate(case["ranges"][step])
             for start, end in lane_ranges]
    spans.append((len(ROWS), 0, 0))  # a padding range
    range_batch, range_start, range_length = torch.tensor(spans).T
    num_pages = torch.tensor(LENGTHS[step]) // PAGE_TOKENS
    candidate = candidate_pages(range_batch, range_start, range_length, num_pages, MAX_PAGES)
    rows, wanted = torch.tensor(ROWS), torch.tensor(WANTED)
    votes = torch.zeros(len(ROWS), MAX_PAGES)
    weights = torch.zeros_like(votes)
    for layer in range(case["keys"].shape[0]):
        lows, highs = case["keys"][layer], case["values"][layer]
        commit_page_bounds(lows, highs, lows, case["req_to_token"], commits)
        vote_fn(case["queries"][step, layer], lows, highs, store.row_pages, rows, candidate=candidate,
                wanted=wanted, votes=votes, weights=weights, **extra)
    return candidate, votes, weights, select_pages(votes, weights, candidate, wanted, max(WANTED))


def new_store(case):
    """The page -> slot table and the next free bound slot."""
    return SimpleNamespace(row_pages=torch.zeros(N_ROWS, MAX_PAGES, dtype=torch.int32),
                           next_slot=case["keys"].shape[1] - BOUND_SLOTS)


def torch_votes(query, lows, highs, row_pages, rows, **kw):
    accumulate_page_votes(query, lows, highs, row_pages, rows, max_wanted=max(WANTED), **kw)


@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
def test_batched_page_votes_equal_the_eager_page_scorer(integer):
    for seed in range(3):
        case = fine_case(seed, integer=integer)
        scorers = [PageScorer() for _ in ROWS]
        store = new_store(case)
        for step in range(len(LENGTHS)):
            eager_step(scorers, case, step)
            candidate, votes, weights, chosen = batched_step(store, case, step, torch_votes)
            for lane, scorer in enumerate(scorers):
                for layer, (lows, highs) in scorer.bounds.items():  # the slots hold the eager bounds
                    slots = store.row_pages[ROWS[lane], : lows.shape[0]].long()
                    assert torch.equal(case["keys"][layer, slots].float(), lows)
                    assert torch.equal(case["values"][layer, slots].float(), highs)
                pages = torch.nonzero(candidate[lane]).flatten()
                assert torch.equal(pages, scorer.candidate_pages)
                if scorer.page_votes is None:  # no complete page (lane 4)
                    assert not candidate[lane].any() and (chosen[lane] == -1).all()
                    continue
                assert torch.equal(votes[lane, pages], scorer.page_votes.float())
                torch.testing.assert_close(weights[lane, pages], scorer.page_score_sums, rtol=1e-6, atol=1e-5)
                assert votes[lane][~candidate[lane]].abs().sum() == 0
                ranked = scorer.ranking()
                assert len(ranked) == min(WANTED[lane], len(pages)) and len(ranked) > 0
                assert chosen[lane].tolist() == ranked + [-1] * (max(WANTED) - len(ranked))


def test_ties_break_as_the_eager_scorer_does():
    """With integer bounds, many pages tie: the ties case above must actually exercise them."""
    case = fine_case(0, integer=True)
    store = new_store(case)
    candidate, _, _, _ = batched_step(store, case, 0, torch_votes)
    scores = page_upper_bounds(case["queries"][0, 0], case["keys"][0], case["values"][0], store.row_pages,
                               torch.tensor(ROWS), MAX_PAGES)
    lane = 2  # 8 complete pages
    heads = scores[lane][:, candidate[lane]]
    assert heads.shape[1] >= 3 and any(len(h.unique()) < len(h) for h in heads)


def test_padding_commits_write_only_the_padding_slot():
    case = fine_case(1)
    store = new_store(case)
    commits, real = step_commits(store, 0, padding=3)
    lows, highs = case["keys"][1], case["values"][1]
    before = lows.clone(), highs.clone()
    commit_page_bounds(lows, highs, lows, case["req_to_token"], commits[len(real):])
    assert torch.equal(lows[1:], before[0][1:]) and torch.equal(highs[1:], before[1][1:])
    commit_page_bounds(lows, highs, lows, case["req_to_token"], commits)
    written = lows[1:].clone(), highs[1:].clone()
    lows.copy_(before[0])
    highs.copy_(before[1])
    commit_page_bounds(lows, highs, lows, case["req_to_token"], real)
    assert torch.equal(lows[1:], written[0]) and torch.equal(highs[1:], written[1])
    assert not torch.equal(lows[real[:, 2]], before[0][real[:, 2]])  # the real commits did write


class CountingAllocator:
    """SGLang's allocator as the slots see it: ``alloc`` (None when short) and ``free`` of slot tensors."""

    def __init__(self, size: int) -> None:
        self.free_slots = list(range(size - 1, 0, -1))

    def alloc(self, n: int):
        if n > len(self.free_slots):
            return None
        return torch.tensor([self.free_slots.pop() for _ in range(n)], dtype=torch.int64)

    def free(self, slots: torch.Tensor) -> None:
        self.free_slots += slots.tolist()


def test_page_slots_bound_pages_in_order_wait_for_absent_keys_and_give_every_slot_back():
    """Pages get slots as they complete, from the first page on (the prompt's too); a page whose
    keys are not on the device waits (and the ones after it); the page the step's own token
    completes is committed in the layers, the earlier ones at the load; a short pool retries; the
    slots return."""
    case = fine_case(0)
    keys, values = case["keys"], case["values"]
    allocator = CountingAllocator(keys.shape[1])
    free_at_start = len(allocator.free_slots)
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer: keys[layer], get_value_buffer=lambda layer: values[layer])
    slots = PageBoundSlots(req_to_token=case["req_to_token"], kv_pool=kv_pool, allocator=allocator, num_layers=3)
    row = ROWS[2]
    new = []
    assert slots.bound(row, 3 * PAGE_TOKENS + 5, None, new) == 3  # pages 0, 1, 2: before this step
    assert [n.pages.tolist() for n in new] == [[0, 1, 2]] and not new[0].in_step.any()
    absent = np.zeros(6 * PAGE_TOKENS, dtype=bool)
    absent[4 * PAGE_TOKENS + 3] = True  # page 4's keys are on the host: pages 4 and 5 wait
    assert slots.bound(row, 6 * PAGE_TOKENS, absent, new) == 4 and new[1].pages.tolist() == [3]
    assert slots.bounds_end(row) == 4 and slots.device_tokens(row) == 4 and slots.headroom(row) == 1
    slots.load(new, padded_bs=4)
    for layer in range(3):  # the slots hold each page's min and max keys, in every layer
        for page in (0, 1, 2, 3):
            page_keys = keys[layer, case["req_to_token"][row, page * PAGE_TOKENS:(page + 1) * PAGE_TOKENS].long()]
            slot = int(slots.row_pages[row, page])
            assert torch.equal(keys[layer, slot], page_keys.amin(dim=0))
            assert torch.equal(values[layer, slot], page_keys.amax(dim=0))
    new = []
    assert slots.bound(row, 6 * PAGE_TOKENS, None, new) == 6 and new[0].in_step.tolist() == [False, True]
    slots.load(new, padded_bs=4)
    assert slots.active_commits == 1 and slots.step_commits[0, :2].tolist() == [row, 5]
    allocator.free_slots, spare = [], allocator.free_slots
    assert slots.bound(row, 7 * PAGE_TOKENS, None, []) == 6 and slots.alloc_failures == 1
    allocator.free_slots = spare
    slots.release(row)
    assert len(allocator.free_slots) == free_at_start and slots.device_tokens(row) == 0


INTERPRETER_SCRIPT = r"""
import json, torch
from zoomr_sglang.kernels import page_votes as pv
from test_page_bounds import ROWS, LENGTHS, MAX_PAGES, PAGE_TOKENS, fine_case, new_store, batched_step, torch_votes
assert pv.triton_interpreted(), "TRITON_INTERPRET=1 did not reach the kernel"
out = []
# Default blocks (one bound split, one select step), then small ones: three splits of 4 pages,
# select steps of 8 keys (ties counted across steps). Two layers: votes still add up across layers.
for (pv.BLOCK_PAGES, pv.SELECT_PAGES), seed, integer in (((16, 1024), 0, False), ((4, 8), 2, True)):
    case = fine_case(seed, integer=integer, num_layers=2)
    scratch = pv.page_vote_scratch(len(ROWS), 8, MAX_PAGES, "cpu")
    ref_store, kernel_store = new_store(case), new_store(case)
    for step in range(len(LENGTHS)):
        num_pages = torch.tensor(LENGTHS[step]) // PAGE_TOKENS
        kernel = lambda *a, **kw: pv.accumulate_page_votes_triton(*a, num_pages=num_pages, scratch=scratch, **kw)
        _, kv, kw, kc = batched_step(kernel_store, case, step, kernel)
        _, tv, tw, tc = batched_step(ref_store, case, step, torch_votes)  # the same slots: the same writes
        out.append({"votes_equal": bool(torch.equal(kv, tv)), "chosen_equal": bool(torch.equal(kc, tc)),
                    "weights_close": bool(torch.allclose(kw, tw, rtol=1e-5, atol=1e-4))})
print(json.dumps(out))
"""


def test_page_vote_kernel_in_interpreter_matches_torch():
    out = run_script(INTERPRETER_SCRIPT, interpret=True, timeout=600)
    assert len(out) == 4 and all(o == {"votes_equal": True, "chosen_equal": True, "weights_close": True} for o in out)


@pytest.mark.parametrize("kernel", ["_page_bound_kernel", "_page_select_kernel"])
def test_page_vote_kernels_compile_for_sm90_without_a_gpu(kernel):
    types = {"query": "*bf16", "lows": "*bf16", "highs": "*bf16", "row_pages": "*i32", "rows": "*i64",
             "num_pages": "*i64", "wanted": "*i64", "candidate": "*u8", "votes": "*fp32", "weights": "*fp32", "scratch": "*i32"}
    constants = {"GROUP": 4, "GROUP_P2": 4, "HEAD_DIM": 128, "DIM_P2": 128, "BLOCK": 16, "SELECT": 1024,
                 "BOUND_ON_HOST": False}
    assert_compiles_for_sm90(pv, kernel, types, constants)


@pytest.mark.cuda
@needs_cuda
def test_page_vote_kernels_on_cuda_match_torch_and_never_sync():
    case = fine_case(0, integer=True)
    store = new_store(case)
    candidate, _, _, _ = batched_step(store, case, 0, torch_votes)  # fills the table
    num_pages, rows, wanted = torch.tensor(LENGTHS[0]) // PAGE_TOKENS, torch.tensor(ROWS), torch.tensor(WANTED)
    inputs = (case["queries"][0, 2], case["keys"][2], case["values"][2], store.row_pages, rows, num_pages, candidate,
              wanted)
    votes, weights = torch.zeros(len(ROWS), MAX_PAGES), torch.zeros(len(ROWS), MAX_PAGES)
    accumulate_page_votes(*inputs[:5], *inputs[6:], votes, weights, max_wanted=max(WANTED))
    inputs = [t.cuda() for t in inputs]
    kernel_votes, kernel_weights = votes.new_zeros(votes.shape, device="cuda"), weights.new_zeros(votes.shape, device="cuda")
    scratch = pv.page_vote_scratch(len(ROWS), 8, MAX_PAGES, "cuda")
    pv.accumulate_page_votes(*inputs, kernel_votes.clone(), kernel_weights.clone(), max_wanted=0, scratch=scratch)
    torch.cuda.synchronize()  # compiled: the check is about a decode step's launches
    torch.cuda.set_sync_debug_mode("error")
    try:
        pv.accumulate_page_votes(*inputs, kernel_votes, kernel_weights, max_wanted=0, scratch=scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert votes.sum() > 0 and torch.equal(kernel_votes.cpu(), votes)
    assert torch.allclose(kernel_weights.cpu(), weights, rtol=1e-5, atol=1e-4)
