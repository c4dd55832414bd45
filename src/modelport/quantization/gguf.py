"""GGUF kept quantized: raw GGML blocks are loaded as is and run by low-bit kernels.

The float path (loader/gguf.py) dequantizes every tensor; here linear weights stay in their
GGML blocks until ``process_weights_after_loading`` converts them to a GroupQuant for the
kernel (int4 GEMM for the 4-bit types on CPU, dequant-GEMM elsewhere). Norms and the
embedding (and a tied LM head) still come through the float path.

A fused layer (q/k/v, gate/up) may mix types (Q4_K_M files store attn_v as Q6_K, Q3_K_M
files as Q4_K / Q5_K beside Q3_K q/k): shards are unpacked separately and concatenated;
groups of 32 are split to 16 when a Q2_K / Q3_K / Q6_K shard needs it, so one kernel still
runs the fused matmul.

A tensor-parallel rank built as its slice keeps its rows of each shard's blocks, or, for a
row-parallel layer, the blocks that overlap its input columns (whole 256-wide super-blocks of
a K-quant), trimmed to its columns once unpacked. So what constrains a row-parallel cut is the
unpacked group width (``group_width``: 16 for Q2_K / Q3_K / Q6_K, 32 for the others), not the
block width.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from modelport.quantization.base import (
    Cut,
    LinearMethod,
    QuantizationConfig,
    TPShard,
    check_input_split,
    output_cut,
    shard_slice,
)
from modelport.quantization.gguf_formats import row_bytes, type_name
from modelport.quantization.gguf_formats import unpack as unpack_ggml
from modelport.quantization.gguf_types import FLOAT_TYPES, GGML_CODES, GGML_TYPES
from modelport.quantization.kernels import GroupQuant, GroupQuantMethod, shard_group_quant


@dataclass
class GGUFQuantConfig(QuantizationConfig):
    """tensor_types: HF checkpoint name -> ggml type id, read from the file's tensor table."""

    tensor_types: dict[str, int]
    stacked_params: Sequence[tuple[str, str, str]] = ()
    name: str = field(default="gguf", init=False)
    kept: set[str] = field(default_factory=set, init=False)  # names loaded as raw blocks

    def use_stacked_params(self, stacked_params: Sequence[Any]) -> None:
        self.stacked_params = tuple(stacked_params)

    def shard_names(self, prefix: str, layer: nn.Module) -> dict[str | None, str]:
        """Checkpoint weight name of each shard of the layer at ``prefix``."""
        ranges = getattr(layer, "shard_ranges", None)
        if not ranges or f"{prefix}.weight" in self.tensor_types:  # Phi-3 stores qkv fused
            return {None: self._whole_name(prefix)}
        out: dict[str | None, str] = {}
        for fused, part, shard in self.stacked_params:
            if fused in f"{prefix}." and shard in ranges:
                name = f"{prefix}.".replace(fused, part) + "weight"
                # the first entry whose name the file holds (Mixtral's experts.<e>.w1 before
                # the dense table's gate_proj)
                if shard not in out or (out[shard] not in self.tensor_types
                                        and name in self.tensor_types):
                    out[shard] = name
        return out

    def _whole_name(self, prefix: str) -> str:
        """An unfused layer's checkpoint name; a renamed one (Mixtral's experts.<e>.w2 ->
        experts.<e>.down_proj) through the loading table's whole-tensor entries."""
        name = f"{prefix}.weight"
        if name not in self.tensor_types:
            for fused, part, shard in self.stacked_params:
                alt = f"{prefix}.".replace(fused, part) + "weight"
                if shard is None and fused in f"{prefix}." and alt in self.tensor_types:
                    return alt
        return name

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        names = self.shard_names(prefix, layer)
        types = {shard: self.tensor_types.get(n) for shard, n in names.items()}
        if all(t is None or t in FLOAT_TYPES for t in types.values()):
            return None
        bad = {names[s]: t for s, t in types.items() if t not in GGML_TYPES}
        if bad:
            desc = ", ".join(f"{n} ({type_name(t) if t is not None else 'absent'})"
                             for n, t in bad.items())
            raise ValueError(
                f"cannot keep {prefix} quantized: {desc}; load the file with "
                "--quantization none to dequantize it"
            )
        self.kept.update(names.values())
        return GGUFLinearMethod({s: int(t) for s, t in types.items()})  # type: ignore[arg-type]


@dataclass
class GGUFDummyConfig(QuantizationConfig):
    """Every linear layer in one GGML type (load_format="dummy" with quantization="gguf" on a
    float config: benchmarks). The type: MODELPORT_DUMMY_GGUF_TYPE, Q4_K unless set."""

    type_id: int = 12
    name: str = field(default="gguf", init=False)

    @classmethod
    def from_env(cls) -> GGUFDummyConfig:
        from modelport.quantization.gguf_formats import PACK_TYPES

        t = os.environ.get("MODELPORT_DUMMY_GGUF_TYPE", "Q4_K").upper()
        if t not in PACK_TYPES:
            raise ValueError(f"MODELPORT_DUMMY_GGUF_TYPE={t!r}: dummy GGUF weights come in "
                             f"{', '.join(PACK_TYPES)}")
        return cls(PACK_TYPES[t])

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return GGUFLinearMethod({None: self.type_id}, self)  # a fused layer: one tensor


def group_width(type_id: int) -> int:
    """Input columns per scale of the GroupQuant a GGML type unpacks to: the finest cut of a
    row-parallel slice (a K-quant's sub-block, not its 256-wide super-block)."""
    return GGML_CODES[GGML_TYPES[type_id][0]][1]


class GGUFLinearMethod(GroupQuantMethod):
    format_name = "GGUF"

    def __init__(self, shard_types: dict[str | None, int],
                 config: QuantizationConfig | None = None) -> None:
        self.shard_types = shard_types
        self.config = config  # the dummy config (what the dummy packer reads)
        # a tensor-parallel rank's row slice (slice_cuts): (offset of its columns in the kept
        # blocks, its columns, the kept blocks' columns)
        self.cols: tuple[int, int, int] | None = None

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """Output rows: rows of each shard's raw blocks. Input columns: the blocks overlapping
        them (a row-parallel layer is one tensor, one type); refused where they are not whole
        groups of the unpacked type (nor inside one)."""
        if spec.dim == 0:
            return {"weight": output_cut(spec, 0)}
        (t,) = self.shard_types.values()
        _, block, nbytes = GGML_TYPES[t]
        start, part, k = spec.start, spec.length, spec.input_size
        check_input_split(k, part, spec.size, group_width(t), f"GGUF {type(layer).__name__}")
        b0, b1 = start // block, -(-(start + part) // block)
        self.cols = (start - b0 * block, part, (b1 - b0) * block)
        whole = row_bytes(t, k)

        def blocks(raw: torch.Tensor, shard_id: str | None) -> torch.Tensor:
            if raw.ndim != 2 or raw.shape[1] != whole:
                raise ValueError(f"GGUF {type_name(t)} tensor has {tuple(raw.shape)}, expected "
                                 f"rows of {whole} bytes (corrupt file or name mapping bug)")
            return raw[:, b0 * nbytes : b1 * nbytes]

        return {"weight": blocks}

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        # Raw blocks differ in width per type, so shards are kept apart until loading ends;
        # the placeholder parameter exists for the loading table and the missing-weight check.
        layer.gguf_raw = {}
        p = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        p.weight_loader = lambda param, loaded, shard_id=None: self._load(layer, loaded, shard_id)
        layer.register_parameter("weight", p)

    def _load(self, layer: nn.Module, raw: torch.Tensor, shard_id: str | None) -> None:
        if shard_id not in self.shard_types:
            raise ValueError(f"GGUF: unexpected shard {shard_id!r} for {type(layer).__name__}")
        sl = shard_slice(layer, shard_id)
        rows = sl[1] if sl else int(layer.output_size)
        t = self.shard_types[shard_id]
        want = (rows, row_bytes(t, self.cols[2] if self.cols else int(layer.input_size)))
        if raw.dtype != torch.uint8 or tuple(raw.shape) != want:
            raise ValueError(
                f"GGUF {type_name(t)} tensor has {raw.dtype} {tuple(raw.shape)}, expected raw "
                f"uint8 blocks {want} (corrupt file or name mapping bug)"
            )
        layer.gguf_raw[shard_id] = raw

    def to_group_quant(self, layer: nn.Module, input_size: int) -> GroupQuant:
        k = self.cols[2] if self.cols else input_size
        parts = [unpack_ggml(layer.gguf_raw[s], t, k) for s, t in self.shard_types.items()]
        gq = concat_group_quants(parts)
        if self.cols is not None and self.cols[1] != k:  # trim the kept blocks to the slice
            offset, part, _ = self.cols
            gq = shard_group_quant(gq, 1, torch.arange(offset, offset + part),
                                   f"GGUF {type(layer).__name__}")
        del layer._parameters["weight"]
        del layer.gguf_raw
        layer.gguf_types = tuple(type_name(t) for t in self.shard_types.values())
        return gq


