"""compressed-tensors checkpoints (llm-compressor's layout): FP8 and integer weight-only.

config.json ``quantization_config`` with ``quant_method: "compressed-tensors"`` lists
``config_groups``: each group names the modules it quantizes (``targets``: ``"Linear"`` or
another class name ending in ``Linear`` for every linear layer, a module name, or
``"re:<regex>"``) and how (``weights`` / ``input_activations`` quantization arguments);
``ignore`` names modules left in float (the same exact-name / ``"re:"`` forms; ``lm_head``
usually). The ``format`` (top level, or per group) says how the weights are stored.

* FP8 W8A8 (llm-compressor's FP8_DYNAMIC and FP8; ``float-quantized`` / ``naive-quantized``)
  stores, per quantized module, ``<module>.weight`` in float8_e4m3fn and
  ``<module>.weight_scale`` ([out, 1] with the ``channel`` strategy, one value with
  ``tensor``), plus ``<module>.input_scale`` for static per-tensor activations; modelport runs
  them on its FP8 path (fp8.py: dynamic per-token activations, per-channel or per-tensor
  weight scales).
* Integer weight-only (W4A16 / W8A16, ``pack-quantized``) stores ``<module>.weight_packed``
  (int32 [out, ceil(in / p)], p = 32 / num_bits codes a word along the input, first code in
  the low bits; each code is the signed value plus 2**(num_bits - 1)),
  ``<module>.weight_scale`` ([out, in / group_size] for ``group``, [out, 1] for ``channel``,
  one value for ``tensor``), ``<module>.weight_shape`` ([out, in]); asymmetric schemes add
  ``<module>.weight_zero_point`` (the same offset codes, packed along the output dimension:
  int32 [ceil(out / p), groups]); activation-ordered GPTQ (``actorder: "group"``) adds
  ``<module>.weight_g_idx`` (int32 [in], each input's group). w = (q - zero) * scale.
  modelport repacks them at load into its integer GroupQuant (compressed_tensors_int.py),
  the GPTQ / AWQ kernels' form.

``parse`` reads such a config (no torch here, so the planner can use it too) and refuses every
other scheme (integer activations, 2:4 sparsity, other formats, ...) with a ValueError naming
the part that is not supported and what to use instead; ``parse_fp8`` accepts the FP8 schemes
only. ``fp8_dynamic_dict`` is what ``modelport quantize --method fp8`` writes:
channel-strategy FP8 weights, dynamic per-token FP8 activations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUANT_METHOD = "compressed-tensors"
# formats whose quantized weights are stored as plain float8_e4m3fn tensors
FP8_FORMATS = ("float-quantized", "naive-quantized")
INT_FORMATS = ("pack-quantized",)  # integer codes packed into int32 words
INT_BITS = (4, 8)
READS = ("modelport reads compressed-tensors FP8 checkpoints (8-bit float weights with "
         "channel or tensor scales, dynamic per-token / per-tensor or static per-tensor FP8 "
         "activations, or none) and integer weight-only ones (W4A16 / W8A16: 4- or 8-bit "
         "weights in the 'pack-quantized' format, group, channel or tensor scales, symmetric "
         "or asymmetric, activation order, unquantized activations)")
ALT_FP8 = "or load the unquantized checkpoint with --quantization fp8"
ALT_4BIT = ("use an AWQ or GPTQ checkpoint of the model (or make one with `modelport quantize "
            "--method awq|gptq`), " + ALT_FP8)
ALT_INT = ("use the model's W4A16 / W8A16 (pack-quantized) or FP8 compressed-tensors "
           "checkpoint, an AWQ or GPTQ one, " + ALT_FP8)


@dataclass(frozen=True)
class FP8Group:
    targets: tuple[str, ...]
    weight_strategy: str  # "channel" | "tensor"
    static_input: bool  # a per-tensor input_scale is stored (unused: scales are computed per token)


@dataclass(frozen=True)
class IntWeights:
    """How one group's integer weights are stored (pack-quantized)."""

    bits: int  # 4 or 8
    strategy: str  # "group" | "channel" | "tensor"
    group_size: int | None  # strategy "group" only
    symmetric: bool  # False: weight_zero_point is stored
    actorder: bool  # activation order with weight_g_idx stored ("group"; "weight" stores none)

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def offset(self) -> int:
        """What the stored codes add to the signed values (8 for 4 bits, 128 for 8)."""
        return 1 << (self.bits - 1)

    def describe(self) -> str:
        how = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return (f"int{self.bits} {how} {'symmetric' if self.symmetric else 'asymmetric'}"
                + (" act-order" if self.actorder else ""))


@dataclass(frozen=True)
class IntGroup:
    targets: tuple[str, ...]
    weights: IntWeights


