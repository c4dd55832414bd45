"""Opt-in (``MODELPORT_L2_PREFETCH``): small-batch CUDA decode through a Llama decoder layer
that pulls the next projection's weights into the GPU's L2 cache while a kernel that leaves
the memory bus idle runs.

At batch 1 a decode layer reads ~436 MB of bf16 weights in four GEMVs, each within a few
per cent of a pure read of the same bytes (bench/README.md, eighth round), while the
kernels between them (rotary, KV write, attention over one request's context, RMSNorm,
SiLU) move almost nothing for ~10 us a layer. The O projection (33.5 MB at Llama-3.1-8B's
shape) fits the H200's 50 MB L2; reading it there during attention would let the O GEMV read
L2 instead of HBM. Earlier rounds prefetched from inside the GEMV before its PDL wait
(slower: the GEMV's programs only start when its predecessor's drain); here the prefetch
runs on a second stream, forked before the stage it overlaps and joined before the
projection that reads it, so inside a captured decode graph it is a parallel branch.

``MODELPORT_L2_PREFETCH`` is a comma list of ``stage:target`` pairs. Stages (the kernels
the prefetch runs beside): ``norm1``, ``qkv``, ``attn``, ``o``, ``norm2``, ``gate_up``,
``act``, ``down``; targets (whose tensors are read): ``qkv``, ``o``, ``gate_up``, ``down``
and ``next_qkv`` (the next layer's QKV projection). E.g. ``attn:o``.
``MODELPORT_L2_PREFETCH_MB`` caps the bytes a prefetch reads (default 40; the largest
tensors of the projection first, each from its start). ``MODELPORT_L2_PREFETCH_KIND``:
``bulk`` (default; sm90 ``cp.async.bulk.prefetch.L2``, fire and forget, a few programs) or
``load`` (plain loads with the evict-last hint, a streaming-read kernel).
``MODELPORT_L2_PREFETCH_ROWS`` (default 1): the most rows a step may have for the layer to
prefetch; more take the parent's code, as do CPU tensors.

Values are never changed: the prefetch only reads, and the projection still reads its own
weights (tests/test_l2_prefetch.py; on CUDA, equal tokens with it on and off).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from modelport.models.llama import LlamaDecoderLayer

STAGES = ("norm1", "qkv", "attn", "o", "norm2", "gate_up", "act", "down")
TARGETS = ("qkv", "o", "gate_up", "down", "next_qkv")
KINDS = ("bulk", "load")


def parse_plan(spec: str) -> dict[str, tuple[str, ...]]:
    """``"attn:o,down:next_qkv"`` -> {"attn": ("o",), "down": ("next_qkv",)}; a clear
    ValueError for anything else."""
    plan: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        stage, sep, target = item.partition(":")
        if not sep or stage not in STAGES or target not in TARGETS:
            raise ValueError(
                f"MODELPORT_L2_PREFETCH: {item!r} is not stage:target (stages: "
                f"{', '.join(STAGES)}; targets: {', '.join(TARGETS)})")
        plan[stage] = plan.get(stage, ()) + (target,)
    return plan


@functools.cache
def settings() -> tuple[dict[str, tuple[str, ...]], int, str, int]:
    """(plan, byte cap, kind, max rows) from the environment."""
    plan = parse_plan(os.environ.get("MODELPORT_L2_PREFETCH", ""))
    try:
        cap = int(float(os.environ.get("MODELPORT_L2_PREFETCH_MB", "40")) * 2**20)
        rows = int(os.environ.get("MODELPORT_L2_PREFETCH_ROWS", "1"))
    except ValueError as e:
        raise ValueError(f"MODELPORT_L2_PREFETCH_MB / _ROWS: {e}") from None
    kind = os.environ.get("MODELPORT_L2_PREFETCH_KIND", "bulk")
    if kind not in KINDS:
        raise ValueError(f"MODELPORT_L2_PREFETCH_KIND must be one of {', '.join(KINDS)}, "
                         f"not {kind!r}")
    return plan, cap, kind, rows


def spans(module: nn.Module, cap: int) -> list[tuple[torch.Tensor, int]]:
    """(tensor, bytes to read from its start) for a projection's CUDA tensors, largest
    first, until ``cap`` bytes (whole 16-byte units: the bulk prefetch's granule)."""
    seen, out, left = set(), [], cap
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_cuda]
    for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        if t.data_ptr() in seen or not t.is_contiguous() or left < 16:
            continue
        seen.add(t.data_ptr())
        n = min(t.numel() * t.element_size(), left) // 16 * 16
        if n and t.data_ptr() % 16 == 0:
            out.append((t, n))
            left -= n
    return out


