"""EAGLE-3 draft head (the checkpoint layout vLLM's Eagle3LlamaForCausalLM loads, e.g.
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B) for the targets of models/eagle_llama.py.

What differs from the EAGLE-1 head there:
- the target's features for a position are three of its residual streams (a low, a middle
  and a high layer: ``eagle_aux_hidden_state_layer_ids``, else vLLM's default 2, L // 2,
  L - 3 of the target's L layers; id j is the stream entering layer j), concatenated in
  layer order and fused by ``fc`` (3H -> H, no bias);
- the first layer's attention reads concat(input_layernorm(embed(token)), hidden_norm(h)),
  2H wide, and its residual stream starts from h (from hidden_norm(h) with the config's
  ``norm_before_residual``); later layers are plain Llama layers;
- a final ``norm`` and the head's own ``lm_head`` over a draft vocabulary (config
  ``draft_vocab_size``); the checkpoint's ``d2t[i]`` is the offset from draft id i to its
  target id (``t2d``, the inverse mask, is not needed and is skipped);
- while drafting, a row's h is the head's own previous output before the final norm: ``fc``
  only ever sees the target's streams.
The embedding is the checkpoint's ``embed_tokens`` where it has one, else the target's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelport.config import ModelConfig
from modelport.layers.embedding import LMHead, VocabEmbedding
from modelport.layers.layernorm import RMSNorm
from modelport.layers.linear import Linear, QKVLinear
from modelport.layers.rotary import RotaryEmbedding, rope_settings
from modelport.models.llama import LlamaDecoderLayer, LlamaForCausalLM

AUX_KEY = "eagle_aux_hidden_state_layer_ids"


class Eagle3FirstLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, bias: bool, mlp_bias: bool,
                 rotary: RotaryEmbedding, norm_before_residual: bool) -> None:
        super().__init__(config, 0, bias, bias, mlp_bias, rotary)
        h = config.hidden_size
        self.self_attn.qkv_proj = QKVLinear(2 * h, config.head_dim, config.num_attention_heads,
                                            config.num_key_value_heads, bias=bias)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.norm_before_residual = norm_before_residual

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor,  # type: ignore[override]
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = self.self_attn(positions, torch.cat((self.input_layernorm(embeds), normed), dim=-1))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3LlamaHead(nn.Module):
    """The draft layers; ``bind()`` makes the target keep its aux streams and, without an
    ``embed_tokens`` of the head's own, hands over the target's embedding table."""

    def __init__(self, config: ModelConfig, aux_layers: tuple[int, ...], own_embed: bool) -> None:
        super().__init__()
        self.config = config
        self.aux_layers = aux_layers
        hf = config.hf_config
        h, eps = config.hidden_size, config.rms_norm_eps
        self.draft_vocab_size = draft_vocab_size(config)
        self.fc = Linear(3 * h, h, bias=False)
        rotary = RotaryEmbedding(config.head_dim, rope_settings(config))
        bias = config.attention_bias
        mlp_bias = bool(hf.get("mlp_bias", False))
        first = Eagle3FirstLayer(config, bias, mlp_bias, rotary,
                                 bool(hf.get("norm_before_residual", False)))
        self.layers = nn.ModuleList([first, *(
            LlamaDecoderLayer(config, i, bias, bias, mlp_bias, rotary)
            for i in range(1, config.num_hidden_layers))])
        self.norm = RMSNorm(h, eps)
        self.lm_head = LMHead(self.draft_vocab_size, h)
        self.embed_tokens = VocabEmbedding(config.vocab_size, h) if own_embed else None
        # draft id -> target id (arange + the checkpoint's d2t; set by set_d2t)
        self.register_buffer("draft_to_target", torch.arange(self.draft_vocab_size))
        self._target: tuple[LlamaForCausalLM, ...] = ()  # a tuple: not a submodule

    def set_d2t(self, d2t: torch.Tensor | None, vocab_size: int) -> None:
        if d2t is None:
            if self.draft_vocab_size != vocab_size:
                raise ValueError(f"the EAGLE-3 head's draft vocabulary ({self.draft_vocab_size} "
                                 f"tokens) is smaller than the target's ({vocab_size}) but the "
                                 "checkpoint has no d2t mapping from draft to target ids")
            return
        if tuple(d2t.shape) != (self.draft_vocab_size,) or d2t.is_floating_point():
            raise ValueError(f"the EAGLE-3 head's d2t must be {self.draft_vocab_size} integer "
                             f"offsets (draft_vocab_size), got {d2t.dtype} {tuple(d2t.shape)}")
        ids = torch.arange(self.draft_vocab_size, device="cpu") + d2t.cpu().long()
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"the EAGLE-3 head's d2t maps draft ids outside the target's "
                             f"vocabulary of {vocab_size} tokens")
        self.draft_to_target.copy_(ids)

    def bind(self, target: LlamaForCausalLM) -> None:
        target.model.aux_layers = self.aux_layers
        self._target = (target,)

    def target_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input for the target's rows of the forward that just ran: its aux
        streams fused by ``fc`` (``hidden``, the final states, are not used)."""
        (target,) = self._target
        return self.fc(target.model.aux_hidden.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        """As EagleLlamaHead.forward; returns the pre-norm output (the next rows' ``hidden``)."""
        embed = self.embed_tokens if self.embed_tokens is not None else self._target[0].model.embed_tokens
        embeds = embed(input_ids)
        if not embeds.is_cuda:
            self.layers[0].self_attn.rotary_emb.forget_positions()  # see rotate_joint
        x, residual = self.layers[0](positions, embeds, hidden.to(embeds.dtype))
        for layer in self.layers[1:]:
            x, residual = layer(positions, x, residual)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (``target_ids`` maps their argmax)."""
        return self.lm_head(self.norm(hidden))

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target[draft_ids]


def draft_vocab_size(config: ModelConfig) -> int:
    return int(config.hf_config.get("draft_vocab_size") or config.vocab_size)


def aux_layer_ids(head: ModelConfig, target: ModelConfig) -> tuple[int, ...]:
    """The target layers whose input streams the head reads, in layer order."""
    hf: dict[str, Any] = head.hf_config
    eagle_config = hf.get("eagle_config") or {}
    n = target.num_hidden_layers
    ids = hf.get(AUX_KEY) or eagle_config.get(AUX_KEY)
    where = f"{AUX_KEY} {ids}"
    if ids is None:
        ids = [2, n // 2, n - 3]
        where = (f"the default aux layers {ids} (2, L // 2, L - 3; set {AUX_KEY} in the head's "
                 "config.json)")
    if (not isinstance(ids, list | tuple) or len(ids) != 3 or len(set(ids)) != 3
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in ids)):
        raise ValueError(f"EAGLE-3: {where} must be three distinct layer indices in [0, {n}) "
                         f"of the target's {n} layers")
    return tuple(sorted(ids))


def check_eagle3_head(head: ModelConfig, target: ModelConfig) -> tuple[int, ...]:
    """EAGLE-3's checks beyond check_eagle_head's; returns the aux layer ids."""
    hf = head.hf_config
    if (hf.get("eagle_config") or {}).get("use_aux_hidden_state", True) is not True:
        raise ValueError("EAGLE-3 heads without aux hidden states (eagle_config."
                         "use_aux_hidden_state false) are not supported")
    width = hf.get("target_hidden_size")
    if width is not None and width != target.hidden_size:
        raise ValueError(f"the EAGLE-3 head's target_hidden_size ({width}) differs from the "
                         f"target's hidden_size ({target.hidden_size})")
    if not 0 < draft_vocab_size(head) <= target.vocab_size:
        raise ValueError(f"the EAGLE-3 head's draft_vocab_size ({draft_vocab_size(head)}) must be "
                         f"in [1, {target.vocab_size}] (the target's vocabulary)")
    return aux_layer_ids(head, target)


def build_eagle3_head(config: ModelConfig, target: ModelConfig,
                      weights: dict[str, torch.Tensor]) -> Eagle3LlamaHead:
    """The head for ``config`` (call under the loader's build defaults). Renames published
    spellings in ``weights`` (``midlayer.`` is layer 0) and takes out d2t / t2d, which are not
    parameters; the rest is loaded by the caller."""
    aux = check_eagle3_head(config, target)
    for name in [n for n in weights if n.startswith("midlayer.")]:
        weights["layers.0." + name.removeprefix("midlayer.")] = weights.pop(name)
    weights.pop("t2d", None)
    d2t = weights.pop("d2t", None)
    head = Eagle3LlamaHead(config, aux, own_embed="embed_tokens.weight" in weights)
    with torch.no_grad():
        head.set_d2t(d2t, target.vocab_size)
    return head
