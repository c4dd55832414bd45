"""CUDA dequant-GEMM (Triton) for every GroupQuant weight: W4A16 / W8A16 with group scales.

The weight is packed GPTQ-style: int32 words along the input dim (8 codes of 4 bits, or 4
codes of 8 bits for 5-8-bit formats), scales and additive zeros per (group, output) in fp32.
Each program computes a [BLOCK_M, BLOCK_N] tile of y = x W^T over one slice of K (split-K, so
a single decode token still fills the GPU), walking BLOCK_K steps that never straddle a group,
reading each packed word once and expanding it in registers (shift + mask), applying the
group's affine map, and feeding tl.dot; partial sums meet in an fp32 buffer by atomic adds. Act-order weights are permuted to contiguous groups at load
time and the activation columns gathered with the same permutation.
"""

from __future__ import annotations

import functools

import torch

from modelport.quantization.kernels import GroupQuant
from modelport.quantization.packing import pack_along


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():  # noqa: ANN202 - built lazily so importing this module never needs triton
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
        for bm, bn, sk, w, st in (
            (16, 64, 4, 4, 4), (16, 128, 4, 4, 4), (16, 64, 8, 4, 4), (16, 128, 8, 4, 3),
            (64, 128, 1, 8, 3), (64, 128, 2, 8, 3), (128, 128, 1, 8, 3))
    ]

    def prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - small M: split-K tiles
        small = named_args["M_BUCKET"] <= 16
        return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]

    @triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "BITS"],
                     prune_configs_by={"early_config_prune": prune}, reset_to_zero=["y_ptr"])
    @triton.jit
    def gemm(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_BUCKET,
             stride_xm, stride_wk, stride_sg, stride_ym,
             GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rw = tl.arange(0, BLOCK_K // PER)
        shifts = tl.arange(0, PER) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :],
                        mask=(rm[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            # each packed word is read once, then expanded to PER codes in registers
            words = tl.load(w_ptr + (k0 // PER + rw)[:, None] * stride_wk + rn[None, :],
                            mask=(rn[None, :] < N), other=0)
            q = (words[:, None, :] >> shifts[None, :, None]) & MASK
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0)
            z = tl.load(z_ptr + g * stride_sg + rn, mask=rn < N, other=0.0)
            w = (q.to(tl.float32) * s[None, :] + z[None, :]).to(x.dtype)
            acc += tl.dot(x, w)
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        msk = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT_K == 1:
            tl.store(out, acc, mask=msk)
        else:
            tl.atomic_add(out, acc, mask=msk, sem="relaxed")

    return gemm


_TUNED: set[tuple] = set()


class TritonKernel(torch.nn.Module):
    def __init__(self, gq: GroupQuant, device: torch.device) -> None:
        super().__init__()
        gq, perm = gq.contiguous_groups()
        n, k = gq.shape
        self.bits = 4 if gq.bits <= 4 else 8
        self.group = gq.group_size
        self.block_k = min(128, self.group)
        if self.group % self.block_k or self.block_k % (32 // self.bits) or self.block_k < 16:
            raise ValueError(f"Triton GEMM: unsupported group size {self.group}")
        self.n, self.k = n, k
        self.register_buffer("qweight", pack_along(gq.codes.t(), self.bits, dim=0).to(device))
        self.register_buffer("scales", gq.scales.t().contiguous().float().to(device))
        self.register_buffer("zeros", gq.zeros.t().contiguous().float().to(device))
        self.register_buffer("perm", perm.to(device) if perm is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        x2 = x2.contiguous()
        m = x2.shape[0]
        # fp32 accumulator: split-K programs add their partial sums into it atomically
        y = torch.zeros((m, self.n), dtype=torch.float32, device=x.device)
        bucket = 1 << max(0, (m - 1).bit_length())  # autotune per power-of-two batch
        grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(self.n, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        args = (x2, self.qweight, self.scales, self.zeros, y, m, self.n, self.k, bucket,
                x2.stride(0), self.qweight.stride(0), self.scales.stride(0), y.stride(0))
        meta = {"GROUP": self.group, "BITS": self.bits, "BLOCK_K": self.block_k}
        _kernel()[grid](*args, **meta)
        key = (bucket, self.n, self.k, self.bits, self.group, x.dtype)
        if key not in _TUNED:  # the first call autotuned: its sums may hold the trial runs
            _TUNED.add(key)
            y.zero_()
            _kernel()[grid](*args, **meta)
        return y.to(x.dtype).reshape(*shape[:-1], self.n)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
