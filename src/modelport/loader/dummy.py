"""Random weights from a config alone (benchmarks and memory profiling).

Values are written in place on the target device and dtype, so an 8B-shaped model on a GPU
is ready in well under a second with no host round trip.
"""

from __future__ import annotations

import torch
from torch import nn

DUMMY_STD = 0.02


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> set[str]:
    """Normal(0, 0.02) for matrices and biases, ones for norm scales; returns param names."""
    names: set[str] = set()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=gen)
        names.add(name)
    return names
