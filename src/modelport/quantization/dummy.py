"""Random weights packed in a quantized format (load_format="dummy"), for benchmarks.

Each quantized layer gets a Normal(0, 0.02) float weight encoded the way a checkpoint would
store it (RTN codes for AWQ/GPTQ, E4M3 + scales for FP8, NF4 codes + absmax, GGML blocks
for GGUF: MODELPORT_DUMMY_GGUF_TYPE, Q4_K by default) and loaded through the layer's own
weight loaders, so the kernels see exactly what a real checkpoint would give them.
"""

from __future__ import annotations

import torch
from torch import nn

from modelport.loader.dummy import DUMMY_STD


def encode(config: object, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one linear layer's float weight w [N, K] in config's format."""
    from modelport.quantization.compressed_tensors import IntWeights
    from modelport.quantization.tools.rtn import rtn_quantize

    if isinstance(config, IntWeights):  # compressed-tensors integer weights
        from modelport.quantization.compressed_tensors_int import pack_int_weight

        return pack_int_weight(w, config)
    name = getattr(config, "name", "")
    if name == "awq":
        from modelport.quantization.awq import pack_awq, pack_awq_gemv

        codes, zeros, scales = rtn_quantize(w, config.bits, config.group_size, sym=False)
        if getattr(config, "version", "gemm") == "gemv":
            return pack_awq_gemv(codes, zeros, scales, config.group_size)
        return pack_awq(codes, zeros, scales)
    if name == "gptq":
        from modelport.quantization.gptq import pack_gptq

        g = w.shape[1] if config.group_size == -1 else config.group_size
        codes, zeros, scales = rtn_quantize(w, config.bits, g, sym=config.sym)
        return pack_gptq(codes, zeros, scales, config.bits, group_size=g)
    if name == "fp8":
        if config.online:
            return {"weight": w}
        from modelport.quantization.fp8 import quantize_fp8_per_channel

        q, s = quantize_fp8_per_channel(w)
        return {"weight": q, "weight_scale": s}
    if name == "bitsandbytes":
        from modelport.quantization.nf4 import nf4_encode

        renamed = {"": "weight", "quant_state.bitsandbytes__nf4": "nf4_state"}
        return {renamed.get(k, f"nf4_{k}"): v for k, v in nf4_encode(w, 64, config.double_quant).items()}
    if name == "gguf":
        from modelport.quantization.gguf_formats import pack

        return {"weight": pack(w, config.type_id)}
    raise ValueError(f"load_format='dummy' is not available for quantization {name!r}")


@torch.no_grad()
def init_dummy_quantized(model: nn.Module, seed: int) -> None:
    # one generator per device, the float weights drawn where they are packed: drawing a
    # 14B-parameter MoE's experts on the host took ~1 minute of an H100 benchmark's start
    gens: dict[torch.device, torch.Generator] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            n = sum(s for _, s in getattr(module, "shard_ranges", {}).values()) or module.output_size
            dev = torch.device(module.quant_device)
            gen = gens.get(dev) or gens.setdefault(dev, torch.Generator(dev).manual_seed(seed))
            w = torch.randn(n, module.input_size, generator=gen, device=dev) * DUMMY_STD
            # packed on the layer's device; NF4's pieces are then handed over on the CPU, as
            # a checkpoint's are (its unpacking runs there and moves the result to dev)
            dest = "cpu" if getattr(method.config, "name", "") == "bitsandbytes" else dev
            for pname, tensor in encode(method.config, w).items():
                param = module._parameters[pname]
                param.weight_loader(param, tensor.to(dest), None)
            if module.bias is not None:
                module.bias.normal_(0.0, DUMMY_STD)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if pname == "weight" and "norm" in type(module).__name__.lower():
                param.fill_(1.0)
            else:
                param.normal_(0.0, DUMMY_STD)
