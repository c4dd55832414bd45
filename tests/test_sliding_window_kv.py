"""Sliding-window models give back the KV blocks that left the window while a request runs
(engine/kv_cache_manager.py), and their tokens stay those of HF transformers and of the
engine that keeps every block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import greedy_token_ids, make_tiny_mistral_dir
from modelport import LLM, SamplingParams
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request

WINDOW = 12
BLOCK = 4


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=64))


def _step(kv: KVCacheManager, r: Request, n: int) -> list[int]:
    ids = kv.allocate_slots(r, n)
    assert ids is not None
    r.num_computed_tokens += n
    kv.cache_full_blocks(r, r.num_computed_tokens)
    return ids


def test_blocks_before_the_window_are_given_back_and_cached() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW)
    r = _req("a", list(range(30)))
    ids = _step(kv, r, 30)  # positions 0..29 in blocks 0..7
    assert ids == list(range(8)) and kv.num_free_blocks == 8
    for t in range(30, 40):  # decode: the query at p reads keys > p - WINDOW
        r.append_output_token(t)
        _step(kv, r, 1)
        kv.check_integrity()
        # every block still held has a position this step's query (at p = computed - 1)
        # could read; every block given back has none
        oldest = r.num_computed_tokens - 1 - WINDOW + 1
        for i, b in enumerate(kv.req_blocks["a"]):
            last_pos = i * BLOCK + BLOCK - 1
            assert (b is None) == (last_pos < oldest), (t, i)
        held = [b for b in kv.req_blocks["a"] if b is not None]
        assert len(held) <= -(-WINDOW // BLOCK) + 1
    # block ids stay at their positions; given-back hashed blocks stay in the prefix cache
    assert kv.block_ids("a")[:8] == list(range(8))
    assert kv.blocks[0].ref_cnt == 0 and kv.blocks[0].block_hash is not None
    same = _req("b", list(range(30)))
    hit, n = kv.get_computed_blocks(same)
    assert [b.block_id for b in hit] == list(range(7)) and n == 28
    kv.free(r)
    kv.check_integrity()
    assert kv.num_free_blocks == kv.num_blocks


def test_a_shared_prefix_block_stays_with_the_request_that_still_sees_it() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, sliding_window=WINDOW)
    a = _req("a", list(range(40)))
    _step(kv, a, 40)
    b = _req("b", list(range(16)) + [99, 98])
    hit, n = kv.get_computed_blocks(b)
    assert n == 16
    assert kv.allocate_slots(b, b.num_tokens - n, hit) is not None
    b.num_computed_tokens = b.num_tokens
    kv.check_integrity()
    # a's next query (position 40) sees keys > 28: a lets go of its blocks 0..6, and those
    # that b shares (0..3) stay held by b alone
    a.append_output_token(7)
    _step(kv, a, 1)
    kv.check_integrity()
    assert [kv.blocks[i].ref_cnt for i in range(8)] == [1, 1, 1, 1, 0, 0, 0, 1]
    # b's next query (position 18) sees keys > 6: b lets go of block 0 (positions 0..3) only
    b.append_output_token(5)
    _step(kv, b, 1)
    kv.check_integrity()
    assert [x is None for x in kv.req_blocks["b"]] == [True, False, False, False, False]
    assert [kv.blocks[i].ref_cnt for i in range(4)] == [0, 1, 1, 1]


def test_without_a_window_every_block_is_kept() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    r = _req("a", list(range(30)))
    _step(kv, r, 30)
    for _ in range(8):
        _step(kv, r, 1)
    assert None not in kv.req_blocks["a"] and kv.num_free_blocks == 16 - 10


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mistral_dir(tmp_path_factory.mktemp("mistral") / "m", WINDOW)


_greedy = greedy_token_ids


def test_engine_tokens_equal_hf_and_the_keep_everything_engine(mistral: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [[(7 * i + 3 * j) % 250 for j in range(10 + 7 * i)] for i in range(3)]
    n = 40  # far past the 12-token window
    llm = LLM(str(mistral), block_size=BLOCK, kv_cache_memory=1 << 20, dtype="float32")
    core = llm.llm_engine.core
    assert core.kv.sliding_window == WINDOW
    peak: dict[str, int] = {}
    real = KVCacheManager.allocate_slots

    def watch(self, req, *a, **kw):
        ids = real(self, req, *a, **kw)
        held = sum(b is not None for b in self.req_blocks.get(req.request_id, ()))
        peak[req.request_id] = max(peak.get(req.request_id, 0), held)
        return ids

    monkeypatch.setattr(KVCacheManager, "allocate_slots", watch)
    ours = _greedy(llm, prompts, n)
    core.kv.check_integrity()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    # a request holds at most its prompt's blocks or its window's (+ 2 partly filled), not
    # the 13-16 blocks its 50-64 tokens fill
    assert len(peak) == len(prompts)
    for rid, p in enumerate(prompts):
        assert peak[str(rid)] <= max(-(-len(p) // BLOCK), WINDOW // BLOCK + 2)
    del llm

    monkeypatch.setattr(KVCacheManager, "allocate_slots", real)
    monkeypatch.setattr(KVCacheManager, "_release_out_of_window", lambda *a, **kw: None)
    keep = LLM(str(mistral), block_size=BLOCK, kv_cache_memory=1 << 20, dtype="float32")
    assert _greedy(keep, prompts, n) == ours
    del keep

    hf = AutoModelForCausalLM.from_pretrained(mistral, torch_dtype=torch.float32).eval()
    for p, toks in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=258)  # fmt: skip
        assert ref[0, len(p) :].tolist() == toks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_give_the_same_tokens_as_the_keep_everything_engine(
        mistral: Path, monkeypatch) -> None:  # fmt: skip
    # the Triton kernels start at the window; blocks given back are reused by the other
    # requests in the same run, and the tokens stay those of the engine that keeps them
    prompts = [[(5 * i + 11 * j) % 250 for j in range(9 + 13 * i)] for i in range(4)]
    kw = dict(block_size=16, kv_cache_memory=4 << 20, dtype="bfloat16", device="cuda")
    llm = LLM(str(mistral), **kw)
    assert llm.llm_engine.core.kv.sliding_window == WINDOW
    ours = _greedy(llm, prompts, 48)
    llm.llm_engine.core.kv.check_integrity()
    del llm
    torch.cuda.empty_cache()
    monkeypatch.setattr(KVCacheManager, "_release_out_of_window", lambda *a, **kw: None)
    keep = LLM(str(mistral), **kw)
    assert _greedy(keep, prompts, 48) == ours
    del keep
    torch.cuda.empty_cache()
