"""bitsandbytes NF4 checkpoints (transformers' 4-bit serialization), with double quantization.

Per linear ``X`` the checkpoint stores (bitsandbytes' Params4bit layout):
  X.weight                 uint8 [N*K/2, 1]   two 4-bit codes per byte, first in the high nibble,
                                              over the row-major flattened [N, K] weight
  X.weight.absmax          float32 [N*K/64]   per block of 64 weights (blocksize)
                           or uint8 with double quant: absmax = nested_quant_map[a] *
                           nested_absmax[i // nested_blocksize] + nested_offset
  X.weight.quant_map       float32 [16]       the NF4 code values
  X.weight.nested_absmax / nested_quant_map   (double quant only)
  X.weight.quant_state.bitsandbytes__nf4      uint8 bytes of a JSON dict (blocksize, shape,
                                              nested_blocksize, nested_offset, ...)
  w = quant_map[code] * absmax[block]

Dotted sub-names cannot be parameters, so the plan renames them in the weight stream
(``X.weight.absmax`` -> ``X.nf4_absmax``) and each shard is kept apart until loading ends;
absmax is then expanded to float32 once (it is 1/64 of the weight count).

Tensor parallelism (``slice_cuts``): the flat layout is row-major and a row holds K/2 bytes
and K / blocksize whole blocks (K is a multiple of the blocksize), so a rank's output rows
are runs of bytes and of absmax values, and its input columns are the same columns of every
row (and the blocks they overlap). Both are cut as the tensors stream in; double quant's
nested absmax, the code books and the quant_state are tiny and stay whole (an absmax code's
nested block comes from its position in the whole layer, known when unpacking).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelport.quantization.base import (
    Cut,
    LinearMethod,
    QuantizationConfig,
    TPShard,
    check_input_split,
    output_runs,
)
from modelport.quantization.kernels import CpuInt8Kernel

# The NF4 code book (QLoRA paper, Appendix E): quantiles of N(0, 1) normalised to [-1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
             "quant_state.bitsandbytes__nf4")


@dataclass
class NF4Config(QuantizationConfig):
    double_quant: bool = True
    name: str = field(default="bitsandbytes", init=False)

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> NF4Config:
        if qc.get("load_in_8bit"):
            raise ValueError("bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; NF4 is")
        if not qc.get("load_in_4bit", True):
            raise ValueError("bitsandbytes checkpoint is neither 4-bit nor 8-bit")
        kind = str(qc.get("bnb_4bit_quant_type", "nf4")).lower()
        if kind != "nf4":
            raise ValueError(f"bitsandbytes 4-bit type {kind!r} is not supported (only nf4)")
        return cls(double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))

    def hf_dict(self) -> dict[str, Any]:
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}

    def linear_method(self, prefix: str, layer: nn.Module) -> LinearMethod | None:
        return NF4LinearMethod(self)


def rename_stream(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``X.weight.absmax`` -> ``X.nf4_absmax`` etc. so each piece names a parameter."""
    for name, t in weights:
        for suf in _SUFFIXES:
            if name.endswith(f".weight.{suf}"):
                key = "nf4_state" if suf.startswith("quant_state") else f"nf4_{suf}"
                name = name[: -len(f"weight.{suf}")] + key
                break
        yield name, t


