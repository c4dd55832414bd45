"""Paged KV cache bookkeeping: blocks, ref counts, prefix caching, LRU eviction. No torch.

A request's KV lives in fixed-size blocks. A block that is completely filled with tokens gets a
hash that chains its parent's hash with its own token ids, so two requests with the same prefix
map to the same chain of blocks and share them (ref counts). When the last user of a hashed
block lets go, the block keeps its contents and hash and joins the tail of the free queue; it is
evicted (its hash dropped) only when it reaches the head and is handed out again. A cache hit
on a free block pulls it out of the middle of the queue: that is why the queue is a doubly
linked list (O(1) removal, no Python allocation per operation).

Sliding window (``sliding_window``: set only when every attention layer slides over the same
window): a block whose positions all lie before the window of the next token to compute is
no longer read, so it is given back while its request runs, as vLLM's sliding-window manager
does. Its slot in the request's block list becomes None and its id stays in the block table
(the attention kernels start at the window; a read of a reused block there is masked out),
so positions keep mapping to table entries. A hashed block given back stays in the prefix
cache until it is evicted, like any freed one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from modelport.engine.request import Request

# (parent hash digest, the block's token ids): the exact key, so a lookup verifies the tokens
# and a digest collision can never alias two different prefixes.
BlockHash = tuple[bytes, tuple[int, ...]]


def hash_block(parent: bytes, token_ids: Sequence[int]) -> BlockHash:
    return (parent, tuple(token_ids))


def digest(h: BlockHash) -> bytes:
    parent, tokens = h
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev: KVBlock | None = field(default=None, repr=False)
    next: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks; head = next to hand out (least recently freed)."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self.num_free = len(blocks)
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        prev = self._head
        for b in blocks:
            prev.next, b.prev = b, prev
            prev = b
        prev.next, self._tail.prev = self._tail, prev

    def popleft(self) -> KVBlock:
        b = self._head.next
        if b is None or b is self._tail:
            raise IndexError("no free blocks")
        self.remove(b)
        return b

    def remove(self, b: KVBlock) -> None:
        assert b.prev is not None and b.next is not None, f"block {b.block_id} is not free"
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.num_free -= 1

    def append(self, b: KVBlock) -> None:
        last = self._tail.prev
        assert last is not None
        last.next, b.prev, b.next, self._tail.prev = b, last, self._tail, b
        self.num_free += 1

    def appendleft(self, b: KVBlock) -> None:
        first = self._head.next
        assert first is not None
        self._head.next, b.prev, b.next, first.prev = b, self._head, first, b
        self.num_free += 1

    def ids(self) -> list[int]:
        out, b = [], self._head.next
        while b is not None and b is not self._tail:
            out.append(b.block_id)
            b = b.next
        return out


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        # a request's blocks by position; None: given back after it left the sliding window
        self.req_blocks: dict[str, list[KVBlock | None]] = {}
        self.req_num_released: dict[str, int] = {}  # leading blocks given back (sliding window)
        self.req_block_ids: dict[str, list[int]] = {}  # kept beside req_blocks: no rebuild per step
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.req_last_digest: dict[str, bytes] = {}
        self.req_num_published: dict[str, int] = {}  # leading blocks cache_full_blocks has seen
        # prefix-cache statistics, in tokens
        self.queries = 0
        self.hits = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.free_queue.num_free / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return list(self.req_block_ids.get(request_id, ()))

    def _block_hashes(self, req: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended lazily as tokens arrive."""
        rid = req.request_id
        hashes = self.req_hashes.setdefault(rid, [])
        bs = self.block_size
        n_full = req.num_tokens // bs
        if len(hashes) < n_full:
            parent = self.req_last_digest.get(rid)
            if parent is None:
                parent = req.cache_salt  # b"" for the base model, the adapter's otherwise
            for i in range(len(hashes), n_full):
                h = hash_block(parent, req.all_token_ids[i * bs : (i + 1) * bs])
                hashes.append(h)
                parent = digest(h)
            self.req_last_digest[rid] = parent
        return hashes

    def first_block_hash(self, req: Request) -> BlockHash | None:
        hashes = self._block_hashes(req)
        return hashes[0] if hashes else None

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of req in whole blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching or req.computes_whole_prompt:
            return [], 0
        hashes = self._block_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hit: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        self.queries += req.num_tokens
        self.hits += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock] = ()
    ) -> list[int] | None:
        """Make room for num_new_tokens more tokens of req; None if the free blocks can't cover it.

        computed_blocks (prefix-cache hits from get_computed_blocks) are taken only on success.
        Returns the request's full block table.
        """
        blocks = self.req_blocks.get(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        if self.sliding_window is not None and blocks:
            self._release_out_of_window(req.request_id, blocks, num_computed)
        need_total = -(-(num_computed + num_new_tokens) // self.block_size)
        have = len(blocks) + len(computed_blocks)
        num_new_blocks = max(0, need_total - have)
        # hits that sit in the free queue stop being free once taken
        free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + free_hits > self.free_queue.num_free:
            return None
        for b in computed_blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1
        blocks = self.req_blocks.setdefault(req.request_id, blocks)
        ids = self.req_block_ids.setdefault(req.request_id, [])
        blocks.extend(computed_blocks)
        ids.extend(b.block_id for b in computed_blocks)
        for _ in range(num_new_blocks):
            b = self.free_queue.popleft()
            if b.block_hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            blocks.append(b)
            ids.append(b.block_id)
        return ids

    def _release_out_of_window(self, rid: str, blocks: list[KVBlock | None],
                               num_computed: int) -> None:
        """Give back the leading blocks that no query from position num_computed on can see
        (a query at p reads keys > p - window)."""
        first_needed = num_computed - self.sliding_window + 1
        end = min(max(0, first_needed) // self.block_size, len(blocks))
        start = self.req_num_released.get(rid, 0)
        if end <= start:
            return
        for i in range(start, end):
            b = blocks[i]
            blocks[i] = None
            if b is not None:
                self._unref(b)
        self.req_num_released[rid] = end

    def _unref(self, b: KVBlock) -> None:
        b.ref_cnt -= 1
        assert b.ref_cnt >= 0, f"block {b.block_id} ref count below zero"
        if b.ref_cnt == 0:
            # an unhashed block holds nothing reusable: hand it out before cached ones
            if b.block_hash is None:
                self.free_queue.appendleft(b)
            else:
                self.free_queue.append(b)

    def cache_full_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Publish req's blocks that are full of computed tokens for prefix reuse."""
        if not self.enable_prefix_caching:
            return
        rid = req.request_id
        blocks = self.req_blocks.get(rid)
        if not blocks:
            return
        start = self.req_num_published.get(rid, 0)
        n_full = min(num_computed_tokens // self.block_size, len(blocks))
        if n_full <= start:
            return  # no block filled up since the last call (the common decode step)
        hashes = self._block_hashes(req)
        n_full = min(n_full, len(hashes))
        self.req_num_published[rid] = n_full
        for i in range(start, n_full):
            b = blocks[i]
            if b is None or b.block_hash is not None:  # given back, or already published
                continue
            h = hashes[i]
            if h in self.cached:  # same content already cached in another block: keep that one
                continue
            b.block_hash = h
            self.cached[h] = b

    def free(self, req: Request) -> None:
        """Release req's blocks. Tail blocks are freed first so they are evicted first."""
        blocks = self.req_blocks.pop(req.request_id, [])
        self.req_block_ids.pop(req.request_id, None)
        self.req_hashes.pop(req.request_id, None)
        self.req_last_digest.pop(req.request_id, None)
        self.req_num_published.pop(req.request_id, None)
        self.req_num_released.pop(req.request_id, None)
        for b in reversed(blocks):
            if b is not None:
                self._unref(b)

    def reset_prefix_cache(self) -> bool:
        if self.free_queue.num_free != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
        return True

    def check_integrity(self) -> None:
        """Expensive invariant check, for tests and debug mode."""
        free_ids = self.free_queue.ids()
        assert len(free_ids) == self.free_queue.num_free == len(set(free_ids))
        used: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                if b is not None:
                    used[b.block_id] = used.get(b.block_id, 0) + 1
        for b in self.blocks:
            assert b.ref_cnt == used.get(b.block_id, 0), f"block {b.block_id} ref count mismatch"
            assert (b.ref_cnt == 0) == (b.block_id in set(free_ids)), f"block {b.block_id} free state"
        for h, b in self.cached.items():
            assert b.block_hash == h
        for rid, blocks in self.req_blocks.items():
            ids = self.req_block_ids[rid]
            assert len(ids) == len(blocks)
            assert all(b is None or b.block_id == i for b, i in zip(blocks, ids))
            released = self.req_num_released.get(rid, 0)
            assert all(b is None for b in blocks[:released])
