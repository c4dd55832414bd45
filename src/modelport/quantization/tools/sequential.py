"""GPTQ's sequential mode (the GPTQ paper; AutoGPTQ's ``true_sequential``), layer by layer.

Why: GPTQ minimises ||W X - W_q X|| for the X the layer sees. Taken from the float model
(``capture.collect_stats``), X ignores the error that the layers before it already carry
once quantized; here every linear is fitted to the inputs it gets in the quantized model.

How, with memory bounded by one decoder layer's work: the hidden state of every calibration
window at the input of decoder layer i is kept (windows x T x hidden, the only thing held
across layers). For layer i, its linears go in execution order, qkv -> o -> gate_up -> down:
the layer runs on the cached hidden states up to that linear (a pre-hook records its input
and stops the forward there), the linear is quantized from those statistics, and its
dequantized weight is written back into the float model, so the next linear's inputs are
recomputed through it. Then layer i runs once, whole, to give layer i+1's inputs. One K x K
Hessian exists at a time (the one-pass mode holds every layer's), at the cost of about three
forwards of each layer instead of one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modelport.quantization.tools.capture import HESSIAN_ROW_CLIP, LayerStats

# Our fused linears of a Llama/Qwen2 decoder layer, in the order the forward reaches them.
SUBLAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

# (HF weight name, LayerStats of its input) -> the dequantized weight [N, K] to continue with.
QuantizeFn = Callable[[str, LayerStats], torch.Tensor]


class _Reached(Exception):
    """Raised by the capture hook: the rest of the layer is not needed for this linear."""


def hf_weight_names(module_name: str, module: nn.Module, fused: bool = False
                    ) -> list[tuple[str, slice]]:
    """Checkpoint names of the weights fused in one of our linears, with their output rows:
    ``...self_attn.qkv_proj`` -> q_proj/k_proj/v_proj.weight; ``...o_proj`` -> itself.
    ``fused``: the checkpoint stores qkv_proj / gate_up_proj whole (Phi-3): one name each."""
    ranges = getattr(module, "shard_ranges", None)
    if not ranges or fused:
        return [(f"{module_name}.weight", slice(0, module.weight.shape[0]))]
    parent = module_name.rsplit(".", 1)[0]
    return [(f"{parent}.{shard}_proj.weight", slice(off, off + size))
            for shard, (off, size) in ranges.items()]


def layerwise_weight_names(model: nn.Module, fused: bool = False) -> list[str]:
    """The HF weight names ``quantize_layerwise`` hands to its callback, in that order."""
    return [name for i, layer in enumerate(model.model.layers) for sub in SUBLAYERS
            for name, _ in hf_weight_names(f"model.layers.{i}.{sub}", layer.get_submodule(sub),
                                           fused)]


@torch.no_grad()
def quantize_layerwise(model: nn.Module, windows: list[list[int]], quantize: QuantizeFn,
                       block_size: int = 16, row_clip: float = HESSIAN_ROW_CLIP,
                       fused: bool = False) -> None:
    """Quantize every decoder-layer linear of ``model`` in place (weights replaced by their
    dequantization), each from its inputs in the model quantized so far. ``fused``: hand
    qkv_proj / gate_up_proj on whole, under those names (checkpoints that store them so)."""
    device = next(model.parameters()).device
    hidden = [model.model.embed_tokens(torch.tensor(ids, device=device)) for ids in windows]
    for i, layer in enumerate(model.model.layers):
        for sub in SUBLAYERS:
            module = layer.get_submodule(sub)
            stats = _capture_input(model, layer, module, hidden, block_size, row_clip)
            for name, rows in hf_weight_names(f"model.layers.{i}.{sub}", module, fused):
                module.weight.data[rows] = quantize(name, stats).to(module.weight.dtype)
            del stats
        for j, h in enumerate(hidden):
            hidden[j] = _run_layer(model, layer, h, block_size)


def _capture_input(model: nn.Module, layer: nn.Module, module: nn.Module,
                   hidden: list[torch.Tensor], block_size: int, row_clip: float) -> LayerStats:
    stats = LayerStats.empty(int(module.input_size), row_clip=row_clip)
    gen = torch.Generator().manual_seed(0)

    def hook(_m: nn.Module, args: tuple) -> None:
        stats.add(args[0], gen)
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        for h in hidden:
            try:
                _run_layer(model, layer, h, block_size)
            except _Reached:
                continue
            raise RuntimeError(f"{type(module).__name__} was not reached by its decoder layer")
    finally:
        handle.remove()
    return stats


def _run_layer(model: nn.Module, layer: nn.Module, h: torch.Tensor, block_size: int) -> torch.Tensor:
    """One decoder layer on one window's hidden state [T, hidden] (the residual stream, i.e.
    what the fused path carries as x + residual); returns the next layer's hidden state."""
    from modelport.layers.attention import (
        ForwardContext,
        build_single_sequence_metadata,
        forward_context,
    )

    cfg = model.config
    t = h.shape[0]
    meta = build_single_sequence_metadata(t, block_size, h.device)
    n_blocks = (t + block_size - 1) // block_size
    kv = torch.zeros(2, n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                     device=h.device, dtype=h.dtype)
    # attention indexes the cache list by its layer index: one buffer serves whichever it is
    with forward_context(ForwardContext(meta, [kv] * cfg.num_hidden_layers)):
        x, residual = layer(torch.arange(t, device=h.device), h, None)
    return x + residual
