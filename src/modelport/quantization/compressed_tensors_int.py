"""compressed-tensors integer weight-only checkpoints (W4A16 / W8A16, ``pack-quantized``).

The layout (compressed_tensors.py describes it) is GPTQ's information in other tensors:
codes packed along K in int32 words per output row (GPTQ packs along K per input column),
signed values stored with an offset (2**(bits - 1)), scales [N, groups], optional packed zero
points along N, optional act-order ``weight_g_idx``. ``CompressedTensorsIntMethod`` loads
those tensors as they are (one shard of a fused q/k/v or gate/up layer at a time) and turns
them into the ``GroupQuant`` every integer format shares, so the GPTQ / AWQ kernels run them
(kernels.make_kernel: CPU int4 / int8 GEMMs, the Triton GEMM on CUDA). Nothing is expanded to
floats at load beyond what those kernels do themselves (CpuInt8Kernel requantizes 8-bit rows).

``CompressedTensorsConfig`` is the whole config.json: each layer's method by its checkpoint
modules' group (FP8 groups run fp8.py's method, so a config mixing the two loads too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelport.quantization.base import (
    Cut,
    LinearMethod,
    QuantizationConfig,
    TPShard,
    input_cut,
    load_shard,
    new_param,
    output_cut,
    output_runs,
    outputs_aligned,
    shard_slice,
)
from modelport.quantization.compressed_tensors import (
    CompressedTensorsScheme,
    FP8Group,
    IntGroup,
    IntWeights,
    checkpoint_names,
    fused_parts_differ,
    parse,
)
from modelport.quantization.kernels import GroupQuant, GroupQuantMethod, keep_used_groups
from modelport.quantization.packing import pack_along, unpack_along


@dataclass
class CompressedTensorsConfig(QuantizationConfig):
    """A compressed-tensors config with integer weight-only groups (FP8 groups may sit beside
    them); a config of FP8 groups only loads as fp8.CompressedTensorsFP8Config instead."""

    scheme: CompressedTensorsScheme = field(default_factory=lambda: CompressedTensorsScheme((), ()))
    stacked: tuple[Any, ...] = ()
    name: str = field(default="compressed-tensors", init=False)

    @classmethod
    def from_hf(cls, qc: dict[str, Any], stacked: Sequence[Any] = ()) -> CompressedTensorsConfig:
        return cls(scheme=parse(qc), stacked=tuple(stacked))

    @property
    def group_size(self) -> int:
        """The finest group along K of the integer groups (-1: per channel only); what a
        tensor-parallel split of a down projection must respect."""
        sizes = [g.weights.group_size for g in self.scheme.int_groups if g.weights.group_size]
        return min(sizes) if sizes else -1

    def use_stacked_params(self, stacked_params: Sequence[Any]) -> None:
        self.stacked = tuple(stacked_params)

    def check_device(self, device: torch.device) -> None:
        if any(isinstance(g, FP8Group) for g in self.scheme.groups):
            from modelport.quantization.fp8 import FP8Config

            FP8Config().check_device(device)

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        names = checkpoint_names(prefix, self.stacked)
        groups = {n: self.scheme.group_for(n) for n in names}
        kinds = {n: _kind(g) for n, g in groups.items()}
        if len(set(kinds.values())) > 1:
            raise fused_parts_differ(prefix, kinds)
        group = groups[names[0]]
        if group is None:
            return None  # ignored (or in no group): its float weight is in the file
        if isinstance(group, IntGroup):
            return CompressedTensorsIntMethod(group.weights)
        from modelport.quantization.fp8 import FP8Config, FP8LinearMethod

        return FP8LinearMethod(FP8Config(activation_scheme="static" if group.static_input
                                         else "dynamic"))


def _kind(g: FP8Group | IntGroup | None) -> str:
    if g is None:
        return "float"
    if isinstance(g, IntGroup):
        return g.weights.describe()
    return "fp8 " + ("static" if g.static_input else "dynamic")


class CompressedTensorsIntMethod(GroupQuantMethod):
    """A pack-quantized layer: weight_packed / weight_scale / weight_shape (+ weight_zero_point
    when asymmetric, weight_g_idx with act-order) -> GroupQuant."""

    format_name = "compressed-tensors"

    def __init__(self, args: IntWeights) -> None:
        self.args = args
        self.config = args  # what dummy.encode reads
        # a tensor-parallel rank's act-order row slice: every group's scales / zero points
        # (its columns may reference any group), the whole weight's group count
        self.all_groups: int | None = None

    def group_size_for(self, input_size: int) -> int | None:
        return self.args.group_size if self.args.strategy == "group" else None

    def _groups(self, input_size: int) -> int:
        g = self.args.group_size
        return -(-input_size // g) if self.args.strategy == "group" and g else 1

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        a, n = self.args, sum(output_sizes)
        words = -(-input_size // a.pack_factor)
        groups = self.all_groups or self._groups(input_size)
        new_param(layer, "weight_packed", torch.zeros(n, words, dtype=torch.int32), output_dim=0)
        # float32 holds a bf16 / fp16 / fp32 checkpoint scale exactly
        new_param(layer, "weight_scale", torch.zeros(n, groups, dtype=torch.float32),
                  output_dim=0, loader=lambda p, t, shard_id=None: self._load_scale(layer, p, t, shard_id))
        shards = max(1, len(output_sizes))
        new_param(layer, "weight_shape", torch.full((shards, 2), -1, dtype=torch.int64),
                  loader=lambda p, t, shard_id=None: self._load_shape(layer, p, t, shard_id))
        if not a.symmetric:  # unpacked here: a shard's rows need not fill whole words
            new_param(layer, "weight_zero_point", torch.zeros(n, groups, dtype=torch.uint8),
                      output_dim=0,
                      loader=lambda p, t, shard_id=None: self._load_zero(layer, p, t, shard_id))
        if a.actorder:
            new_param(layer, "weight_g_idx", torch.full((input_size,), -1, dtype=torch.int32),
                      loader=lambda p, t, shard_id=None: _load_g_idx(p, t))

    @staticmethod
    def _rows(layer: nn.Module, shard_id: str | None) -> tuple[int, int]:
        """(first row, rows) of a shard, or of the whole layer."""
        sl = shard_slice(layer, shard_id)
        return sl if sl is not None else (0, int(layer._parameters["weight_packed"].shape[0]))

    def _load_scale(self, layer: nn.Module, param: nn.Parameter, t: torch.Tensor,
                    shard_id: str | None) -> None:
        if not t.is_floating_point():
            raise ValueError(f"weight_scale: checkpoint has {t.dtype}, expected a float tensor")
        if self.args.strategy == "tensor" and t.numel() == 1:  # one scale for the whole shard
            t = t.reshape(1, 1).expand(self._rows(layer, shard_id)[1], 1)
        elif self.args.strategy == "channel" and t.dim() == 1:  # [out] as some writers store it
            t = t.reshape(-1, 1)
        load_shard(layer, "weight_scale", param, t, shard_id)

    def _load_shape(self, layer: nn.Module, param: nn.Parameter, t: torch.Tensor,
                    shard_id: str | None) -> None:
        rows = self._rows(layer, shard_id)[1]
        want = (rows, int(layer.input_size))
        got = tuple(int(v) for v in t.reshape(-1).tolist())
        if got != want:
            where = f" (shard {shard_id!r})" if shard_id else ""
            raise ValueError(f"weight_shape{where}: checkpoint says {list(got)}, the layer is "
                             f"{list(want)} [out, in]")
        ranges = getattr(layer, "shard_ranges", None) or {}
        if shard_id is None:  # the whole (possibly fused) layer at once
            sizes = [n for _, n in ranges.values()] or [rows]
            param.data.copy_(torch.tensor([[n, want[1]] for n in sizes]))
        else:
            param.data[list(ranges).index(shard_id)] = torch.tensor(want)

    def _load_zero(self, layer: nn.Module, param: nn.Parameter, t: torch.Tensor,
                   shard_id: str | None) -> None:
        """Zero points packed along the output rows (int32 [ceil(rows / p), groups]), or (as
        older writers stored them) one signed int8 value per row and group."""
        a = self.args
        rows = self._rows(layer, shard_id)[1]
        if t.dtype == torch.int32:
            codes = unpack_along(t, a.bits, dim=0)  # uint8
            if codes.shape[0] < rows or codes.shape[0] - rows >= a.pack_factor:
                raise ValueError(
                    f"weight_zero_point: checkpoint has {tuple(t.shape)} packed words, which "
                    f"do not hold {rows} output rows of {a.bits}-bit zero points")
            codes = codes[:rows]
        elif t.dtype == torch.int8:
            codes = (t.to(torch.int32) + a.offset).to(torch.uint8)
        else:
            raise ValueError(f"weight_zero_point: checkpoint has {t.dtype}, expected int32 "
                             "(packed) or int8")
        if a.strategy == "tensor" and codes.numel() == 1:
            codes = codes.reshape(1, 1).expand(rows, 1)
        load_shard(layer, "weight_zero_point", param, codes, shard_id)

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Output rows: weight_packed's and the scales' rows, the zero points' packed words
        (asymmetric: where the rank's rows fill whole words); g_idx whole. Input columns:
        weight_packed's words and, per group, the scales and zero points of the rank's groups
        (channel: the one column, whole); act-order: the rank's g_idx with every group's
        scales. weight_shape becomes the slice's. Loaded whole instead (cut before repacking):
        one tensor-wide scale, a slice inside one group, inputs not filling whole words."""
        self.check_split(layer, spec)
        a, per, k = self.args, self.args.pack_factor, spec.input_size
        if a.strategy == "tensor" or k % per:
            return None
        cuts: dict[str, Cut] = {"weight_shape": _shape_cut(spec)}
        if spec.dim == 0:
            if not a.symmetric and not outputs_aligned(spec, per):
                return None
            cuts["weight_packed"] = cuts["weight_scale"] = output_cut(spec, 0)
            if not a.symmetric:
                cuts["weight_zero_point"] = output_cut(spec, 0, per)
            if a.actorder:
                cuts["weight_g_idx"] = lambda t, shard_id: t
            return cuts
        start, part = spec.start, spec.length
        if start % per or part % per:
            return None
        cuts["weight_packed"] = input_cut(start // per, part // per, k // per, 1)
        if a.strategy == "channel":  # one scale (and zero) a row: whole
            return cuts
        g = int(a.group_size or k)
        if part % g or k % g:
            return None
        if a.actorder:
            self.all_groups = k // g
            cuts["weight_g_idx"] = input_cut(start, part, k, 0)
            return cuts
        cuts["weight_scale"] = input_cut(start // g, part // g, k // g, 1)
        if not a.symmetric:
            cuts["weight_zero_point"] = input_cut(start // g, part // g, k // g, 1)
        return cuts

    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        a = self.args
        if (layer.weight_shape.data < 0).any():
            raise ValueError("compressed-tensors: a shard of this layer received no weight_shape")
        codes = unpack_along(layer.weight_packed.data, a.bits, dim=1)[:, :input_size]
        scales = layer.weight_scale.data.float()
        if a.symmetric:
            zeros = -float(a.offset) * scales
        else:
            zeros = -layer.weight_zero_point.data.float() * scales
        g_idx = None
        group = a.group_size if a.strategy == "group" else input_size
        if a.actorder:
            g_idx = layer.weight_g_idx.data.long()
            if g_idx.min() < 0 or g_idx.max() >= scales.shape[1]:
                raise ValueError(f"compressed-tensors: weight_g_idx must give each of "
                                 f"{input_size} inputs a group in [0, {scales.shape[1]})")
            in_order = torch.equal(g_idx, torch.arange(input_size, device=g_idx.device) // group)
            if in_order and not self.all_groups:  # (a rank's act-order slice: renumbered below)
                g_idx = None
        elif input_size % group:  # a last, narrower group: explicit group of each input
            g_idx = torch.arange(input_size, device=codes.device) // group
        for name in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                     "weight_g_idx"):
            layer._parameters.pop(name, None)
        gq = GroupQuant(codes.contiguous(), scales, zeros, group, a.bits, g_idx)
        return keep_used_groups(gq) if self.all_groups else gq


def _shape_cut(spec: TPShard) -> Cut:
    """weight_shape of the whole shard (checked) -> the rank's slice of it."""
    def cut(t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
        rows, cols = (int(v) for v in t.reshape(-1).tolist())
        whole = spec.shard_ranges[shard_id][1] if shard_id is not None and spec.shard_ranges \
            else spec.output_size
        if (rows, cols) != (whole, spec.input_size):
            where = f" (shard {shard_id!r})" if shard_id else ""
            raise ValueError(f"weight_shape{where}: checkpoint says {[rows, cols]}, the layer "
                             f"is {[whole, spec.input_size]} [out, in]")
        if spec.dim == 0:
            return torch.tensor([sum(n for _, n in output_runs(spec, shard_id)), cols])
        return torch.tensor([rows, spec.length])
    return cut


def _load_g_idx(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Every shard of a fused layer carries a g_idx for the same inputs: they must agree."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"weight_g_idx has shape {tuple(loaded.shape)}, expected "
                         f"{tuple(param.shape)}")
    loaded = loaded.to(param.device, param.dtype)
    if (param.data >= 0).all() and not torch.equal(param.data, loaded):
        raise ValueError("compressed-tensors: the parts of a fused layer (q/k/v or gate/up) "
                         "have different weight_g_idx (act-order); the kernels need one order "
                         "per layer")
    param.data.copy_(loaded)


def pack_int_weight(w: torch.Tensor, args: IntWeights) -> dict[str, torch.Tensor]:
    """A float weight [N, K] in ``args``' pack-quantized tensors, rounded to nearest (what
    load_format="dummy" loads; a checkpoint's own come from llm-compressor)."""
    from modelport.quantization.tools.rtn import rtn_quantize

    n, k = w.shape
    group = args.group_size if args.strategy == "group" else -1
    codes, zeros, scales = rtn_quantize(w, args.bits, group or -1, sym=args.symmetric)
    out = {"weight_packed": pack_along(codes, args.bits, dim=1), "weight_scale": scales,
           "weight_shape": torch.tensor([n, k])}
    if not args.symmetric:
        out["weight_zero_point"] = pack_along(zeros, args.bits, dim=0)
    if args.actorder:
        out["weight_g_idx"] = (torch.arange(k, device=w.device) // (group or k)).to(torch.int32)
    return out
