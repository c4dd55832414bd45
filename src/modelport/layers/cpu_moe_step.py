"""An MoE layer's feed-forward in the CPU C step (cpu_kernels.py): Mixtral, Qwen2-MoE, Qwen3-MoE.

The C step runs an MoE decoder layer's attention as a dense layer's; its ``SparseMoeBlock``
then runs from the ops taken here once, without the module tree: the router's fp32 matmul on
the fp32 normed hidden (the C norm writes it beside the bf16 copy the quantized experts read),
``route()`` (softmax, top-k, renormalize), each selected expert as its gate/up op, the C
SwiGLU and its down op (cpu_linear_ops.py: the op its module would call, int4 / int8 / Q8_0
kernel or F.linear), the weighted sum as ``grouped_experts`` forms it (one token: its k experts in turn,
the sum in C in torch's order, ``mp_moe_sum``; more tokens: ``grouped_experts`` itself, grouped
by expert, each group's ops picked by its row count as CpuInt8Kernel picks), and Qwen2-MoE's
shared expert behind its sigmoid gate. The block's
output stays float32, as the module path's, and the next C norm adds it to the residual.

A block fits when its router (and shared-expert gate) are float32 ``GateLinear`` layers and
every expert's projections have an op of the plan's one dtype or one that takes either
(``any_dtype``: GGUF Q8_0 on CpuQ8Kernel); otherwise (a bf16 model, whose router runs in bf16
on the module path; an fp8 / act-order expert) the model keeps its modules. A block whose ops
all take either dtype reads the float32 normed hidden, as its experts do on the module path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from modelport.layers.cpu_linear_ops import LinearOp, linear_op, ops_dtype
from modelport.layers.fused_moe import grouped_experts, route
from modelport.quantization.kernels import CPU_INT8_MAX_M


def _mlp_ops(gate_up, down, act) -> tuple[LinearOp, LinearOp] | str:
    """A SwiGLU MLP's (gate_up, down) ops, or why the C step cannot call them."""
    from modelport.layers.activation import SiluAndMul
    from modelport.layers.linear import Linear, MergedLinear

    if type(gate_up) is not MergedLinear or type(down) is not Linear or type(act) is not SiluAndMul:
        return "an expert other than MergedLinear / Linear with SiluAndMul"
    ops = (linear_op(gate_up, False), linear_op(down, False))
    for op in ops:
        if isinstance(op, str):
            return op
    return ops  # type: ignore[return-value]


def _gate(lin) -> torch.Tensor | str:
    from modelport.layers.fused_moe import GateLinear

    if type(lin) is not GateLinear or lin.quant_method is not None:
        return "a router other than a float GateLinear"
    if lin.weight.dtype != torch.float32 or (
        lin.bias is not None and lin.bias.dtype != torch.float32
    ):
        return "a router not in float32 (its module path routes in that dtype)"
    return lin.weight


