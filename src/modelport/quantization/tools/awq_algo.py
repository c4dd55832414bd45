"""AWQ (Lin et al., 2023), written from the paper: protect salient input channels by scaling
them up before quantization, s = mean|x|^alpha, and fold 1/s into the op that produces the
input (an RMSNorm's weight or the rows of the previous linear), so the float function is
unchanged. alpha is chosen per group of linears that share an input by grid search on the
calibration activations' output error.

Groups per decoder layer (Llama/Qwen2): q/k/v after input_layernorm; gate/up after
post_attention_layernorm; down after up_proj; o after v_proj when q and kv head counts match
(with GQA the v rows do not map one-to-one onto o's inputs, so o keeps s = 1).

Statistics come from one pass of the float model, not GPTQ's sequential mode: llm-awq and
AutoAWQ also work layer by layer, but feed each layer the output of the previous one computed
before it is scaled and quantized, i.e. float activations. Inside a layer a sequential order
would not fit either: o's scale folds into v_proj's rows and down's into up_proj's, which
would then already be quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelport.quantization.tools.rtn import rtn_quantize

GRID = 20


@dataclass(frozen=True)
class ScaleGroup:
    stats_key: str  # our fused module name whose input statistics apply
    linears: tuple[str, ...]  # HF weight names sharing that input
    prev: str  # HF name of the tensor that absorbs 1/s (norm weight or previous linear)
    prev_is_linear: bool
    prev_rows: slice | None = None  # the rows of a fused prev (Phi-3's v in qkv, up in gate_up)
    # float linears reading the same input (MoE routers): their columns x s keep their outputs
    unquantized: tuple[str, ...] = ()


def scale_groups(num_layers: int, num_heads: int, num_kv_heads: int) -> list[ScaleGroup]:
    groups = []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        groups.append(ScaleGroup(f"{p}.self_attn.qkv_proj",
                                 tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"),
                                 f"{p}.input_layernorm.weight", False))
        groups.append(ScaleGroup(f"{p}.mlp.gate_up_proj",
                                 (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
                                 f"{p}.post_attention_layernorm.weight", False))
        groups.append(ScaleGroup(f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj.weight",),
                                 f"{p}.mlp.up_proj.weight", True))
        if num_heads == num_kv_heads:
            groups.append(ScaleGroup(f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj.weight",),
                                     f"{p}.self_attn.v_proj.weight", True))
    return groups


def fused_scale_groups(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       intermediate_size: int) -> list[ScaleGroup]:
    """The same groups for checkpoints that store qkv_proj and gate_up_proj fused (Phi-3):
    down's 1/s goes into gate_up's up rows, o's into qkv's v rows."""
    q, kv, groups = num_heads * head_dim, num_kv_heads * head_dim, []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        qkv, gate_up = f"{p}.self_attn.qkv_proj", f"{p}.mlp.gate_up_proj"
        groups.append(ScaleGroup(qkv, (f"{qkv}.weight",), f"{p}.input_layernorm.weight", False))
        groups.append(ScaleGroup(gate_up, (f"{gate_up}.weight",),
                                 f"{p}.post_attention_layernorm.weight", False))
        groups.append(ScaleGroup(f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj.weight",),
                                 f"{gate_up}.weight", True,
                                 slice(intermediate_size, 2 * intermediate_size)))
        if num_heads == num_kv_heads:
            groups.append(ScaleGroup(f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj.weight",),
                                     f"{qkv}.weight", True, slice(q + kv, q + 2 * kv)))
    return groups


def _fake_quant(w: torch.Tensor, bits: int, group: int, zero_point: bool) -> torch.Tensor:
    codes, zeros, scales = rtn_quantize(w, bits, group, sym=not zero_point)
    g = torch.arange(w.shape[1]) // (w.shape[1] if group == -1 else group)
    return (codes.float() - zeros.float()[:, g]) * scales[:, g]


def search_scale(w: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, bits: int,
                 group: int, zero_point: bool) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale s for weight w [N, K] given input rows x [S, K]."""
    y = x @ w.t()
    best, best_s, best_alpha = float("inf"), torch.ones_like(mean_abs), 0.0
    for step in range(GRID + 1):
        alpha = step / GRID
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = _fake_quant(w * s, bits, group, zero_point) / s
        loss = (x @ wq.t() - y).pow(2).mean().item()
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha


def apply_awq_scales(weights: dict[str, torch.Tensor], stats: dict, groups: list[ScaleGroup],
                     bits: int, group: int, zero_point: bool) -> dict[str, float]:
    """Search and fold scales in place into ``weights`` (float); returns alpha per group key."""
    alphas = {}
    for grp in groups:
        st = stats[grp.stats_key]
        w = torch.cat([weights[n] for n in grp.linears])
        s, alpha = search_scale(w, st.x_sample, st.mean_abs, bits, group, zero_point)
        alphas[grp.stats_key] = alpha
        for n in grp.linears + grp.unquantized:
            weights[n] = weights[n] * s[None, :]
        if grp.prev_rows is not None:
            prev = weights[grp.prev].clone()
            prev[grp.prev_rows] = prev[grp.prev_rows] / s[:, None]
            weights[grp.prev] = prev
        elif grp.prev_is_linear:
            weights[grp.prev] = weights[grp.prev] / s[:, None]
        else:
            weights[grp.prev] = weights[grp.prev] / s
    return alphas