@dataclass(frozen=True)
class CompressedTensorsScheme:
    """A parsed config: its groups (FP8Group for FP8 weights, IntGroup for integer ones) and
    ``ignore``."""

    groups: tuple[FP8Group | IntGroup, ...]
    ignore: tuple[str, ...]

    def group_for(self, module: str) -> FP8Group | IntGroup | None:
        """The group quantizing checkpoint module ``module`` (None: it stays float). ``ignore``
        wins over the targets; the first group whose targets match takes it."""
        if any(name_matches(p, module) for p in self.ignore):
            return None
        for g in self.groups:
            if any(is_linear_class(t) or name_matches(t, module) for t in g.targets):
                return g
        return None

    @property
    def int_groups(self) -> tuple[IntGroup, ...]:
        return tuple(g for g in self.groups if isinstance(g, IntGroup))


CompressedTensorsFP8 = CompressedTensorsScheme  # its name from when FP8 was the only scheme


def is_linear_class(target: str) -> bool:
    """A ``targets`` entry naming a module class of linear layers (``"Linear"``, or e.g.
    ``"QuantLinear"``): every linear layer of the model."""
    return not target.startswith("re:") and "." not in target and target.endswith("Linear")


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
    keys = ("type", "num_bits", "strategy", "group_size", "block_structure", "dynamic",
            "symmetric", "actorder")
    return ", ".join(f"{k}={a[k]!r}" for k in keys if a.get(k) is not None)


def _strategy(w: dict[str, Any]) -> str:
    """The strategy as compressed-tensors infers it when absent: from group_size (none:
    tensor, > 0: group, -1: channel)."""
    if w.get("strategy"):
        return str(w["strategy"]).lower()
    g = w.get("group_size")
    if g is None:
        return "tensor"
    return "channel" if int(g) == -1 else "group"


def _check_fp8_weights(name: str, w: dict[str, Any]) -> str:
    strategy = _strategy(w)
    if strategy not in ("channel", "tensor"):
        raise _unsupported(f"group {name!r}: FP8 weights with the {strategy!r} strategy "
                           f"({_args_text(w)}); channel and tensor scales are read")
    if w.get("dynamic") not in (None, False):
        raise _unsupported(f"group {name!r}: dynamic weight quantization")
    if w.get("symmetric") is False:
        raise _unsupported(f"group {name!r}: asymmetric FP8 weights (zero points)")
    return strategy


def _actorder(name: str, w: dict[str, Any]) -> bool:
    a = w.get("actorder")
    if a in (None, False) or str(a).lower() in ("weight", "static"):
        return False  # "weight": calibrated in activation order, stored as usual
    if a is True or str(a).lower() in ("group", "dynamic"):
        return True
    raise _unsupported(f"group {name!r}: actorder {a!r}", ALT_INT)


def _check_int_weights(name: str, w: dict[str, Any], fmt: str | None) -> IntWeights:
    bits = int(w.get("num_bits", 8))
    strategy = _strategy(w)
    if bits not in INT_BITS:
        raise _unsupported(f"group {name!r}: {bits}-bit integer weights ({_args_text(w)})",
                           ALT_INT)
    if fmt is not None and fmt not in INT_FORMATS:
        raise _unsupported(f"group {name!r}: integer weights in the {fmt!r} format "
                           f"({_args_text(w)})", ALT_INT)
    if strategy not in ("group", "channel", "tensor"):
        raise _unsupported(f"group {name!r}: integer weights with the {strategy!r} strategy "
                           f"({_args_text(w)})", ALT_INT)
    if w.get("dynamic") not in (None, False):
        raise _unsupported(f"group {name!r}: dynamic weight quantization", ALT_INT)
    group = None
    if strategy == "group":
        group = int(w.get("group_size") or 0)
        if group <= 0:
            raise _unsupported(f"group {name!r}: the 'group' strategy without a positive "
                               f"group_size ({_args_text(w)})", ALT_INT)
    actorder = _actorder(name, w)
    if actorder and strategy != "group":
        raise _unsupported(f"group {name!r}: actorder 'group' with the {strategy!r} strategy "
                           f"({_args_text(w)})", ALT_INT)
    return IntWeights(bits, strategy, group, w.get("symmetric", True) is not False, actorder)


def _check_inputs(name: str, a: Any) -> bool:
    """Whether the group stores a static per-tensor input_scale."""
    if a is None:
        return False
    if not isinstance(a, dict):
        raise _unsupported(f"group {name!r}: input_activations {a!r}")
    kind, bits = str(a.get("type", "int")).lower(), int(a.get("num_bits", 8))
    strategy, dynamic = _strategy(a), a.get("dynamic", False)
    if kind != "float" or bits != 8:
        raise _unsupported(f"group {name!r}: {kind} {bits}-bit activations ({_args_text(a)})")
    if dynamic is True and strategy in ("token", "tensor"):
        return False
    if dynamic is False and strategy == "tensor":
        return True
    raise _unsupported(f"group {name!r}: FP8 activations {_args_text(a)}; dynamic token / "
                       "tensor and static tensor scales are read")


