"""`modelport quantize` for mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE).

The checkpoint written is the public per-expert layout (``...experts.<e>.gate_proj|up_proj|
down_proj``, Mixtral's ``w1|w3|w2``), every expert quantized as its own linears; the routers
(``mlp.gate``, ``block_sparse_moe.gate``) and Qwen2-MoE's ``shared_expert_gate`` stay float.

Calibration: an expert's GPTQ Hessian (and AWQ's down-projection statistics) must come from
the tokens routed to it, not from every token. The float model is loaded for calibration with
its experts unstacked (``FusedMoE.unstack``) into ``ExpertMLP`` linears holding the float
weights, so the capture hooks on linears (``capture.collect_stats``, and the sequential mode
here) see each expert's own inputs: the normed rows routed to it at gate/up, its own
silu(gate) * up at down. Experts that receive fewer than ``min_expert_tokens`` calibration
tokens get round-to-nearest instead (a Hessian from a handful of tokens fits GPTQ to those
few directions; with none every column is dead), named in a warning.

AWQ: every expert's gate/up (and the shared expert's) reads the post-attention RMSNorm output,
as does the router. One scale is searched over all of them concatenated and its inverse folded
into the norm; the router (and the shared-expert gate) gets its columns multiplied by the same
scale, so the router logits, and hence the routing, do not change. Each expert's down has its
own scale, folded into that expert's up rows.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from modelport.layers.fused_moe import FusedMoE, SparseMoeBlock
from modelport.quantization.tools.awq_algo import ScaleGroup, scale_groups
from modelport.quantization.tools.capture import LayerStats
from modelport.quantization.tools.sequential import _run_layer, hf_weight_names

logger = logging.getLogger("modelport.quantize")

MIN_EXPERT_TOKENS = 32  # default --min-expert-tokens
EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def expert_names(architecture: str) -> tuple[str, str, str]:
    """Checkpoint names of an expert's gate / up / down projections."""
    return ("w1", "w3", "w2") if architecture == "MixtralForCausalLM" else (
        "gate_proj", "up_proj", "down_proj")


def is_expert(name: str) -> bool:
    return EXPERT.match(name) is not None