class _Side:
    """One side stream per device, and an event for each projection whose prefetch is not
    yet joined (a projection waits for its own prefetch only)."""

    streams: dict[int, torch.cuda.Stream] = {}
    pending: dict[int, torch.cuda.Event] = {}

    @classmethod
    def fork(cls, target: nn.Module, work: list[tuple[torch.Tensor, int]], kind: str) -> None:
        if not work:
            return
        main = torch.cuda.current_stream()
        side = cls.streams.get(main.device_index)
        if side is None:
            side = cls.streams[main.device_index] = torch.cuda.Stream(main.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for t, n in work:
                _launch(t, n, kind)
        done = torch.cuda.Event()
        done.record(side)
        cls.pending[id(target)] = done

    @classmethod
    def join(cls, target: nn.Module | None = None) -> None:
        """Make the current stream wait for the target's prefetch (None: every one)."""
        keys = list(cls.pending) if target is None else [id(target)]
        for key in keys:
            done = cls.pending.pop(key, None)
            if done is not None:
                torch.cuda.current_stream().wait_event(done)


def _launch(t: torch.Tensor, n: int, kind: str) -> None:
    from modelport.layers import triton_l2_prefetch as k

    (k.bulk_prefetch if kind == "bulk" else k.load_prefetch)(t, n)


def _applies(x: torch.Tensor, rows: int) -> bool:
    return x.is_cuda and x.shape[0] <= rows


class PrefetchLlamaLayer(LlamaDecoderLayer):
    # the next decoder layer (for next_qkv), set by use_l2_prefetch outside the module tree
    _next_layer: LlamaDecoderLayer | None = None

    def _target(self, name: str) -> nn.Module | None:
        a, m = self.self_attn, self.mlp
        if name == "next_qkv":
            nxt = self._next_layer
            return None if nxt is None else nxt.self_attn.qkv_proj
        return {"qkv": a.qkv_proj, "o": a.o_proj, "gate_up": m.gate_up_proj,
                "down": m.down_proj}[name]

    def _at(self, stage: str) -> None:
        plan, cap, kind, _ = settings()
        for name in plan.get(stage, ()):
            mod = self._target(name)
            if mod is not None:
                _Side.fork(mod, spans(mod, cap), kind)

    def _proj(self, stage: str, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _Side.join(mod)  # its own prefetch first, then what runs beside it
        self._at(stage)
        return mod(x)

    def forward(self, positions, x, residual):  # type: ignore[override]
        plan, _, _, rows = settings()
        if not plan or not _applies(x, rows):
            if x.is_cuda:
                _Side.join()
            return super().forward(positions, x, residual)
        attn, mlp = self.self_attn, self.mlp
        self._at("norm1")
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        qkv = self._proj("qkv", attn.qkv_proj, x)
        q, k, v = attn.qkv_proj.split(qkv)
        self._at("attn")
        o = attn.attn.forward_rope(positions, q, k, v, attn.rotary_emb)
        x = self._proj("o", attn.o_proj, o)
        self._at("norm2")
        x, residual = self.post_attention_layernorm(x, residual)
        x = self._proj("gate_up", mlp.gate_up_proj, x)
        self._at("act")
        x = mlp.act(x)
        x = self._proj("down", mlp.down_proj, x)
        if self._next_layer is None:  # the model's last layer: nothing left on the side
            _Side.join()
        return x, residual


def use_l2_prefetch(model: nn.Module) -> int:
    """Swap plain Llama decoder layers (exact class) for the prefetching one when
    MODELPORT_L2_PREFETCH names a plan; returns how many were swapped."""
    plan = settings()[0]
    if not plan:
        return 0
    layers = [m for m in model.modules() if type(m) is LlamaDecoderLayer]
    if layers and settings()[2] == "load":
        from modelport.layers.triton_l2_prefetch import prepare

        prepare(next(layers[0].parameters()).device)  # its scratch word, before any capture
    for i, layer in enumerate(layers):
        layer.__class__ = PrefetchLlamaLayer
        # a plain attribute, not a submodule: the next layer is not this layer's child
        object.__setattr__(layer, "_next_layer", layers[i + 1] if i + 1 < len(layers) else None)
    return len(layers)
