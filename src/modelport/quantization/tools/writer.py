"""Checkpoint writers in the public layouts (AutoAWQ GEMM, AutoGPTQ, compressed-tensors FP8).

The output folder is what the loaders here and other engines read: config.json with a
``quantization_config``, one model.safetensors, and the source's tokenizer files copied.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from modelport.quantization.base import QuantizationConfig

# Linear weights that get quantized (HF Llama/Qwen2 names, and Phi-3's fused qkv_proj /
# gate_up_proj, written whole: one packed tensor over the concatenated output rows, as the
# loaders and vLLM read Phi-3); everything else stays float.
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv_proj", "gate_up_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "added_tokens.json")


# Mixtral's experts: ``...block_sparse_moe.experts.<e>.w1|w3|w2.weight`` (gate, up, down)
MIXTRAL_EXPERT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def is_quantizable(name: str) -> bool:
    """Whether a checkpoint tensor is a linear weight we quantize (lm_head, embeddings and MoE
    routers -- ``mlp.gate``, ``block_sparse_moe.gate``, ``shared_expert_gate`` -- stay)."""
    parts = name.rsplit(".", 2)
    return (len(parts) == 3 and parts[2] == "weight" and parts[1] in LINEAR_SUFFIXES) or (
        MIXTRAL_EXPERT.search(name) is not None)


# quantization state that stays as it was computed (float32): FP8 scales, bitsandbytes'
# absmax and code books (readers compare the code book against NF4's exact values)
KEEP_FP32_SUFFIXES = ("weight_scale", "input_scale", ".absmax", ".quant_map", ".nested_absmax",
                      ".nested_quant_map")


def check_output(src_dir: Path, out_dir: Path) -> None:
    """Before any work: refuse an output that would destroy the source checkpoint, that is not
    a folder, or whose other weight files would be loaded instead of (or beside) the written
    model.safetensors (a sharded checkpoint's index and shards; the loader reads those)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file; name a folder")
    if out_dir.is_dir() and out_dir.resolve() == Path(src_dir).resolve():
        raise ValueError(f"--output {out_dir} is the model's own folder: writing there would "
                         "replace the float checkpoint; name another folder")
    if out_dir.is_dir():
        stale = sorted(p.name for p in out_dir.iterdir()
                       if p.name == "model.safetensors.index.json"
                       or (p.suffix == ".safetensors" and p.name != "model.safetensors"))
        if stale:
            raise ValueError(f"--output {out_dir} already holds another checkpoint's weights "
                             f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}), which "
                             "loaders would read instead of the quantized model.safetensors; "
                             "name an empty folder or remove them")


def write_checkpoint(
    src_dir: Path,
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: QuantizationConfig,
    float_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write tensors + config.json (+ quantization_config) + tokenizer files to out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    cfg["quantization_config"] = {k: v for k, v in config.hf_dict().items() if v is not None}
    cfg["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    cfg.pop("dtype", None)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn,) and not name.endswith(
            KEEP_FP32_SUFFIXES
        ):
            t = t.to(float_dtype)
        out[name] = t.contiguous()
    tmp = out_dir / "model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt", "quant_method": config.name})
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for fname in TOKENIZER_FILES:
        f = Path(src_dir) / fname
        if f.is_file():
            shutil.copy2(f, out_dir / fname)
    return out_dir