def concat_group_quants(parts: list[GroupQuant]) -> GroupQuant:
    """Stack GroupQuants along the output dim, splitting groups to the finest group size."""
    if len(parts) == 1:
        return parts[0]
    g = min(p.group_size for p in parts)
    scales, zeros = [], []
    for p in parts:
        if p.group_size % g:
            raise ValueError(f"cannot fuse group sizes {p.group_size} and {g}")
        r = p.group_size // g
        scales.append(p.scales.repeat_interleave(r, dim=1))
        zeros.append(p.zeros.repeat_interleave(r, dim=1))
    return GroupQuant(torch.cat([p.codes for p in parts]), torch.cat(scales), torch.cat(zeros),
                      g, max(p.bits for p in parts))


def gguf_quant_config(reader: Any, stacked_params: Sequence[tuple[str, str, str]],
                      arch: str = "llama") -> GGUFQuantConfig:
    from modelport.loader.gguf import hf_tensor_name

    types: dict[str, int] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, arch)
        if "{e}" in name:  # stacked experts [E, out, in]: one entry per expert's name
            types.update((name.format(e=e), int(t.tensor_type)) for e in range(len(t.data)))
        else:
            types[name] = int(t.tensor_type)
    return GGUFQuantConfig(types, tuple(stacked_params))


def iter_gguf_kept(
    reader: Any, hf_config: dict[str, Any], quantized: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like loader.gguf.iter_gguf_weights, but tensors named in ``quantized`` stay raw bytes."""
    from modelport.loader.gguf import (
        _BLOCK_RE,
        GGUF_ARCHITECTURES,
        hf_tensor_name,
        iter_gguf_weights,
        unpermute_qk,
    )

    arch = hf_config["model_type"]
    permuted = GGUF_ARCHITECTURES[arch][1]
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}

    def kept(t: Any) -> bool:
        name = hf_tensor_name(t.name, arch)
        if "{e}" in name:  # stacked experts: kept together (one type for all), by the experts
            # this model holds (under expert parallelism a rank's share of them)
            return any(name.format(e=e) in quantized for e in range(len(t.data)))
        return name in quantized

    class _Subset:  # the float path for everything we do not keep quantized
        tensors = [t for t in reader.tensors if not kept(t)]

    yield from iter_gguf_weights(_Subset, hf_config)
    for t in reader.tensors:
        if not kept(t):
            continue
        name = hf_tensor_name(t.name, arch)
        raw = np.asarray(t.data)
        if "{e}" in name:  # [E, out, row bytes]: each expert's rows are whole blocks
            if raw.dtype != np.uint8 or raw.ndim != 3:
                raise ValueError(f"GGUF tensor {t.name!r}: unexpected raw layout of stacked "
                                 f"experts {raw.dtype} {raw.shape}")
            for e in range(raw.shape[0]):
                if name.format(e=e) in quantized:  # another rank's expert: never read
                    yield name.format(e=e), torch.from_numpy(np.array(raw[e], copy=True))
            continue
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise ValueError(f"GGUF tensor {t.name!r}: unexpected raw layout {raw.dtype} {raw.shape}")
        m = _BLOCK_RE.match(t.name)
        if permuted and m and m.group(2) in heads:
            raw = unpermute_qk(raw, heads[m.group(2)])  # rows move whole, blocks stay intact
        yield name, torch.from_numpy(np.array(raw, copy=True))