def _targets(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    return tuple(str(t) for t in v or [])


def _parse_group(name: str, g: Any, fmt: Any) -> FP8Group | IntGroup:
    if not isinstance(g, dict):
        raise _unsupported(f"config group {name!r} ({g!r})")
    gfmt = g.get("format") or fmt
    gfmt = None if gfmt is None else str(gfmt).lower()
    w = g.get("weights")
    if not isinstance(w, dict):
        raise _unsupported(f"group {name!r} without weight quantization (activations only)")
    if g.get("output_activations"):
        raise _unsupported(f"group {name!r}: output activation quantization")
    kind, bits = str(w.get("type", "int")).lower(), int(w.get("num_bits", 8))
    a = g.get("input_activations")
    if kind == "int":
        if a is not None:  # W8A8 / W4A8: integer (or FP8) activations with integer weights
            what = "int" if not isinstance(a, dict) else str(a.get("type", "int")).lower()
            abits = a.get("num_bits", 8) if isinstance(a, dict) else "?"
            raise _unsupported(
                f"group {name!r}: activation quantization with integer weights "
                f"(W{bits}A{abits}: {what} {abits}-bit activations"
                + (f" in the {gfmt!r} format" if gfmt else "") + f"; weights {_args_text(w)})",
                ALT_INT)
        return IntGroup(_targets(g.get("targets")), _check_int_weights(name, w, gfmt))
    if gfmt is not None and gfmt not in FP8_FORMATS:
        raise _unsupported(f"the {gfmt!r} format (group {name!r}: {_args_text(w)})", ALT_INT)
    if kind != "float" or bits != 8:
        raise _unsupported(f"group {name!r}: {kind} {bits}-bit weights ({_args_text(w)})", ALT_INT)
    strategy = _check_fp8_weights(name, w)
    return FP8Group(_targets(g.get("targets")), strategy, _check_inputs(name, a))


def parse(qc: dict[str, Any]) -> CompressedTensorsScheme:
    """The FP8 and integer weight-only groups of a compressed-tensors ``quantization_config``;
    ValueError for any other scheme."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _unsupported("a quantization_config without config_groups")
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and str(sparsity.get("format") or "dense").lower() != "dense":
        raise _unsupported(f"sparsity ({sparsity.get('format')!r} sparsity_config)", ALT_INT)
    if qc.get("kv_cache_scheme"):
        raise _unsupported("a quantized KV cache (kv_cache_scheme: k_scale / v_scale tensors)",
                           "use a checkpoint without kv_cache_scheme (--kv-cache-dtype fp8 "
                           "quantizes the cache at run time), " + ALT_FP8)
    if qc.get("transform_config"):
        raise _unsupported("transforms (transform_config)")
    fmt = qc.get("format")
    if str(fmt).lower() == "mixed-precision":  # each group names its own format
        fmt = None
    parsed = tuple(_parse_group(name, g, fmt) for name, g in groups.items())
    return CompressedTensorsScheme(parsed, _targets(qc.get("ignore")))


def parse_fp8(qc: dict[str, Any]) -> CompressedTensorsScheme:
    """The FP8 scheme of a compressed-tensors ``quantization_config``; ValueError for any other
    (integer weight-only groups too: ``parse`` reads those)."""
    scheme = parse(qc)
    if scheme.int_groups:
        what = ", ".join(sorted({g.weights.describe() for g in scheme.int_groups}))
        raise _unsupported(f"integer weights ({what}) on the FP8 path",
                           "load the checkpoint as compressed-tensors (drop --quantization)")
    return scheme


def is_fp8_only(qc: dict[str, Any]) -> bool:
    """Whether a compressed-tensors config (parsed without error) has only FP8 groups."""
    return not parse(qc).int_groups


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


def fused_parts_differ(prefix: str, kinds: dict[str, str], alt: str = "") -> ValueError:
    """The error for a fused layer (q/k/v, gate/up) whose checkpoint parts are quantized
    differently; kinds: part name -> how it is stored."""
    shown = ", ".join(f"{n} ({k})" for n, k in kinds.items())
    return ValueError(
        f"compressed-tensors checkpoint: {prefix} is one fused layer here, but the checkpoint "
        f"quantizes its parts differently: {shown}; quantize (or ignore) all of them alike, or "
        f"load the unquantized checkpoint{alt}")


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
