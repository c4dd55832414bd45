"""GGML block formats -> GroupQuant (codes, per-group scale and zero), written from ggml's layout.

Each function takes the raw bytes of a weight, uint8 [rows, bytes_per_row], and returns
unsigned codes plus an affine map per group of inputs, so the same kernels serve all of
them. The tests check every format against ``gguf.quants.dequantize`` (an independent
reference implementation).

Layouts (little-endian; "d", "m", "dmin" are float16):
  Q4_0  32 w / 18 B: d, 16 B nibbles (low nibble = w[j], high = w[j+16]); w = (q - 8) d
  Q4_1  32 w / 20 B: d, m, 16 B nibbles;                                   w = q d + m
  Q5_0  32 w / 22 B: d, 4 B high bits (bit j -> w[j]), 16 B nibbles;       w = (q - 16) d
  Q5_1  32 w / 24 B: d, m, 4 B high bits, 16 B nibbles;                    w = q d + m
  Q8_0  32 w / 34 B: d, 32 int8;                                          w = q d
  Q4_K 256 w / 144 B: d, dmin, 12 B of 6-bit (scale, min) x 8, 128 B nibbles (per 64 w:
       low nibbles = first 32, high = next 32);                            w = d sc q - dmin m
  Q5_K 256 w / 176 B: as Q4_K plus 32 B high bits (bit 2c / 2c+1 for chunk c)
  Q6_K 256 w / 210 B: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, d;
       w = d sc (q - 32), 16 weights per scale
  Q2_K 256 w / 84 B: 16 B of (4-bit scale sc | 4-bit min m << 4), one a sub-block of 16; 64 B
       of 2-bit q (byte 32h + l, bits 2s..2s+1 -> w[128h + 32s + l]); d, dmin;
                                                                           w = d sc q - dmin m
  Q3_K 256 w / 110 B: 32 B high bits (bit j of byte l -> w[32j + l]), 64 B of 2-bit low parts
       (as Q2_K's), 12 B of 6-bit scales (low nibbles: bytes 0-7, low then high halves; top 2
       bits: bytes 8-11, bits 2s..2s+1 of byte 8+i -> sub-block 4s+i), d;
       w = d (sc - 32) (low - 4 (1 - high)), 16 weights per scale (a set high bit means no -4)
"""

from __future__ import annotations

import torch

from modelport.quantization.gguf_types import FLOAT_TYPES, GGML_CODES, GGML_TYPES
from modelport.quantization.kernels import GroupQuant


def type_name(type_id: int) -> str:
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id][0]
    return FLOAT_TYPES.get(type_id, f"ggml type {type_id}")


def row_bytes(type_id: int, k: int) -> int:
    """Bytes one row of k weights takes (ValueError if k does not fill whole blocks)."""
    name, per_block, nbytes = _spec(type_id)
    if k % per_block:
        raise ValueError(f"{name}: row length {k} is not a multiple of the block size {per_block}")
    return k // per_block * nbytes


def _spec(type_id: int) -> tuple[str, int, int]:
    try:
        return GGML_TYPES[type_id]
    except KeyError:
        supported = ", ".join(v[0] for v in GGML_TYPES.values())
        raise ValueError(
            f"GGUF {type_name(type_id)} weights cannot be kept quantized (supported: "
            f"{supported}); load the file with --quantization none to dequantize it"
        ) from None


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n/8] bytes -> [..., n] bits, bit j of the little-endian word = element j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*qh.shape[:-1], n)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[..., 64] bytes of 2-bit values (Q2_K / Q3_K) -> [..., 256]: in each half of 32 bytes,
    bits 2s..2s+1 of byte l hold element 32s + l."""
    qs = qs.reshape(*qs.shape[:-1], 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device)[:, None]
    return ((qs >> shifts) & 3).reshape(*qs.shape[:-3], 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 12] packed 6-bit scales/mins of a K-quant super-block -> two [..., 8]."""
    s = s.to(torch.int32)
    lo_sc = s[..., 0:4] & 63
    lo_m = s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).float(), torch.cat([lo_m, hi_m], -1).float()


