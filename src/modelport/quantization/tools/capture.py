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
# GPTQ's Hessian: a token whose input row is longer than this many times the median row of its
# window counts as if it had that length (see ``LayerStats.add``); 0 turns the cap off
HESSIAN_ROW_CLIP = 5.0


@dataclass
class LayerStats:
    hessian: torch.Tensor | None  # [K, K] sum of x x^T; None when not asked for
    abs_mean: torch.Tensor  # [K] running sum of |x|
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    row_clip: float = HESSIAN_ROW_CLIP
    clipped_rows: int = 0

    @classmethod
    def empty(cls, k: int, hessian: bool = True, row_clip: float = HESSIAN_ROW_CLIP) -> LayerStats:
        h = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        return cls(h, torch.zeros(k, dtype=torch.float64), row_clip=row_clip)

    def add(self, x: torch.Tensor, gen: torch.Generator) -> None:
        """One forward's inputs to the layer (one calibration window's tokens)."""
        x = x.reshape(-1, x.shape[-1]).double().cpu()  # statistics live on the host
        if self.hessian is not None:
            xh = self._hessian_rows(x)
            self.hessian += xh.t() @ xh
        self.abs_mean += x.abs().sum(0)
        self.rows += x.shape[0]
        have = sum(s.shape[0] for s in self.sample)
        if have < SAMPLE_ROWS:
            idx = torch.randperm(x.shape[0], generator=gen)[: SAMPLE_ROWS - have]
            self.sample.append(x[idx].float())

    def _hessian_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Massive activations: a few tokens (the first of a window, the attention sink, above
        all) reach some layers with inputs tens of times longer than the others'. Summed as
        they are, they own most of X^T X (82 % of SmolLM2-135M's layer-28 down projection's,
        from one token in 512), and GPTQ fits the weights to them at every other token's
        expense. Rows longer than ``row_clip`` x the median are scaled down to that length:
        they still count, as much as a long ordinary token does."""
        if not self.row_clip or x.shape[0] < 2:
            return x
        norms = x.norm(dim=1)
        cap = self.row_clip * norms.median()
        over = norms > cap
        if not bool(over.any()):
            return x
        self.clipped_rows += int(over.sum())
        return x * torch.where(over, cap / norms, torch.ones_like(norms))[:, None]

    @property
    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_mean / max(1, self.rows)).float()


@torch.no_grad()
def collect_stats(model: nn.Module, windows: list[list[int]], block_size: int = 16,
                  hessian: bool = True, row_clip: float = HESSIAN_ROW_CLIP) -> dict[str, LayerStats]:
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
            stats[name] = LayerStats.empty(int(mod.input_size), hessian, row_clip)

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
    if windows and stats and not any(st.rows for st in stats.values()):
        raise RuntimeError(f"calibration saw no linear layer's input: {type(model).__name__}'s "
                           "forward bypassed the modules' hooks (a fused CPU step; "
                           "MODELPORT_CPU_KERNELS=0 turns it off)")
    return stats