class NF4LinearMethod(LinearMethod):
    def __init__(self, config: NF4Config) -> None:
        self.config = config
        nested = ("nf4_nested_absmax", "nf4_nested_quant_map") if config.double_quant else ()
        self.pieces = ("weight", "nf4_absmax", "nf4_quant_map", "nf4_state", *nested)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:
        layer.nf4_parts = {}
        for piece in self.pieces:
            p = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            p.weight_loader = (lambda param, loaded, shard_id=None, piece=piece:
                               layer.nf4_parts.setdefault(shard_id, {}).__setitem__(piece, loaded))
            layer.register_parameter(piece, p)

    def shard(self, layer: nn.Module, spec: TPShard) -> None:
        """Record the slice; the codes and absmax are cut once unpacked (the block size is in
        the checkpoint's quant_state, so a bad input split is reported then)."""
        if hasattr(layer, "nf4_codes"):
            raise ValueError("NF4: shard a layer before process_weights_after_loading")
        layer.tp_cut = spec

    def slice_cuts(self, layer: nn.Module, spec: TPShard) -> dict[str, Cut] | None:
        """The packed weight's bytes and the absmax values (or double quant's codes) of the
        rank's rows, or of its columns in every row; the rest loads whole (module docstring).
        A column slice inside one block keeps that block's absmax; one that splits blocks
        otherwise is refused as ``shard`` refuses it (the blocksize is known once the absmax
        streams in). An odd column split (half a byte) loads whole."""
        if spec.dim == 1 and (spec.start % 2 or spec.length % 2):
            return None
        layer.nf4_slice = spec
        return {"weight": partial(_cut_weight, spec), "nf4_absmax": partial(_cut_absmax, spec)}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        spec: TPShard | None = getattr(layer, "tp_cut", None)
        sliced: TPShard | None = layer.__dict__.pop("nf4_slice", None)  # cut as it loaded
        whole = spec or sliced
        k = whole.input_size if whole else int(layer.input_size)
        n_all = whole.output_size if whole else int(layer.output_size)
        ranges = (whole.shard_ranges if whole else None) or getattr(layer, "shard_ranges",
                                                                     None) or {}
        codes, scales = [], []
        shards = list(ranges or {None: 0})
        if set(layer.nf4_parts) == {None}:  # one fused tensor (dummy weights, Phi-3's qkv)
            shards = [None]
        for shard in shards:
            parts = layer.nf4_parts.get(shard)
            if parts is None:
                raise ValueError(f"NF4: shard {shard!r} of {type(layer).__name__} was not loaded")
            n = ranges[shard][1] if shard is not None else n_all
            keep = _kept(sliced, shard) if sliced is not None else None
            c, s = nf4_unpack(parts, n, k, keep)
            codes.append(c)
            scales.append(s)
        for piece in self.pieces:
            del layer._parameters[piece]
        del layer.nf4_parts
        codes_t, absmax = torch.cat(codes), torch.cat(scales)
        block = codes_t.shape[1] // absmax.shape[1]  # a slice inside one block: its width
        if spec is not None:
            codes_t, absmax, block = _shard_nf4(codes_t, absmax, block, spec)
            layer.tp_cut = None
        dev = torch.device(layer.quant_device)
        if _triton_fits(dev, codes_t.shape[1], block):  # kept at 4 bits: Triton kernels
            from modelport.quantization.triton_nf4 import pack_rows

            layer.register_buffer("nf4_packed", pack_rows(codes_t).to(dev))
        elif dev.type == "cpu" and cpu_int8_rows():
            # torch's int8 GEMM on the rows requantized to int8 (kernels.CpuInt8Kernel)
            table = torch.tensor(NF4_CODE)
            layer.nf4_int8 = CpuInt8Kernel(nf4_dequantize(codes_t, absmax.float(), table, block))
            layer.nf4_block = block
            return
        else:
            layer.register_buffer("nf4_codes", codes_t.contiguous().to(dev))
        layer.register_buffer("nf4_absmax", absmax.contiguous().to(dev))
        layer.register_buffer("nf4_table", torch.tensor(NF4_CODE, device=dev))
        layer.nf4_block = block

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if hasattr(layer, "nf4_int8"):
            y = layer.nf4_int8(x)
            return y + bias if bias is not None else y
        if hasattr(layer, "nf4_packed"):
            from modelport.quantization import triton_nf4

            return triton_nf4.linear(x, layer.nf4_packed, layer.nf4_absmax, layer.nf4_table, bias)
        # reference path (CPU, or a layout the kernels do not take): dequantize per call
        w = nf4_dequantize(layer.nf4_codes, layer.nf4_absmax.to(x.dtype),
                           layer.nf4_table.to(x.dtype), layer.nf4_block)
        return F.linear(x, w, bias)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                   block: int) -> torch.Tensor:
    """codes [N, K] (uint8 code-book indices) -> table[code] x its block's absmax, [N, K] in
    table's dtype."""
    w = table[codes.long()]
    return (w.view(w.shape[0], -1, block) * absmax[..., None]).view(codes.shape)


