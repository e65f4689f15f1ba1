"""The step's votes, batched over requests: the torch reference against the per-request algorithm,
the Triton kernels against the torch reference (interpreter, sm_90 compile, CUDA), and no host
sync in the per-layer work."""

from __future__ import annotations

import pytest
import torch

from triton_checks import assert_compiles_for_sm90, run_script
from zoomr_sglang.algo.batched_votes import COUNT, MASS, SummaryKeys, accumulate_votes, select_top
from zoomr_sglang.algo.voting import agreement, attention_mass, head_votes, score_thoughts, select_thoughts
from zoomr_sglang.kernels import thought_index as ti

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def vote_case(seed: int, *, bs=5, num_heads=8, num_kv_heads=2, head_dim=24, n_entries=40, max_candidates=12,
              rows=6, n_slots=90, max_len=50, device="cpu"):
    """Random query/lse/store/candidate table, summaries in a KV pool, and five voter slots: count,
    mass and mean-mass votes, an unused slot, one candidate (fewer than top-k), ties (two
    candidates share an entry), and summaries of 0 to 6 tokens (longer than the scored width 4)."""
    gen = torch.Generator().manual_seed(seed)
    case = dict(
        query=torch.randn(bs, num_heads, head_dim, generator=gen).to(torch.bfloat16),
        log_normalizer=torch.randn(bs, num_heads, generator=gen).abs() + 3,
        sums=torch.randn(n_entries, num_kv_heads, head_dim, generator=gen) * 3,
        counts=torch.randint(0, 9, (n_entries,), generator=gen).float(),
        candidates=torch.randint(0, n_entries, (rows, max_candidates), generator=gen, dtype=torch.int32),
        voter_rows=torch.tensor([3, 0, 5, 2, 1]), voter_batch=torch.tensor([0, 4, 2, 1, 3]),
        num_candidates=torch.tensor([12, 0, 5, 1, 7]), vote_kind=torch.tensor([1, 1, 0, 1, 2]),
        spans=torch.stack([torch.randint(0, max_len - 6, (rows, max_candidates), generator=gen),
                           torch.randint(0, 7, (rows, max_candidates), generator=gen)], dim=2).to(torch.int32),
        req_to_token=torch.randint(0, n_slots, (rows, max_len), generator=gen, dtype=torch.int32),
        key_buffer=(torch.randn(n_slots, num_kv_heads, head_dim, generator=gen) * 3).to(torch.bfloat16),
    )
    case["candidates"][3, 7] = case["candidates"][3, 2]  # a tie inside voter 0's candidates
    return {k: v.to(device) for k, v in case.items()}


SUMMARY_FIELDS = ("spans", "req_to_token", "key_buffer")
SCORED_WIDTH = 4


def run_votes(fn, case, layers=2, topk=2, **extra):
    n_voters, width = len(case["voter_rows"]), case["candidates"].shape[1]
    votes = torch.zeros(n_voters, width, device=case["query"].device)
    weights = torch.zeros_like(votes)
    summary = SummaryKeys(*(case[name] for name in SUMMARY_FIELDS), width=SCORED_WIDTH)
    arguments = {k: v for k, v in case.items() if k not in SUMMARY_FIELDS}
    for _ in range(layers):
        fn(**arguments, votes=votes, weights=weights, scaling=0.3, topk=topk, summary=summary, **extra)
    return votes, weights


def summary_token_mass(case, v, column):
    """The per-request mass a mass voter's heads give one candidate's summary (None without one)."""
    row, batch = case["voter_rows"][v], case["voter_batch"][v]
    start, length = case["spans"][row, column].tolist()
    if length == 0:
        return None
    scored = min(length, SCORED_WIDTH)
    keys = case["key_buffer"][case["req_to_token"][row, start:start + scored].long()].float()
    token_scores = score_thoughts(case["query"][batch], keys)  # [num_heads, scored]
    mass = attention_mass(token_scores, torch.ones(scored), case["log_normalizer"][batch], 0.3)
    return mass.sum(dim=1) * length / scored