def unpack(raw: torch.Tensor, type_id: int, k: int) -> GroupQuant:
    """Raw GGML bytes [N, row_bytes] of an [N, k] weight -> GroupQuant."""
    name, per_block, nbytes = _spec(type_id)
    n = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != row_bytes(type_id, k):
        raise ValueError(
            f"{name} weight of {k} columns needs uint8 rows of {row_bytes(type_id, k)} bytes, "
            f"got {raw.dtype} {tuple(raw.shape)} (truncated or mismatched tensor?)"
        )
    b = raw.reshape(n, k // per_block, nbytes)
    if name == "Q4_0":
        d = _f16(b[..., 0:2])
        codes, scale, zero = _nibbles(b[..., 2:18]), d, -8 * d
    elif name == "Q4_1":
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        codes, scale, zero = _nibbles(b[..., 4:20]), d, m
    elif name in ("Q5_0", "Q5_1"):
        off = 2 if name == "Q5_0" else 4
        d = _f16(b[..., 0:2])
        zero = -16 * d if name == "Q5_0" else _f16(b[..., 2:4])
        high = _bits(b[..., off : off + 4], 32)
        codes = _nibbles(b[..., off + 4 : off + 20]) | (high << 4)
        scale = d
    elif name == "Q8_0":
        d = _f16(b[..., 0:2])
        codes = (b[..., 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        scale, zero = d, -128 * d
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scale_min(b[..., 4:16])
        qs_off = 16 if name == "Q4_K" else 48
        qs = b[..., qs_off : qs_off + 128].reshape(n, -1, 4, 32)  # 4 chunks of 64 weights
        codes = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [n, blocks, 4, 64]
        if name == "Q5_K":
            hb = _bits(b[..., 16:48], 256).reshape(n, -1, 32, 8)  # [.., l, bit]
            hb = hb.permute(0, 1, 3, 2).reshape(n, -1, 4, 64)  # bit 2c -> first 32 of chunk c
            codes = codes | (hb << 4)
        codes = codes.reshape(n, -1, 256)
        scale, zero = d * sc, -dmin * mn
    elif name in ("Q2_K", "Q3_K"):
        low = _crumbs(b[..., 16:80] if name == "Q2_K" else b[..., 32:96])
        if name == "Q2_K":
            sc, mn = (b[..., 0:16] & 0xF).float(), (b[..., 0:16] >> 4).float()
            d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
            codes, scale, zero = low, d * sc, -(dmin * mn)
        else:  # code = low + 4 high = q + 4 for the signed q in -4..3
            shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]
            high = ((b[..., 0:32].unsqueeze(-2) >> shifts) & 1).reshape(n, -1, 256)
            codes = low | (high << 2)
            packed = b[..., 96:108]  # 16 6-bit scales
            lo = torch.cat([packed[..., 0:8] & 0xF, packed[..., 0:8] >> 4], -1)
            hi = torch.cat([(packed[..., 8:12] >> sh) & 3 for sh in (0, 2, 4, 6)], -1)
            scale = _f16(b[..., 108:110])[..., None] * ((lo | (hi << 4)).float() - 32)
            zero = -4 * scale
    else:  # Q6_K
        ql = b[..., 0:128].reshape(n, -1, 2, 64)
        qh = b[..., 128:192].reshape(n, -1, 2, 32)
        sc = b[..., 192:208].view(torch.int8).float()  # 16 per super-block
        d = _f16(b[..., 208:210])[..., None]
        lo = torch.cat([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4,
                        ql[..., 32:] >> 4], dim=-1)  # [n, blocks, 2, 128]
        hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
        codes = (lo | (hi << 4)).reshape(n, -1, 256)
        scale = d * sc
        zero = -32 * scale
    bits, group = GGML_CODES[name]
    return GroupQuant(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.reshape(n, -1).float(),
        zeros=zero.reshape(n, -1).float(),
        group_size=group,
        bits=bits,
    )


# -- packing (dummy weights for benchmarks: load_format="dummy", quantization="gguf") -------
PACK_TYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q2_K": 10, "Q3_K": 11}


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[...] float -> [..., 2] uint8 of its float16."""
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def pack(w: torch.Tensor, type_id: int) -> torch.Tensor:
    """Float w [N, K] -> raw GGML bytes [N, row_bytes] in type Q4_0, Q8_0, Q4_K, Q2_K or Q3_K
    (round to nearest; ggml's own quantizers search scales a little further, the layout is
    the same). Runs on w's device."""
    name, per_block, nbytes = _spec(type_id)
    if name not in PACK_TYPES:
        raise ValueError(f"no packer for {name} (packable: {', '.join(PACK_TYPES)})")
    n, k = w.shape
    row_bytes(type_id, k)  # whole blocks
    x = w.float().reshape(n, k // per_block, per_block)
    if name == "Q8_0":
        d = x.abs().amax(-1) / 127
        d = d.to(torch.float16).float()  # the stored scale: codes are rounded against it
        q = torch.round(x / d.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
        out = torch.cat([_f16_bytes(d), q.view(torch.uint8)], -1)
    elif name == "Q4_0":
        idx = x.abs().argmax(-1, keepdim=True)
        d = (x.gather(-1, idx).squeeze(-1) / -8).to(torch.float16).float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.round(x * inv[..., None] + 8).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), q[..., :16] | (q[..., 16:] << 4)], -1)
    elif name in ("Q2_K", "Q3_K"):
        out = _pack_q2_q3(x.reshape(n, -1, 16, 16), name)
    else:  # Q4_K: 8 sub-blocks of 32, 6-bit scale and min each, against fp16 d and dmin
        sub = x.reshape(n, -1, 8, 32)
        lo = sub.amin(-1).clamp(max=0)
        scale = (sub.amax(-1) - lo) / 15
        d = (scale.amax(-1) / 63).to(torch.float16).float()
        dmin = ((-lo).amax(-1) / 63).to(torch.float16).float()
        sc = torch.round(scale / d.clamp(min=1e-30)[..., None]).clamp(0, 63)
        mn = torch.round(-lo / dmin.clamp(min=1e-30)[..., None]).clamp(0, 63)
        step = (d[..., None] * sc)[..., None]
        q = torch.round((sub + (dmin[..., None] * mn)[..., None]) / step.clamp(min=1e-30))
        q = q.clamp(0, 15).to(torch.uint8).reshape(n, -1, 4, 2, 32)  # chunks of 64
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, -1, 128)
        sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
        packed = torch.cat([
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4),
        ], -1)
        out = torch.cat([_f16_bytes(d), _f16_bytes(dmin), packed, qs], -1)
    assert out.shape[-1] == nbytes
    return out.reshape(n, -1).contiguous()


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b is 0 (an all-zero block or sub-block)."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, 1, b))


