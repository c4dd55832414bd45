"""compressed-tensors checkpoints (llm-compressor's layout) that hold FP8 weights.

config.json ``quantization_config`` with ``quant_method: "compressed-tensors"`` lists
``config_groups``: each group names the modules it quantizes (``targets``: ``"Linear"`` for
every linear layer, a module name, or ``"re:<regex>"``) and how (``weights`` /
``input_activations`` quantization arguments); ``ignore`` names modules left in float (the
same exact-name / ``"re:"`` forms; ``lm_head`` usually). The ``format`` says how the weights
are stored. The FP8 W8A8 schemes (llm-compressor's FP8_DYNAMIC and FP8) store, per quantized
module, ``<module>.weight`` in float8_e4m3fn and ``<module>.weight_scale`` ([out, 1] with the
``channel`` strategy, one value with ``tensor``), plus ``<module>.input_scale`` for static
per-tensor activations; modelport runs them on its FP8 path (fp8.py: dynamic per-token
activations, per-channel or per-tensor weight scales).

``parse_fp8`` reads such a config (no torch here, so the planner can use it too) and refuses
every other compressed-tensors scheme with a ValueError naming the part that is not supported
and what to use instead. ``fp8_dynamic_dict`` is what ``modelport quantize --method fp8``
writes: channel-strategy FP8 weights, dynamic per-token FP8 activations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUANT_METHOD = "compressed-tensors"
# formats whose quantized weights are stored as plain float8_e4m3fn tensors
FP8_FORMATS = ("float-quantized", "naive-quantized")
READS = ("modelport reads compressed-tensors FP8 checkpoints: 8-bit float weights with "
         "channel or tensor scales, dynamic per-token / per-tensor or static per-tensor FP8 "
         "activations (or none)")
ALT_FP8 = "or load the unquantized checkpoint with --quantization fp8"
ALT_4BIT = ("use an AWQ or GPTQ checkpoint of the model (or make one with `modelport quantize "
            "--method awq|gptq`), " + ALT_FP8)


@dataclass(frozen=True)
class FP8Group:
    targets: tuple[str, ...]
    weight_strategy: str  # "channel" | "tensor"
    static_input: bool  # a per-tensor input_scale is stored (unused: scales are computed per token)


@dataclass(frozen=True)
class CompressedTensorsFP8:
    groups: tuple[FP8Group, ...]
    ignore: tuple[str, ...]

    def group_for(self, module: str) -> FP8Group | None:
        """The group quantizing checkpoint module ``module`` (None: it stays float). ``ignore``
        wins over the targets; the first group whose targets match takes it."""
        if any(name_matches(p, module) for p in self.ignore):
            return None
        for g in self.groups:
            if any(t == "Linear" or name_matches(t, module) for t in g.targets):
                return g
        return None


def name_matches(pattern: str, module: str) -> bool:
    """An ``ignore`` / ``targets`` entry against a module name: ``"re:<regex>"`` matched from
    the start of the name (Python ``re.match``), anything else as the exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module


def is_compressed_tensors(qc: Any) -> bool:
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def _unsupported(what: str, alt: str = ALT_FP8) -> ValueError:
    return ValueError(f"compressed-tensors checkpoint: {what} is not supported ({READS}); {alt}")


def _args_text(a: dict[str, Any]) -> str:
    keys = ("type", "num_bits", "strategy", "group_size", "block_structure", "dynamic", "symmetric")
    return ", ".join(f"{k}={a[k]!r}" for k in keys if a.get(k) is not None)


def _check_weights(name: str, w: Any) -> str:
    if not isinstance(w, dict):
        raise _unsupported(f"group {name!r} without weight quantization (activations only)")
    kind, bits = str(w.get("type", "int")).lower(), int(w.get("num_bits", 8))
    strategy = str(w.get("strategy") or "tensor").lower()
    if kind != "float" or bits != 8:
        alt = ALT_4BIT if bits <= 4 and kind == "int" else ALT_FP8
        raise _unsupported(f"group {name!r}: {kind} {bits}-bit weights ({_args_text(w)})", alt)
    if strategy not in ("channel", "tensor"):
        raise _unsupported(f"group {name!r}: FP8 weights with the {strategy!r} strategy "
                           f"({_args_text(w)}); channel and tensor scales are read")
    if w.get("dynamic") not in (None, False):
        raise _unsupported(f"group {name!r}: dynamic weight quantization")
    if w.get("symmetric") is False:
        raise _unsupported(f"group {name!r}: asymmetric FP8 weights (zero points)")
    return strategy


