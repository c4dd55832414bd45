"""Run the float model on calibration windows and collect, per linear layer, what AWQ and
GPTQ need: the input Gram matrix X^T X (GPTQ's Hessian), the mean |x| per input channel
(AWQ's salience), and a small row sample of X (to score candidate scales / report errors).

This is the one-pass mode: every layer's statistics come from the float model, one forward
per window, and all layers' statistics are held at once (a K x K Hessian per linear, so
AWQ, which never reads it, asks for none). GPTQ's default, sequential mode captures the same
``LayerStats`` one linear at a time on the partially quantized model: see ``sequential.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SAMPLE_ROWS = 512


@dataclass
class LayerStats:
    hessian: torch.Tensor | None  # [K, K] sum of x x^T; None when not asked for
    abs_mean: torch.Tensor  # [K] running sum of |x|
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, k: int, hessian: bool = True) -> LayerStats:
        h = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        return cls(h, torch.zeros(k, dtype=torch.float64))

    def add(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()  # statistics live on the host
        if self.hessian is not None:
            self.hessian += x.t() @ x
        self.abs_mean += x.abs().sum(0)
        self.rows += x.shape[0]
        have = sum(s.shape[0] for s in self.sample)
        if have < SAMPLE_ROWS:
            idx = torch.randperm(x.shape[0], generator=gen)[: SAMPLE_ROWS - have]
            self.sample.append(x[idx].float())

    @property
    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_mean / max(1, self.rows)).float()


@torch.no_grad()
def collect_stats(model: nn.Module, windows: list[list[int]], block_size: int = 16,
                  hessian: bool = True) -> dict[str, LayerStats]:
    """Per linear-layer module name (e.g. ``model.layers.0.self_attn.qkv_proj``) statistics."""
    from modelport.layers.attention import (
        ForwardContext,
        build_single_sequence_metadata,
        forward_context,
    )
    from modelport.layers.linear import Linear

    cfg = model.config
    device = next(model.parameters()).device
    stats: dict[str, LayerStats] = {}
    gen = torch.Generator().manual_seed(0)
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            stats[name] = LayerStats.empty(int(mod.input_size), hessian)

            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, name: str = name) -> None:
                stats[name].add(args[0], gen)

            handles.append(mod.register_forward_hook(hook))
    try:
        for ids in windows:
            t = len(ids)
            meta = build_single_sequence_metadata(t, block_size, device)
            n_blocks = (t + block_size - 1) // block_size
            dtype = next(model.parameters()).dtype
            kv = [torch.zeros(2, n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                              device=device, dtype=dtype)
                  for _ in range(cfg.num_hidden_layers)]
            with forward_context(ForwardContext(meta, kv)):
                model(torch.tensor(ids, device=device), torch.arange(t, device=device))
    finally:
        for h in handles:
            h.remove()
    return stats