def split_stacked_experts(weights: dict[str, torch.Tensor], names: tuple[str, str, str]) -> None:
    """transformers 5's stacked layout (``experts.gate_up_proj`` [E, 2I, H], ``experts.
    down_proj`` [E, H, I]) -> the per-expert tensors the quantized checkpoint stores."""
    gate, up, down = names
    for name in [n for n in weights if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        t = weights.pop(name)
        prefix = name.rsplit(".", 1)[0]
        for e in range(t.shape[0]):
            if name.endswith("gate_up_proj"):
                i = t.shape[1] // 2
                weights[f"{prefix}.{e}.{gate}.weight"] = t[e, :i]
                weights[f"{prefix}.{e}.{up}.weight"] = t[e, i:]
            else:
                weights[f"{prefix}.{e}.{down}.weight"] = t[e]


def load_for_calibration(src, mcfg, device: str) -> nn.Module:  # noqa: ANN001
    """The float model with every FusedMoE split into per-expert linears (float weights)."""
    from modelport.config import LoadConfig
    from modelport.loader import load_model

    if device != "cpu":
        raise ValueError(f"--device {device}: calibrating a mixture-of-experts model runs on "
                         "CPU only (its per-expert layers run on CPU); use --device cpu")
    model = load_model(src, mcfg, LoadConfig(), torch.float32, torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, FusedMoE):
            w13, w2 = m.w13.weight.data, m.w2.weight.data
            m.unstack()
            for e in range(m.num_experts):
                mlp = m.get_submodule(str(e))
                mlp.gate_up_proj.weight.data.copy_(w13[e])
                mlp.down_proj.weight.data.copy_(w2[e])
    return model


def weight_names(module_name: str, module: nn.Module, names: tuple[str, str, str]
                 ) -> list[tuple[str, slice]]:
    """Checkpoint names (and output rows) of one of our linears, experts included."""
    out = hf_weight_names(module_name, module)
    if names[0] == "gate_proj":
        return out
    return [(re.sub(r"(\.experts\.\d+)\.(gate_proj|up_proj|down_proj)\.weight$",
                    lambda m: f"{m[1]}.{_MIXTRAL[m[2]]}.weight", n), rows) for n, rows in out]


def _stages(layer: nn.Module) -> list[list[str]]:
    """A decoder layer's linears in groups that read their input at the same point:
    qkv, o, every MLP's gate/up (experts, shared expert or dense MLP), every down."""
    ffn_name = layer.ffn_name
    ffn = getattr(layer, ffn_name)
    if isinstance(ffn, SparseMoeBlock):
        mlps = [f"{ffn_name}.experts.{e}" for e in range(ffn.experts.num_experts)]
        if ffn.shared_expert is not None:
            mlps.append(f"{ffn_name}.shared_expert")
    else:
        mlps = [ffn_name]
    return [["self_attn.qkv_proj"], ["self_attn.o_proj"],
            [f"{m}.gate_up_proj" for m in mlps], [f"{m}.down_proj" for m in mlps]]


def layerwise_weight_names(model: nn.Module, names: tuple[str, str, str]) -> list[str]:
    return [n for i, layer in enumerate(model.model.layers) for stage in _stages(layer)
            for sub in stage
            for n, _ in weight_names(f"model.layers.{i}.{sub}", layer.get_submodule(sub), names)]


@torch.no_grad()
def quantize_layerwise(model: nn.Module, windows: list[list[int]],
                       quantize: Callable[[str, LayerStats], torch.Tensor],
                       names: tuple[str, str, str], row_clip: float, block_size: int = 16) -> None:
    """GPTQ's sequential mode (see ``sequential.py``) for MoE decoder layers: each stage's
    linears (all experts' gate/up at once: which expert a token reaches depends on the router,
    not on one linear) are fitted to their inputs in the model quantized so far."""
    hidden = [model.model.embed_tokens(torch.tensor(ids)) for ids in windows]
    for i, layer in enumerate(model.model.layers):
        for stage in _stages(layer):
            modules = {sub: layer.get_submodule(sub) for sub in stage}
            stats = _capture_stage(model, layer, modules, hidden, row_clip, block_size)
            for sub, m in modules.items():
                for name, rows in weight_names(f"model.layers.{i}.{sub}", m, names):
                    m.weight.data[rows] = quantize(name, stats[sub]).to(m.weight.dtype)
            del stats
        hidden = [_run_layer(model, layer, h, block_size) for h in hidden]


def _capture_stage(model: nn.Module, layer: nn.Module, modules: dict[str, nn.Module],
                   hidden: list[torch.Tensor], row_clip: float, block_size: int
                   ) -> dict[str, LayerStats]:
    """The inputs of ``modules`` over whole forwards of ``layer`` (an expert that no token
    reaches keeps empty statistics)."""
    stats = {sub: LayerStats.empty(int(m.input_size), row_clip=row_clip)
             for sub, m in modules.items()}
    gen = torch.Generator().manual_seed(0)
    handles = [m.register_forward_pre_hook(
        lambda _m, args, sub=sub: stats[sub].add(args[0], gen)) for sub, m in modules.items()]
    try:
        for h in hidden:
            _run_layer(model, layer, h, block_size)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def few_tokens_warning(counts: dict[str, int], min_tokens: int, method: str) -> str | None:
    """One line for all experts that got too few routed tokens (counts: weight name -> rows)."""
    experts = {EXPERT.match(n).group(1, 2): c for n, c in counts.items()}  # type: ignore[union-attr]
    if not experts:
        return None
    none = sum(1 for c in experts.values() if c == 0)
    sample = ", ".join(f"{p}.{e} ({c})" for (p, e), c in sorted(experts.items())[:4])
    what = ("were rounded to nearest (RTN) instead of GPTQ" if method == "gptq" else
            "kept their down projection unscaled (AWQ scale 1)")
    return (f"{len(experts)} experts got fewer than {min_tokens} routed calibration tokens "
            f"({none} got none) and {what}: {sample}{', ...' if len(experts) > 4 else ''}; "
            "more (or more varied) calibration text reaches more experts")


def aggregate_expert_errors(errors: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per layer and projection (``...experts.*.down_proj``): mean / max over its experts."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, err in errors.items():
        m = EXPERT.match(name)
        if m:
            groups[f"{m[1]}.*.{m[3]}"].append(err)
    return {k: {"mean": sum(v) / len(v), "max": max(v), "experts": len(v)}
            for k, v in groups.items()}


def awq_groups(weights: dict[str, torch.Tensor], mcfg, stats: dict[str, LayerStats],  # noqa: ANN001
               names: tuple[str, str, str], min_tokens: int) -> tuple[list[ScaleGroup], dict[str, int]]:
    """AWQ's scale groups of an MoE model, and the experts whose down keeps s = 1 for lack of
    routed tokens (weight name -> tokens)."""
    gate, up, down = names
    groups, skipped = [], {}
    dense = scale_groups(mcfg.num_hidden_layers, mcfg.num_attention_heads,
                         mcfg.num_key_value_heads)
    for grp in dense:
        if ".self_attn." in grp.stats_key or grp.linears[0] in weights:
            groups.append(grp)  # attention, and the dense MLPs of Qwen's mlp_only layers
    for i in range(mcfg.num_hidden_layers):
        p = f"model.layers.{i}"
        ffn = next((f for f in ("block_sparse_moe", "mlp") if f"{p}.{f}.gate.weight" in weights),
                   None)
        if ffn is None:
            continue
        experts = sorted({int(m[2]) for n in weights if (m := EXPERT.match(n))
                          and m[1] == f"{p}.{ffn}.experts"})
        mlps = [(f"{p}.{ffn}.experts.{e}", gate, up, down) for e in experts]
        if f"{p}.{ffn}.shared_expert.gate_proj.weight" in weights:
            mlps.append((f"{p}.{ffn}.shared_expert", "gate_proj", "up_proj", "down_proj"))
        float_readers = tuple(n for n in (f"{p}.{ffn}.gate.weight",
                                          f"{p}.{ffn}.shared_expert_gate.weight") if n in weights)
        groups.append(ScaleGroup(f"{p}.{ffn}.gate",  # the router's input: the normed rows
                                 tuple(f"{m}.{x}.weight" for m, g, u, _ in mlps for x in (g, u)),
                                 f"{p}.post_attention_layernorm.weight", False,
                                 unquantized=float_readers))
        for m, _, u, d in mlps:
            st = stats[f"{m}.down_proj"]
            if st.rows < min_tokens and ".experts." in m:
                skipped[f"{m}.{d}.weight"] = st.rows
                continue
            groups.append(ScaleGroup(f"{m}.down_proj", (f"{m}.{d}.weight",), f"{m}.{u}.weight",
                                     True))
    return groups, skipped
