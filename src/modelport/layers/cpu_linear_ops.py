"""How the C step (cpu_kernels.py) calls each linear layer: the very op its module forward
runs for a 2-D input, so the C path's matmuls give the module path's results.

* ``CpuInt4Kernel`` (no act-order permutation): torch's int4 GEMM, bf16 in and out.
* ``CpuInt8Kernel`` (GGUF Q5/Q6/Q8 and the other formats requantized per row): torch's int8
  GEMM up to ``CPU_INT8_MAX_M`` rows, above that the int8 weight expanded to bf16 for a bf16
  matmul, exactly as ``CpuInt8Kernel.forward`` chooses; bf16 in and out.
* ``CpuQ8Kernel`` (GGUF Q8_0 with its block scales): its C matmul up to ``CPU_Q8_MAX_M`` rows,
  the exact weight expanded above, as ``CpuQ8Kernel.matmul`` chooses; float32 or bf16 in, the
  same out (``any_dtype``: the C step picks the dtype of the model's other matmuls, float32
  where all are Q8_0).
* A plain float layer (``quant_method is None``, weight float32 or bfloat16): ``F.linear``
  with its bias, in and out in the weight's dtype, as ``Linear.forward`` runs it.

A quantized layer's bias is added by ``GroupQuantMethod.apply`` after the kernel, in float32
for a float32 model; the C attention call adds a qkv bias the same way, and a bias on the
other quantized projections is not taken (the model keeps the module path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_Call = tuple  # (op, args): op(x, *args) -> y


def _int8_expanded(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CpuInt8Kernel.forward's branch for more than CPU_INT8_MAX_M rows, on a bf16 [M, K]."""
    return F.linear(x, qweight.to(torch.bfloat16) * scale[:, None])


@dataclass(frozen=True)
class LinearOp:
    """One linear layer as the C step calls it: ``small`` for a step of at most
    ``CPU_INT8_MAX_M`` rows, ``large`` for more (the same call except on the int8 kernel)."""

    small: _Call
    large: _Call
    dtype: torch.dtype  # of its input and of its output
    kind: str  # "int4", "int8", "q8_0" or "float"
    c_bias: torch.Tensor | None  # float32, for the C code to add after the matmul (qkv only)
    any_dtype: bool = False  # takes float32 or bf16 and gives the same (dtype: float32)


def ops_dtype(ops) -> torch.dtype:  # noqa: ANN001 - an iterable of LinearOp
    """The one input / output dtype of these ops' C buffers: that of their int4 / int8 /
    float ops, float32 where every op takes either (Q8_0)."""
    return next((op.dtype for op in ops if not op.any_dtype), torch.float32)


def _q8_matmul(x: torch.Tensor, kernel) -> torch.Tensor:
    """CpuQ8Kernel.matmul on the C step's [M, K] float32 or bf16 buffer."""
    return kernel.matmul(x)


def q8_matmul_f32(x: torch.Tensor, kernel) -> torch.Tensor:
    """The same with a float32 output whatever x's dtype: a bf16 step's o / down projection
    on Q8_0, whose output the next C norm reads in either dtype, stays float32 as on the
    module path (CpuQ8Kernel.forward on the model's float32 activations)."""
    return kernel.matmul(x, torch.float32)


def linear_op(lin, bias_in_c: bool) -> LinearOp | str:
    """The op for ``lin``, or why the C step cannot call it. ``bias_in_c``: the layer is the
    fused qkv projection, whose quantized bias the C attention call adds."""
    from modelport.quantization.kernels import (
        CpuInt4Kernel,
        CpuInt8Kernel,
        CpuQ8Kernel,
        GroupQuantMethod,
    )

    if lin.quant_method is None:
        w = lin.weight
        if w.dtype not in (torch.float32, torch.bfloat16) or w.is_cuda:
            return f"a float linear layer of dtype {w.dtype}"
        call = (F.linear, (w, lin.bias))
        return LinearOp(call, call, w.dtype, "float", None)
    k = getattr(lin, "qkernel", None)
    if not isinstance(lin.quant_method, GroupQuantMethod) or type(k) not in (
            CpuInt4Kernel, CpuInt8Kernel, CpuQ8Kernel):
        return "a linear layer on none of the int4, int8 or Q8_0 CPU kernels"
    bias = lin.bias
    if bias is not None and not bias_in_c:
        return "a bias on a quantized projection other than qkv"
    c_bias = bias.detach().float().contiguous() if bias is not None else None
    if type(k) is CpuQ8Kernel:
        call = (_q8_matmul, (k,))
        return LinearOp(call, call, torch.float32, "q8_0", c_bias, any_dtype=True)
    if type(k) is CpuInt4Kernel:
        if k.perm is not None:
            return "an act-order (permuted) int4 layer"
        call = (torch.ops.aten._weight_int4pack_mm_for_cpu.default,
                (k.packed, k.group_size, k.scale_zero))
        return LinearOp(call, call, torch.bfloat16, "int4", c_bias)
    small = (torch.ops.aten._weight_int8pack_mm.default, (k.qweight, k.scale))
    return LinearOp(small, (_int8_expanded, (k.qweight, k.scale)), torch.bfloat16, "int8",
                    c_bias)
