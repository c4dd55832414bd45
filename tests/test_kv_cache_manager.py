"""KV cache manager: exact block ids for sharing, reuse, eviction order (pure Python)."""

from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request
from modelport.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], **kw) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=kw.pop("max_tokens", 4), **kw))


def alloc(kv: KVCacheManager, r: Request) -> list[int]:
    hit, n = kv.get_computed_blocks(r)
    ids = kv.allocate_slots(r, r.num_tokens - n, hit)
    assert ids is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r, r.num_computed_tokens)
    return ids


def test_fresh_allocation_takes_blocks_in_order() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))  # 3 blocks (2 full)
    assert alloc(kv, a) == [0, 1, 2]
    assert kv.num_free_blocks == 5
    kv.check_integrity()


def test_equal_prefixes_share_full_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    b = req("b", list(range(8)) + [99, 98, 97])
    assert alloc(kv, a) == [0, 1, 2]
    hit, n = kv.get_computed_blocks(b)
    assert [x.block_id for x in hit] == [0, 1] and n == 8
    assert kv.allocate_slots(b, b.num_tokens - n, hit) == [0, 1, 3]
    assert kv.blocks[0].ref_cnt == 2 and kv.blocks[1].ref_cnt == 2
    kv.check_integrity()


def test_different_prefix_does_not_share() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    alloc(kv, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second block content, different first block: the chained hash must differ
    hit, n = kv.get_computed_blocks(req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert hit == [] and n == 0


def test_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    alloc(kv, req("a", list(range(8))))
    hit, n = kv.get_computed_blocks(req("b", list(range(8))))
    assert n == 4 and [x.block_id for x in hit] == [0]


def test_copy_free_reuse_after_finish() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", list(range(9)))
    assert alloc(kv, a) == [0, 1, 2]
    kv.free(a)
    # the unhashed tail block goes to the front of the free queue, hashed ones to the back
    assert kv.free_queue.ids() == [2, 3, 4, 5, 1, 0]
    b = req("b", list(range(8)) + [50, 51])
    hit, n = kv.get_computed_blocks(b)
    assert [x.block_id for x in hit] == [0, 1] and n == 8
    assert kv.allocate_slots(b, 2, hit) == [0, 1, 2]
    assert kv.hits == 8
    kv.check_integrity()


def test_lru_eviction_order() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4])
    b = req("b", [5, 6, 7, 8])
    alloc(kv, a)  # blocks 0,1
    alloc(kv, b)  # blocks 2,3
    kv.free(a)  # queue: 1, 0
    kv.free(b)  # queue: 1, 0, 3, 2
    assert kv.free_queue.ids() == [1, 0, 3, 2]
    c = req("c", [9, 10, 11])  # needs 2 blocks: evicts 1 then 0 (a's tail first)
    assert alloc(kv, c) == [1, 0]
    assert kv.get_computed_blocks(req("a2", [1, 2, 3, 4, 0]))[1] == 0  # a's blocks are gone
    hit, n = kv.get_computed_blocks(req("b2", [5, 6, 7, 8, 0]))
    assert n == 4 and [x.block_id for x in hit] == [2, 3]  # b's survived
    kv.check_integrity()


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    alloc(kv, req("a", list(range(8))))
    big = req("big", list(range(100, 109)))
    assert kv.allocate_slots(big, 9) is None
    assert kv.num_free_blocks == 1 and "big" not in kv.req_blocks
    kv.check_integrity()


def test_prompt_logprobs_disable_prefix_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    alloc(kv, req("a", list(range(9))))
    assert kv.get_computed_blocks(req("b", list(range(9)), prompt_logprobs=1)) == ([], 0)
