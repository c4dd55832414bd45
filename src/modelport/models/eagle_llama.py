"""EAGLE-1 draft head for Llama-family targets (the checkpoint layout vLLM's
EagleLlamaForCausalLM loads, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B), and the loading shared
with the EAGLE-3 head (models/eagle3_llama.py).

The head is one (or a few) Llama decoder layer(s). Its input for a position is
``fc(concat(embed(token), h))``, where ``h`` is the target's final hidden state (after the
final norm) one position earlier, or, while drafting, the head's own previous output. The
first layer has no input norm (the fc output enters it directly) and there is no final norm:
the output goes straight into the target's LM head. The embedding table is the target's; a
checkpoint's own ``embed_tokens`` copy is skipped, as vLLM skips it.

Both heads answer the proposer (runner/eagle.py) the same way: ``target_features`` (the
head's input from a target forward), ``forward`` (its output, fed back while drafting),
``compute_logits`` and ``target_ids`` (a draft id as a target id).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.linear import Linear
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from modelport.models.weights import load_declared_weights

# targets built on LlamaModel (plain embedding lookup, residual stream, model.norm, lm_head),
# whose hidden states and embedding the heads read as vLLM's Llama / Qwen2 / Qwen3 give them
EAGLE_TARGETS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class EagleLlamaHead(nn.Module):
    """The draft layers; ``bind()`` hands them the target's embedding table and LM head."""

    def __init__(self, config: ModelConfig, fc_bias: bool) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = Linear(2 * h, h, bias=fc_bias)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        bias = config.attention_bias
        mlp_bias = bool(config.hf_config.get("mlp_bias", False))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, bias, bias, mlp_bias, rotary)
            for i in range(config.num_hidden_layers)
        )
        # EAGLE-1: the first layer reads the fc output without an input norm
        self.layers[0].input_layernorm = nn.Identity()
        self._target: tuple[LlamaForCausalLM, ...] = ()  # a tuple: not a submodule

    def bind(self, target: LlamaForCausalLM) -> None:
        self._target = (target,)

    def target_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's final hidden states, copied (a CUDA graph's output buffer is
        overwritten by its next replay)."""
        return hidden.clone()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(hidden)

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        """One row per position: the token at that position's next index and the hidden state
        that predicted it. Returns the head's hidden states (the next rows' ``hidden``)."""
        embed = self._target[0].model.embed_tokens
        x = self.fc(torch.cat((embed(input_ids), hidden.to(self.fc.weight.dtype)), dim=-1))
        if not x.is_cuda:
            self.layers[0].self_attn.rotary_emb.forget_positions()  # see rotate_joint
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return x + residual


def _read_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The head's tensors: *.safetensors, else pytorch_model.bin (read with weights_only=True,
    so a pickle that is more than tensors is refused, never run). A ``model.`` prefix is
    dropped: both spellings occur in published heads."""
    from modelport.loader import hf

    if any(folder.glob("*.safetensors")):
        stream = hf.iter_safetensors(hf.safetensors_files(folder))
    elif (folder / "pytorch_model.bin").is_file():
        stream = hf.iter_secondary_weights(folder, {"pytorch_model.bin": ""})
    else:
        raise ValueError(f"EAGLE head {folder}: no *.safetensors or pytorch_model.bin weights")
    for name, tensor in stream:
        yield name.removeprefix("model."), tensor


def check_eagle_head(head: ModelConfig, target: ModelConfig) -> None:
    """The head (EAGLE-1 or EAGLE-3) must fit a Llama-family target of its width and
    vocabulary."""
    if target.architecture not in EAGLE_TARGETS:
        raise ValueError(f"EAGLE speculative decoding needs a Llama-family target "
                         f"({', '.join(EAGLE_TARGETS)}), got {target.architecture}")
    if head.hidden_size != target.hidden_size:
        raise ValueError(f"the EAGLE head's hidden_size ({head.hidden_size}) differs from the "
                         f"target's ({target.hidden_size}): it was trained for another model")
    if head.vocab_size != target.vocab_size:
        raise ValueError(f"the EAGLE head's vocabulary ({head.vocab_size} tokens) differs from "
                         f"the target's ({target.vocab_size})")


def load_eagle_head(folder: Path, target: nn.Module, max_model_len: int, dtype: torch.dtype,
                    device: torch.device, method: str = "eagle") -> nn.Module:
    """Build the head (``method`` "eagle" or "eagle3") from an HF-style folder and bind it to
    the loaded target."""
    from modelport.loader import _build_defaults
    from modelport.loader.hf import read_hf_config

    if not isinstance(target, LlamaForCausalLM):
        raise ValueError(f"EAGLE speculative decoding needs a Llama-family target, got "
                         f"{type(target).__name__}")
    config = replace(read_hf_config(folder), max_model_len=max_model_len)
    check_eagle_head(config, target.config)
    weights = dict(_read_weights(folder))
    with _build_defaults(dtype, device):
        if method == "eagle3":
            from modelport.models.eagle3_llama import build_eagle3_head

            head = build_eagle3_head(config, target.config, weights)
        else:
            weights.pop("embed_tokens.weight", None)  # the target's table is used
            head = EagleLlamaHead(config, fc_bias="fc.bias" in weights)
    with torch.no_grad():
        loaded = load_declared_weights(head, weights.items(), LlamaForCausalLM.stacked_params,
                                       LlamaForCausalLM.skip_weights)
    missing = sorted({name for name, _ in head.named_parameters()} - loaded)
    if missing:
        raise ValueError(f"EAGLE head {folder}: checkpoint is missing weights for "
                         f"{', '.join(missing[:5])}")
    head.bind(target)
    return head.eval()
