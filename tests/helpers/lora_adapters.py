"""Tiny PEFT-layout LoRA adapters for the tiny Llama of tiny_models.make_tiny_llama_dir
(random A and B, so every adapter changes the output), and the independent reference for
one: a merged checkpoint, ``W + scale * B @ A`` written into a copy of the base model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
OUT = {
    "q_proj": HIDDEN,
    "k_proj": KV_HEADS * HEAD_DIM,
    "v_proj": KV_HEADS * HEAD_DIM,
    "o_proj": HIDDEN,
    "gate_proj": INTER,
    "up_proj": INTER,
    "down_proj": HIDDEN,
}
IN = {**dict.fromkeys(OUT, HIDDEN), "down_proj": INTER}
PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL = tuple(OUT)


def make_adapter(
    path: Path,
    *,
    rank: int,
    alpha: float,
    seed: int,
    targets: tuple[str, ...] = ALL,
    rslora: bool = False,
) -> dict:
    """A PEFT LoRA folder; returns {checkpoint module name: (A, B)} for the merged copy."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors, pairs = {}, {}
    for layer in range(LAYERS):
        for t in targets:
            module = f"model.layers.{layer}.{PARENT[t]}.{t}"
            a = torch.randn(rank, IN[t], generator=g) * 0.3
            b = torch.randn(OUT[t], rank, generator=g) * 0.3
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            pairs[module] = (a, b)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": list(targets),
                "use_rslora": rslora,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            }
        )
    )
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    return {"pairs": pairs, "scale": scale}


def merge(base: Path, out: Path, adapter: dict) -> Path:
    """The base checkpoint with W + scale * B @ A in each adapted projection."""
    shutil.copytree(base, out)
    st = out / "model.safetensors"
    weights = load_file(str(st))
    for module, (a, b) in adapter["pairs"].items():
        name = f"{module}.weight"
        weights[name] = (weights[name].double() + adapter["scale"] * (b.double() @ a.double())).to(
            weights[name].dtype
        )
    save_file(weights, str(st), metadata={"format": "pt"})
    return out