def _check_inputs(name: str, a: Any) -> bool:
    """Whether the group stores a static per-tensor input_scale."""
    if a is None:
        return False
    if not isinstance(a, dict):
        raise _unsupported(f"group {name!r}: input_activations {a!r}")
    kind, bits = str(a.get("type", "int")).lower(), int(a.get("num_bits", 8))
    strategy, dynamic = str(a.get("strategy") or "tensor").lower(), a.get("dynamic", False)
    if kind != "float" or bits != 8:
        raise _unsupported(f"group {name!r}: {kind} {bits}-bit activations ({_args_text(a)})")
    if dynamic is True and strategy in ("token", "tensor"):
        return False
    if dynamic is False and strategy == "tensor":
        return True
    raise _unsupported(f"group {name!r}: FP8 activations {_args_text(a)}; dynamic token / "
                       "tensor and static tensor scales are read")


def parse_fp8(qc: dict[str, Any]) -> CompressedTensorsFP8:
    """The FP8 scheme of a compressed-tensors ``quantization_config``; ValueError for any other."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _unsupported("a quantization_config without config_groups")
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and str(sparsity.get("format") or "dense").lower() != "dense":
        raise _unsupported(f"sparsity ({sparsity.get('format')!r} sparsity_config)")
    if qc.get("kv_cache_scheme"):
        raise _unsupported("a quantized KV cache (kv_cache_scheme: k_scale / v_scale tensors)",
                           "use a checkpoint without kv_cache_scheme (--kv-cache-dtype fp8 "
                           "quantizes the cache at run time), " + ALT_FP8)
    if qc.get("transform_config"):
        raise _unsupported("transforms (transform_config)")
    parsed = []
    for name, g in groups.items():
        if not isinstance(g, dict):
            raise _unsupported(f"config group {name!r} ({g!r})")
        gfmt = g.get("format") or fmt
        if gfmt is not None and str(gfmt).lower() not in FP8_FORMATS:
            w = g.get("weights") if isinstance(g.get("weights"), dict) else {}
            alt = ALT_4BIT if "pack" in str(gfmt) and int(w.get("num_bits", 4)) <= 4 else ALT_FP8
            raise _unsupported(f"the {gfmt!r} format (group {name!r}: {_args_text(w)})", alt)
        strategy = _check_weights(name, g.get("weights"))
        static = _check_inputs(name, g.get("input_activations"))
        if g.get("output_activations"):
            raise _unsupported(f"group {name!r}: output activation quantization")
        targets = g.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        parsed.append(FP8Group(tuple(str(t) for t in targets), strategy, static))
    ignore = qc.get("ignore") or []
    if isinstance(ignore, str):
        ignore = [ignore]
    return CompressedTensorsFP8(tuple(parsed), tuple(str(i) for i in ignore))


def checkpoint_names(prefix: str, stacked: Sequence[Sequence[Any]]) -> list[str]:
    """The checkpoint module names a model layer loads from: a fused layer (qkv_proj,
    gate_up_proj, Mixtral's renamed experts) through the model's loading table
    ``(fused, checkpoint part, shard id)``, the first entry per shard; else its own name."""
    name = prefix + "."
    names: dict[Any, str] = {}
    for fused, part, shard in stacked:
        if fused in name and shard not in names:
            names[shard] = name.replace(fused, part)[:-1]
            if shard is None:  # a whole rename: one checkpoint module
                break
    return list(names.values()) or [prefix]


def fp8_dynamic_dict(ignore: Sequence[str]) -> dict[str, Any]:
    """``quantization_config`` of an FP8 W8A8 checkpoint: every linear layer but ``ignore``
    with E4M3 weights and one float scale per output channel ([out, 1]), activations quantized
    to FP8 per token at run time (llm-compressor's FP8_DYNAMIC scheme)."""
    return {
        "quant_method": QUANT_METHOD,
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                            "strategy": "channel", "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                      "strategy": "token", "dynamic": True},
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }
