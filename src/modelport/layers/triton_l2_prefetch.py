"""The L2 prefetch kernels of layers/l2_prefetch.py (CUDA only; imported on first use).

``bulk_prefetch``: each thread asks the sm90 TMA unit to bring one CHUNK of the tensor into
L2 (``cp.async.bulk.prefetch.L2.global``) and exits; the copy goes on without the kernel.
``load_prefetch``: a streaming read of the bytes with the evict-last hint,
summed into a value stored only if it equals a constant (so the loads stay in the kernel).
Neither writes anything a model reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BULK_CHUNK = 8192  # bytes a thread's prefetch covers (a multiple of 16)
BULK_THREADS = 32  # one warp a program
LOAD_BLOCK = 1024  # int32 words a program loads an iteration
LOAD_ITERS = 8

_scratch: dict[torch.device, torch.Tensor] = {}


def prepare(device: torch.device) -> None:
    """Allocate the load kernel's scratch word before any graph capture."""
    if device not in _scratch:
        _scratch[device] = torch.zeros(1, dtype=torch.int32, device=device)


@triton.jit
def _bulk_kernel(ptr, n_bytes, scratch, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    off = idx * CHUNK
    size = tl.maximum(tl.minimum(n_bytes - off, CHUNK), 0).to(tl.int32)
    r = tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + off, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(scratch + tl.zeros_like(r), r, mask=r != 0)


@triton.jit
def _load_kernel(ptr, n_words, scratch, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    s = tl.sum(acc, 0)
    tl.store(scratch, s, mask=s == 0x1F2E3D4C)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def bulk_prefetch(t: torch.Tensor, n_bytes: int) -> None:
    """Bring the first n_bytes (a multiple of 16; t 16-byte aligned) of t into L2."""
    prepare(t.device)
    per_program = BULK_CHUNK * BULK_THREADS
    grid = (triton.cdiv(n_bytes, per_program),)
    _bulk_kernel[grid](_bytes(t), n_bytes, _scratch[t.device], CHUNK=BULK_CHUNK,
                       BLOCK=BULK_THREADS, num_warps=1)


def load_prefetch(t: torch.Tensor, n_bytes: int) -> None:
    """Read the first n_bytes (a multiple of 16) of t through L2 with the evict-last hint."""
    prepare(t.device)
    words = _bytes(t)[:n_bytes].view(torch.int32)
    grid = (triton.cdiv(words.numel(), LOAD_BLOCK * LOAD_ITERS),)
    _load_kernel[grid](words, words.numel(), _scratch[t.device], BLOCK=LOAD_BLOCK,
                       ITERS=LOAD_ITERS, num_warps=4)