def test_batched_votes_equal_the_per_request_algorithm():
    for seed in range(4):
        case = vote_case(seed)
        votes, weights = run_votes(accumulate_votes, case, layers=2)
        chosen, agree = select_top(votes, weights, case["num_candidates"], c=3)
        for v in range(5):
            n = int(case["num_candidates"][v])
            if n == 0:
                assert votes[v].abs().sum() == 0 and weights[v].abs().sum() == 0 and chosen[v].tolist() == [-1] * 3
                continue
            entries = case["candidates"][case["voter_rows"][v], :n].long()
            means = case["sums"][entries] / case["counts"][entries].clamp(min=1)[:, None, None]
            scores = score_thoughts(case["query"][case["voter_batch"][v]], means)
            if case["vote_kind"][v] == COUNT:
                head, sums = head_votes(scores, 2)
                assert torch.equal(votes[v, :n], 2 * head.float())
                torch.testing.assert_close(weights[v, :n], 2 * sums, rtol=1e-5, atol=1e-4)
                assert abs(float(agree[v]) - agreement(votes[v, :n], chosen[v][chosen[v] >= 0].tolist())) < 1e-6
            else:
                mass = attention_mass(scores, case["counts"][entries], case["log_normalizer"][case["voter_batch"][v]], 0.3)
                if case["vote_kind"][v] == MASS:
                    token_masses = [summary_token_mass(case, v, j) for j in range(n)]
                    assert sum(m is not None for m in token_masses) >= 2  # the case scores summaries
                    for j, token_mass in enumerate(token_masses):
                        if token_mass is not None:
                            mass[:, j] = token_mass
                assert votes[v].abs().sum() == 0
                torch.testing.assert_close(weights[v, :n], 2 * mass.sum(dim=0), rtol=1e-5, atol=1e-7)
                assert float(agree[v]) == 1.0
            expected = select_thoughts(votes[v, :n], weights[v, :n], 3)
            assert chosen[v, : len(expected)].tolist() == expected and (chosen[v, len(expected):] == -1).all()
            assert votes[v, n:].abs().sum() == 0 and weights[v, n:].abs().sum() == 0


def commit_case(device="cpu"):
    gen = torch.Generator().manual_seed(9)
    key_buffer = torch.randn(50, 2, 8, generator=gen).to(torch.bfloat16).to(device)
    slots = torch.tensor([3, 9, 9, 20, 0, 0], device=device)
    entries = torch.tensor([1, 1, 4, 6, 6, 6], device=device)
    return key_buffer, slots, entries


def commit_reference(key_buffer, slots, entries, n):
    sums, counts = torch.zeros(7, 2, 8), torch.zeros(7)
    for slot, entry in zip(slots[:n].tolist(), entries[:n].tolist()):
        sums[entry] += key_buffer[slot].float().cpu()
        counts[entry] += 1
    return sums, counts


INTERPRETER_SCRIPT = r"""
import json, torch
from zoomr_sglang.algo.batched_votes import accumulate_votes as torch_votes
from zoomr_sglang.kernels import thought_index as ti
from test_batched_votes import vote_case, run_votes, commit_case, commit_reference
assert ti.triton_interpreted(), "TRITON_INTERPRET=1 did not reach the kernels"
out = {"votes": [], "commits": []}
for seed in range(3):
    case = vote_case(seed)
    scratch = ti.vote_scratch(5, 8, 12, "cpu")
    for topk in (1, 2, 13):
        kv, kw = run_votes(ti.accumulate_votes_triton, case, topk=topk, scratch=scratch)
        tv, tw = run_votes(torch_votes, case, topk=topk)
        out["votes"].append({"votes_equal": bool(torch.equal(kv, tv)),
                             "weights_close": bool(torch.allclose(kw, tw, rtol=1e-4, atol=1e-5))})
key_buffer, slots, entries = commit_case()
sums, counts = torch.zeros(7, 2, 8), torch.zeros(7)
ti.commit_keys(sums, counts, key_buffer, slots, entries, torch.tensor([4]))  # the last two slots are padding
ref_sums, ref_counts = commit_reference(key_buffer, slots, entries, 4)
out["commits"].append({"sums_close": bool(torch.allclose(sums, ref_sums)), "counts_equal": bool(torch.equal(counts, ref_counts))})
# Columns of one [n, 3] commits tensor, as the load's bulk commits pass them: strided views.
packed = torch.stack([slots, entries, entries], dim=1)
sums, counts = torch.zeros(7, 2, 8), torch.zeros(7)
ti.commit_keys(sums, counts, key_buffer, packed[:, 0], packed[:, 1], torch.tensor([4]))
out["commits"].append({"sums_close": bool(torch.allclose(sums, ref_sums)), "counts_equal": bool(torch.equal(counts, ref_counts))})
print(json.dumps(out))
"""