def cpu_int8_rows() -> bool:
    """Whether NF4 on a CPU runs the int8 kernel (else: dequantization per call, exact)."""
    return os.environ.get("MODELPORT_NF4_CPU_INT8", "1") != "0"


def _triton_fits(dev: torch.device, k: int, block: int) -> bool:
    """Whether this layer runs on the Triton NF4 kernels (CUDA, Triton importable, a layout
    they take; MODELPORT_NF4_TRITON=0 keeps the per-call dequantization)."""
    if dev.type != "cuda" or os.environ.get("MODELPORT_NF4_TRITON", "1") == "0":
        return False
    from modelport.quantization import triton_gemm, triton_nf4

    return triton_gemm.available() and triton_nf4.fits(k, block)


def _shard_nf4(codes: torch.Tensor, absmax: torch.Tensor, block: int,
               spec: TPShard) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One rank's rows (dim 0) or input columns (dim 1, whole blocks or inside one block)."""
    if spec.dim == 0:
        idx = spec.index.to(codes.device)
        return codes[idx], absmax[idx], block
    k0, part = spec.start, spec.length
    check_input_split(spec.input_size, part, spec.size, block, "NF4 (bitsandbytes) blocks")
    codes = codes[:, k0 : k0 + part]
    if part % block == 0:
        return codes, absmax[:, k0 // block : (k0 + part) // block], block
    g = k0 // block
    return codes, absmax[:, g : g + 1], part


# a rank's part of one shard's [n, k]: (row runs (start, length), first column, columns)
Kept = tuple[list[tuple[int, int]], int, int]


def _kept(spec: TPShard, shard_id: str | None) -> Kept:
    """The rows and columns of shard ``shard_id`` (None: the whole layer) a rank keeps."""
    if spec.dim == 0:
        return output_runs(spec, shard_id), 0, spec.input_size
    n = spec.shard_ranges[shard_id][1] if shard_id is not None else spec.output_size
    return [(0, n)], spec.start, spec.length


def _shard_rows(spec: TPShard, shard_id: str | None) -> int:
    if shard_id is None:
        return spec.output_size
    if not spec.shard_ranges or shard_id not in spec.shard_ranges:
        raise ValueError(f"NF4: tensor-parallel layer has no shard {shard_id!r}")
    return spec.shard_ranges[shard_id][1]


def _cut_weight(spec: TPShard, t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
    """The packed bytes of the rank's part of a shard's [n, k] (two codes a byte, row-major),
    as a copy (the loader keeps what it is given)."""
    n, k = _shard_rows(spec, shard_id), spec.input_size
    if t.numel() * 2 != n * k:
        raise ValueError(f"NF4: packed weight has {t.numel()} bytes, expected {n * k // 2}")
    runs, c0, p = _kept(spec, shard_id)
    rows = t.reshape(n, k // 2)
    return torch.cat([rows[s : s + m, c0 // 2 : (c0 + p) // 2] for s, m in runs]).reshape(-1, 1)


def _cut_absmax(spec: TPShard, t: torch.Tensor, shard_id: str | None) -> torch.Tensor:
    """The absmax values (or double quant's codes) of the blocks the rank's part overlaps."""
    n, k = _shard_rows(spec, shard_id), spec.input_size
    flat = t.reshape(-1)
    block = n * k // max(flat.numel(), 1)
    if block * flat.numel() != n * k or k % block:
        raise ValueError(f"NF4: absmax has {flat.numel()} values, which is no whole number of "
                         f"blocks per row of the {[n, k]} weight")
    runs, c0, p = _kept(spec, shard_id)
    if spec.dim == 1:
        check_input_split(spec.input_size, p, spec.size, block, "NF4 (bitsandbytes) blocks")
    g0, g1 = c0 // block, (c0 + p - 1) // block + 1
    per_row = flat.view(n, k // block)
    return torch.cat([per_row[s : s + m, g0:g1] for s, m in runs]).reshape(-1)


def _state(parts: dict[str, torch.Tensor]) -> dict[str, Any]:
    raw = parts.get("nf4_state")
    if raw is None:
        raise ValueError("NF4: missing weight.quant_state.bitsandbytes__nf4 (not a bnb 4-bit checkpoint?)")
    try:
        return json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"NF4: corrupt quant_state ({e})") from None


def nf4_unpack(parts: dict[str, torch.Tensor], n: int, k: int, keep: Kept | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's pieces -> (codes uint8 [n, k], absmax float32 [n, k // blocksize]).
    ``keep``: the pieces hold only these rows and columns of the shard's [n, k] (a rank's
    slice cut as it loaded: ``slice_cuts``); the result is that part, [rows, columns] codes
    and the absmax of the blocks the columns overlap."""
    st = _state(parts)
    block = int(st.get("blocksize", 64))
    if list(st.get("shape", [n, k])) != [n, k]:
        raise ValueError(f"NF4: quant_state shape {st.get('shape')} but the layer is {[n, k]}")
    if k % block:
        raise ValueError(f"NF4: input size {k} is not a multiple of the blocksize {block}")
    runs, c0, p = keep or ([(0, n)], 0, k)
    m = sum(r for _, r in runs)
    g0, g1 = c0 // block, (c0 + p - 1) // block + 1
    packed = parts["weight"].reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != m * p:
        raise ValueError(f"NF4: packed weight has {packed.numel()} bytes, expected {m * p // 2}")
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(m, p)
    absmax = parts["nf4_absmax"].reshape(-1)
    if absmax.numel() != m * (g1 - g0):
        raise ValueError(f"NF4: absmax has {absmax.numel()} values, expected {m * (g1 - g0)}")
    if absmax.dtype == torch.uint8:  # double quantization
        nested_map = parts["nf4_nested_quant_map"].float()
        nested_absmax = parts["nf4_nested_absmax"].float().reshape(-1)
        nb = int(st.get("nested_blocksize", 256))
        # each code's position in the whole shard's absmax picks its nested block
        pos = torch.cat([(torch.arange(s, s + r)[:, None] * (k // block)
                          + torch.arange(g0, g1)).reshape(-1) for s, r in runs])
        absmax = nested_map[absmax.long()] * nested_absmax[pos // nb] + float(st.get("nested_offset", 0.0))
    qmap = parts.get("nf4_quant_map")
    if qmap is not None and not torch.allclose(qmap.float().cpu(), torch.tensor(NF4_CODE), atol=1e-6):
        raise ValueError("NF4: quant_map is not the NF4 code book (FP4 checkpoints are not supported)")
    return codes, absmax.float().reshape(m, g1 - g0)


def nf4_encode(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
               nested_blocksize: int = 256) -> dict[str, torch.Tensor]:
    """Float w [N, K] -> the bnb checkpoint pieces (names relative to ``X.weight``: "" is the
    packed weight itself). Double quant stores absmax - mean as 8-bit codes of a linear signed
    map (the map travels in nested_quant_map, so readers need not know which map was used)."""
    n, k = w.shape
    blocks = w.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    table = torch.tensor(NF4_CODE, device=w.device)
    scaled = blocks / absmax[:, None]
    codes = torch.cat([  # nearest code, 64K blocks at a time (a [blocks, 64, 16] temporary)
        part.unsqueeze(-1).sub(table).abs().argmin(-1).to(torch.uint8)
        for part in scaled.split(1 << 16)
    ])
    flat = codes.reshape(-1)
    out: dict[str, torch.Tensor] = {"": ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1),
                                    "quant_map": table.clone()}
    state: dict[str, Any] = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32",
                             "shape": [n, k]}
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        pad = (-centred.numel()) % nested_blocksize
        nested = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, nested_blocksize)
        nested_absmax = nested.abs().amax(dim=1).clamp(min=1e-12)
        nested_map = torch.linspace(-1, 1, 256, device=w.device)
        q = torch.round((nested / nested_absmax[:, None] + 1) * 127.5).clamp(0, 255)
        out["absmax"] = q.reshape(-1)[: centred.numel()].to(torch.uint8)
        out["nested_absmax"] = nested_absmax
        out["nested_quant_map"] = nested_map
        state.update(nested_blocksize=nested_blocksize, nested_offset=float(offset),
                     nested_dtype="float32")
    else:
        out["absmax"] = absmax
    blob = json.dumps(state).encode()
    out["quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out
