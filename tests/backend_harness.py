"""Drive a ZoomR backend directly with SGLang's real CPU pools, without an engine.

A ``ReqToTokenPool`` and an ``MHATokenToKVPool`` on the CPU, a stand-in runner holding them, a
``RadixAttention`` per layer, a stand-in decode ``ForwardBatch`` and, per request, a stand-in for
SGLang's ``Req`` (its rid, prompt and output ids, custom params). Each step does what SGLang and the
plug-in's hooks do: the new token joins the request's output, the controller plans the step
(``begin_decode``, the ``ModelRunner.forward`` hook), then the backend builds its metadata and runs
every layer. Keys, values and queries are random; token ids come from a script that writes
thoughts, blank lines and summaries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Optional

import torch

from zoomr_sglang.attention_backend.controller import ZoomRController
from zoomr_sglang.attention_backend.torch_backend import ZoomRTorchBackend
from zoomr_sglang.config import ZoomRConfig

VOCAB = ["a", "b", "c", " d", ".", "\n", "\n\n", "<|begin_of_summary|>", "<|end_of_summary|>", "<|", "begin_of_summary|>", " e"]
TOKEN = {text: i for i, text in enumerate(VOCAB)}


def scripted_tokens(rng: random.Random, n: int, *, summaries: bool) -> List[int]:
    """Thoughts of 3-25 words closed by '.' and a blank line; with ``summaries``, most thoughts are
    followed by a summary, sometimes with the begin marker split over two tokens."""
    out: List[int] = []
    while len(out) < n:
        out += [TOKEN[rng.choice(["a", "b", "c", " d", " e"])] for _ in range(rng.randint(3, 25))]
        out += [TOKEN["."], TOKEN["\n\n"]] if rng.random() < 0.8 else [TOKEN["."], TOKEN["\n"], TOKEN["\n"]]
        if summaries and rng.random() < 0.7:
            out += [TOKEN["<|begin_of_summary|>"]] if rng.random() < 0.5 else [TOKEN["<|"], TOKEN["begin_of_summary|>"]]
            out += [TOKEN[rng.choice(["a", "b", " d"])] for _ in range(rng.randint(1, 4))]
            out += [TOKEN["<|end_of_summary|>"], TOKEN["\n\n"]]
    return out[:n]


@dataclass
class Harness:
    config: ZoomRConfig
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    pool_rows: int = 8
    pool_tokens: int = 8192
    max_context: int = 4096
    seed: int = 0
    host_tier_tokens: int = 0  # > 0: attach a host tier of this many tokens (ZoomR's tiering)
    index_capacity: int = 1024
    rows: List[int] = field(default_factory=list)
    seq_lens: List[int] = field(default_factory=list)
    query_override: Optional[torch.Tensor] = None  # [num_heads, head_dim] used for every request when set
    last_batch: Optional[SimpleNamespace] = None

    def __post_init__(self):
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

        from zoomr_sglang.attention_backend.host_tier import HostKVTier
        from zoomr_sglang.attention_backend.tiering import ThoughtTiering

        torch.manual_seed(self.seed)
        self.req_to_token_pool = ReqToTokenPool(self.pool_rows, self.max_context, device="cpu", enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(
            self.pool_tokens, page_size=1, dtype=torch.float32, head_num=self.num_kv_heads,
            head_dim=self.head_dim, layer_num=self.num_layers, device="cpu", enable_memory_saver=False,
        )
        self.allocator = TokenToKVPoolAllocator(self.pool_tokens, torch.float32, "cpu", self.kv_pool, need_sort=False)
        tiering = None
        if self.host_tier_tokens:
            host = HostKVTier(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              v_head_dim=self.head_dim, dtype=torch.float32, capacity_tokens=self.host_tier_tokens,
                              pin_memory=False)
            tiering = ThoughtTiering(config=self.config, host_tier=host, allocator=self.allocator,
                                     req_to_token_pool=self.req_to_token_pool, kv_pool=self.kv_pool, page_size=1)
        runner = self.backend_runner()
        self.controller = ZoomRController(
            config=self.config, token_texts=VOCAB, req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.kv_pool, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, device="cpu",
            index_capacity=self.index_capacity, max_voters=self.pool_rows, allocator=self.allocator, tiering=tiering,
        )
        self.reqs: List[SimpleNamespace] = []
        self.backend = ZoomRTorchBackend(runner, self.controller)
        self.layers = [
            RadixAttention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id)
            for layer_id in range(self.num_layers)
        ]

    @property
    def states(self):
        """Pool row -> RequestState of every request that has decoded."""
        return self.controller.planner.states

    @property
    def plan(self):
        """The last decode step's HostPlan."""
        return self.controller.step

    def backend_runner(self) -> SimpleNamespace:
        return SimpleNamespace(device="cpu", req_to_token_pool=self.req_to_token_pool, token_to_kv_pool=self.kv_pool)

    def add_request(self, prompt_len: int, custom_params: Optional[dict] = None) -> None:
        """Allocate a row and slots for the prompt and fill the prompt's KV with random values;
        ``custom_params`` reach the controller as SGLang's row-allocation hook passes them."""
        (row,) = self.req_to_token_pool.alloc_rows(1)
        req = SimpleNamespace(rid=f"req-{row}", origin_input_ids=[0] * prompt_len, output_ids=[], prefix_len=0,
                              sampling_params=SimpleNamespace(custom_params=custom_params, max_new_tokens=1 << 20))
        self.controller.note_request(row, req)
        self.reqs.append(req)
        slots = self._take_slots(prompt_len)
        self.req_to_token_pool.req_to_token[row, :prompt_len] = slots.to(torch.int32)
        for layer in range(self.num_layers):
            self.kv_pool.get_key_buffer(layer)[slots] = torch.randn(prompt_len, self.num_kv_heads, self.head_dim)
            self.kv_pool.get_value_buffer(layer)[slots] = torch.randn(prompt_len, self.num_kv_heads, self.head_dim)
        self.rows.append(row)
        self.seq_lens.append(prompt_len)

    def release_all(self) -> None:
        """What SGLang's release path does with the plug-in's hooks: free each row's slots except
        its holes, then the row (which releases the request's ZoomR state)."""
        from zoomr_sglang.algo.working_set import subtract_ranges

        tiering = self.controller.tiering
        for row, seq_len in zip(self.rows, self.seq_lens):
            holes = tiering.holes(row) if tiering is not None else []
            for start, end in subtract_ranges([(0, seq_len)], holes):
                self.allocator.free(self.req_to_token_pool.req_to_token[row, start:end].long())
        self.req_to_token_pool.free_rows(self.rows)
        for row in self.rows:
            self.controller.release_row(row)
        self.rows, self.seq_lens, self.reqs = [], [], []

    def _take_slots(self, n: int) -> torch.Tensor:
        slots = self.allocator.alloc(n)
        assert slots is not None, "the test's KV pool is too small"
        return slots.to(torch.int64)

    def decode_step(self, tokens: List[int], backend=None):
        """One decode step of every request: returns (batch, per-layer queries, k, v, outputs)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        backend = backend or self.backend
        bs = len(self.rows)
        out_cache_loc = self._take_slots(bs)
        for i, row in enumerate(self.rows):
            self.req_to_token_pool.req_to_token[row, self.seq_lens[i]] = int(out_cache_loc[i])
            self.seq_lens[i] += 1
            self.reqs[i].output_ids.append(tokens[i])
        rids = [req.rid for req in self.reqs]
        self.controller.begin_decode(rids, self.seq_lens)
        batch = SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=bs,
            req_pool_indices=torch.tensor(self.rows, dtype=torch.int64),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int64),
            seq_lens_cpu=torch.tensor(self.seq_lens, dtype=torch.int64),
            input_ids=torch.tensor(tokens, dtype=torch.int64), out_cache_loc=out_cache_loc,
            rids=rids, encoder_lens=None, out_cache_loc_is_physical=False,
        )
        backend.init_forward_metadata(batch)
        self.last_batch = batch
        steps = []
        for layer in self.layers:
            q = torch.randn(bs, self.num_heads * self.head_dim)
            if self.query_override is not None:
                q[:] = self.query_override.reshape(-1)
            k = torch.randn(bs, self.num_kv_heads, self.head_dim)
            v = torch.randn(bs, self.num_kv_heads, self.head_dim)
            o = backend.forward_decode(q, k, v, layer, batch)
            steps.append((q, k, v, o))
        return batch, steps