def test_triton_kernels_in_interpreter_match_torch():
    out = run_script(INTERPRETER_SCRIPT, interpret=True, timeout=600)
    assert len(out["votes"]) == 9 and all(v == {"votes_equal": True, "weights_close": True} for v in out["votes"])
    assert out["commits"] == [{"sums_close": True, "counts_equal": True}] * 2


@pytest.mark.parametrize("kernel", ["_vote_kernel", "_commit_kernel"])
def test_triton_kernels_compile_for_sm90_without_a_gpu(kernel):
    types = {"query": "*bf16", "keys": "*bf16", "candidates": "*i32", "voter_rows": "*i64", "voter_batch": "*i64",
             "num_candidates": "*i64", "vote_kind": "*i64", "slots": "*i64", "entries": "*i64",
             "num_commits": "*i64", "spans": "*i32", "req_to_token": "*i32", "key_buffer": "*bf16",
             "scaling": "fp32", **{name: "*fp32" for name in ("lse", "sums", "counts", "votes", "weights", "scratch")}}
    constants = {"GROUP": 4, "GROUP_P2": 4, "HEAD_DIM": 128, "DIM_P2": 128, "BLOCK": ti.BLOCK_CANDIDATES, "TOPK": 2,
                 "BOUND_ON_HOST": False, "WIDTH": 1024, "WIDTH_P2": 1024, "MASS_KIND": MASS, "COUNT_KIND": COUNT}
    assert_compiles_for_sm90(ti, kernel, types, constants)


@pytest.mark.cuda
@needs_cuda
def test_triton_kernels_on_cuda_match_torch_and_never_sync():
    for seed in range(3):
        case = vote_case(seed, device="cuda")
        cpu_case = {k: v.cpu() for k, v in case.items()}
        scratch = ti.vote_scratch(5, 8, 12, "cuda")
        kv, kw = run_votes(ti.accumulate_votes, case, scratch=scratch)
        tv, tw = run_votes(accumulate_votes, cpu_case)
        assert torch.equal(kv.cpu(), tv) and torch.allclose(kw.cpu(), tw, rtol=1e-3, atol=1e-4)
    key_buffer, slots, entries = commit_case("cuda")
    sums, counts = torch.zeros(7, 2, 8, device="cuda"), torch.zeros(7, device="cuda")
    # Device tensors are built before the checked region (torch.tensor(..., device="cuda") is a
    # blocking host-to-device copy), and the commit kernel is compiled on a throwaway store first:
    # the check is about the launches a decode step makes, not a first compile.
    num_commits = torch.tensor([4], device="cuda")
    ti.commit_keys(sums.clone(), counts.clone(), key_buffer, slots, entries, num_commits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ti.commit_keys(sums, counts, key_buffer, slots, entries, num_commits)
        run_votes(ti.accumulate_votes, case, scratch=scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_sums, ref_counts = commit_reference(key_buffer, slots, entries, 4)
    assert torch.allclose(sums.cpu(), ref_sums, rtol=1e-5, atol=1e-5) and torch.equal(counts.cpu(), ref_counts)
