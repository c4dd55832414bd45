"""Bit packing shared by the AWQ and GPTQ layouts: codes <-> int32 words."""

from __future__ import annotations

import torch


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern (two's complement)."""
    return (((words + 2**31) % 2**32) - 2**31).to(torch.int32)


def pack_along(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into int32 words along ``dim``, first code lowest."""
    if 32 % bits:
        raise ValueError(f"unsupported bit width {bits}: supported 2, 4, 8")
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    if c.shape[-1] % per:
        raise ValueError(f"{c.shape[-1]} values do not fill whole {bits}-bit words of {per}")
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=c.device)
    return to_int32((c << shifts).sum(-1)).movedim(-1, dim).contiguous()


def unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_along: int32 words -> uint8 codes, ``32 // bits`` per word."""
    w = words.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device)
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*w.shape[:-1], -1).to(torch.uint8).movedim(-1, dim).contiguous()