def _pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """[..., 256] 2-bit values -> [..., 64] bytes (the inverse of _crumbs)."""
    q = q.reshape(*q.shape[:-1], 2, 4, 32)
    out = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return out.reshape(*q.shape[:-3], 64)


def _pack_q2_q3(sub: torch.Tensor, name: str) -> torch.Tensor:
    """[n, blocks, 16, 16] float sub-blocks -> [n, blocks, 84 | 110] Q2_K / Q3_K bytes."""
    if name == "Q2_K":  # w = d sc q - dmin m: 4-bit sc and m per sub-block, q in 0..3
        lo = sub.amin(-1).clamp(max=0)
        scale = (sub.amax(-1) - lo) / 3
        d = (scale.amax(-1) / 15).to(torch.float16).float()
        dmin = ((-lo).amax(-1) / 15).to(torch.float16).float()
        sc = torch.round(_div(scale, d[..., None])).clamp(0, 15)
        mn = torch.round(_div(-lo, dmin[..., None])).clamp(0, 15)
        step = (d[..., None] * sc)[..., None]
        q = torch.round(_div(sub + (dmin[..., None] * mn)[..., None], step)).clamp(0, 3)
        q = q.to(torch.uint8).flatten(-2)
        scales = sc.to(torch.uint8) | (mn.to(torch.uint8) << 4)
        return torch.cat([scales, _pack_crumbs(q), _f16_bytes(d), _f16_bytes(dmin)], -1)
    # Q3_K: w = d l q, l a signed 6-bit scale per sub-block, q in -4..3 (the largest |w| of a
    # sub-block maps to -4, the largest sub-block scale to l = -32)
    idx = sub.abs().argmax(-1, keepdim=True)
    sub_scale = sub.gather(-1, idx).squeeze(-1) / -4
    idx = sub_scale.abs().argmax(-1, keepdim=True)
    d = (sub_scale.gather(-1, idx).squeeze(-1) / -32).to(torch.float16).float()
    lvl = torch.round(_div(sub_scale, d[..., None])).clamp(-32, 31)
    q = torch.round(_div(sub, (d[..., None] * lvl)[..., None])).clamp(-4, 3)
    code = (q + 4).to(torch.uint8).flatten(-2)  # low 2 bits + a high bit
    high = (code >> 2).reshape(*code.shape[:-1], 8, 32)
    hmask = high[..., 0, :]
    for j in range(1, 8):
        hmask = hmask | (high[..., j, :] << j)
    s6 = (lvl + 32).to(torch.uint8)
    top = (s6 >> 4).reshape(*s6.shape[:-1], 4, 4)  # [.., s, i]: bits 2s of byte 8 + i
    scales = torch.cat([(s6[..., :8] & 0xF) | ((s6[..., 8:] & 0xF) << 4),
                        top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4)
                        | (top[..., 3, :] << 6)], -1)
    return torch.cat([hmask, _pack_crumbs(code & 3), scales, _f16_bytes(d)], -1)