class MoeFfn:
    """One SparseMoeBlock as the C step runs it (ops taken once; ``build`` checks fit)."""

    def __init__(
        self,
        block,
        experts: list[tuple[LinearOp, LinearOp]],
        shared: tuple[LinearOp, LinearOp] | None,
    ) -> None:
        self.router_w, self.router_b = block.gate.weight, block.gate.bias
        self.top_k, self.renormalize = block.experts.top_k, block.experts.renormalize
        self.num_experts = block.experts.num_experts
        self.experts = experts
        self.shared = shared
        sg = block.shared_expert_gate
        self.shared_gate = (sg.weight, sg.bias) if shared is not None else None
        self.ops = [op for pair in experts + ([shared] if shared else []) for op in pair]
        self.dtype = ops_dtype(self.ops)  # the experts' input dtype (the plan's one, _fits)

    @classmethod
    def build(cls, block) -> MoeFfn | str:
        """The block's ops, or why it cannot take the C step."""
        from modelport.layers.fused_moe import FusedMoE
        from modelport.models.llama import LlamaMLP

        moe = block.experts
        if type(moe) is not FusedMoE:
            return f"experts of type {type(moe).__name__}"
        if getattr(moe, "quant_experts", None) is not None or getattr(
            moe, "restack_pending", False
        ):
            return "restacked quantized experts (the CUDA grouped kernels' layout)"
        if getattr(moe, "expert_offset", None) is not None:
            return "a rank's share of the experts (expert parallelism)"
        for lin in (block.gate, block.shared_expert_gate):
            why = _gate(lin) if lin is not None else None
            if isinstance(why, str):
                return why
        experts: list[tuple[LinearOp, LinearOp]] = []
        if moe.stacked:
            w13, w2 = moe.w13.weight, moe.w2.weight
            if w13.dtype not in (torch.float32, torch.bfloat16) or w13.is_cuda:
                return f"stacked experts of dtype {w13.dtype}"
            for e in range(moe.num_experts):
                gu, dn = (F.linear, (w13[e], None)), (F.linear, (w2[e], None))
                experts.append(
                    (
                        LinearOp(gu, gu, w13.dtype, "float", None),
                        LinearOp(dn, dn, w2.dtype, "float", None),
                    )
                )
        else:
            for e in range(moe.num_experts):
                m = moe.get_submodule(str(e))
                ops = _mlp_ops(m.gate_up_proj, m.down_proj, m.act)
                if isinstance(ops, str):
                    return ops
                experts.append(ops)
        shared = None
        if block.shared_expert is not None:
            s = block.shared_expert
            if type(s) is not LlamaMLP:
                return f"a shared expert of type {type(s).__name__}"
            shared = _mlp_ops(s.gate_up_proj, s.down_proj, s.act)
            if isinstance(shared, str):
                return shared
        return cls(block, experts, shared)

    def _mlp(
        self, lib: ctypes.CDLL, ops: tuple[LinearOp, LinearOp], x: torch.Tensor
    ) -> torch.Tensor:
        """down(silu(gate) * up) of x (in the ops' dtype), each op chosen by x's rows."""
        gate_up, down = ops
        big = x.shape[0] > CPU_INT8_MAX_M
        fn, args = gate_up.large if big else gate_up.small
        gu = fn(x, *args)
        inter = gu.shape[1] // 2
        act = torch.empty(x.shape[0], inter, dtype=gu.dtype)
        lib.mp_silu_mul_io(
            x.shape[0], inter, gu.data_ptr(), act.data_ptr(), int(gu.dtype == torch.float32)
        )
        fn, args = down.large if big else down.small
        return fn(act, *args)

    def __call__(self, lib: ctypes.CDLL, xf: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
        """The block's float32 output for the normed hidden ``xf`` (float32) and ``xd`` (the
        same in the plan's dtype: ``xf`` itself in a float32 plan)."""
        logits = F.linear(xf, self.router_w, self.router_b)
        weights, ids = route(logits, self.top_k, self.renormalize)
        dt = self.dtype
        if dt == torch.float32:  # float32 or Q8_0 experts in a bf16 plan: the float32 copy
            xd = xf

        rows, h = xf.shape
        if rows == 1 and h % 64 == 0:
            # grouped_experts' one-token path, its sum in C: torch's sum over the k rows adds
            # them in order j = 0, 1, ... in its vector loop (4 vectors of columns at a time:
            # 64 floats with AVX-512, 32 with AVX2), not so in a remainder of fewer columns,
            # so other widths keep the torch sum (checked in tests/test_cpu_moe_step.py)
            ys = [self._mlp(lib, self.experts[e], xd) for e in ids[0].tolist()]
            ptrs = (ctypes.c_void_p * len(ys))(*[y.data_ptr() for y in ys])
            out = torch.empty(1, h, dtype=torch.float32)
            lib.mp_moe_sum(
                len(ys),
                h,
                ptrs,
                int(ys[0].dtype == torch.float32),
                weights.contiguous().data_ptr(),
                out.data_ptr(),
            )
        else:

            def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
                return self._mlp(lib, self.experts[e], xs.to(dt))

            out = grouped_experts(xf, self.num_experts, expert, weights, ids)
        if self.shared is not None:
            gw, gb = self.shared_gate
            out = out + torch.sigmoid(F.linear(xf, gw, gb)) * self._mlp(lib, self.shared, xd)
        return out
