"""GGUF Q2_K / Q3_K kept quantized (Q2_K, Q3_K_S / _M / _L files).

The block layouts three ways: blocks written field by field as llama.cpp's quantizer packs
them, read back by our unpacking, by gguf-py's ``gguf.quants.dequantize`` (the independent
reference) and by a transliteration of llama.cpp's ``dequantize_row_q2_K`` / ``_q3_K`` loops.
Then tiny models whose linear layers hold those types, the planner's bytes for such files and
mixes, and (GPU machine) the Triton kernels on their 16-wide groups.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import modelport.quantization.kernels as quant_kernels
from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    load_cpu,
    make_tiny_llama_dir,
    make_tiny_llama_gguf,
    run_one_sequence,
)
from modelport.quantization.gguf import concat_group_quants
from modelport.quantization.gguf_formats import PACK_TYPES, pack, unpack
from modelport.quantization.gguf_types import GGML_TYPES, kept_on_cpu_by_default
from modelport.quantization.kernels import (
    CpuInt4Kernel,
    CpuInt8Kernel,
    DequantKernel,
    GroupQuant,
    make_kernel,
)
from test_planner_files import _held_bytes

Q2_K, Q3_K, Q4_K = 10, 11, 12


def _rng(tag: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(tag.encode()))  # not hash(): salted per process


def _f16(x: float) -> list[int]:
    return list(np.float16(x).tobytes())


# -- blocks written as llama.cpp's quantize_row_q2_K_ref / q3_K_ref lay them out ------------
def _write_q2_k(d: float, dmin: float, sc: np.ndarray, mn: np.ndarray, q: np.ndarray) -> bytes:
    """One block: 4-bit scales sc[16] and mins mn[16], 2-bit values q[256]."""
    scales = [int(sc[j]) | (int(mn[j]) << 4) for j in range(16)]
    qs = [0] * 64
    for j in range(0, 256, 128):
        for lane in range(32):
            qs[j // 4 + lane] = (int(q[j + lane]) | (int(q[j + lane + 32]) << 2)
                                 | (int(q[j + lane + 64]) << 4) | (int(q[j + lane + 96]) << 6))
    return bytes(scales + qs + _f16(d) + _f16(dmin))


def _write_q3_k(d: float, lvl: np.ndarray, q: np.ndarray) -> bytes:
    """One block: 6-bit scales lvl[16] (stored, i.e. signed scale + 32), q[256] in 0..7 (the
    signed value + 4)."""
    scales = [0] * 12
    for j in range(16):
        v = int(lvl[j])
        if j < 8:
            scales[j] = v & 0xF
        else:
            scales[j - 8] |= (v & 0xF) << 4
        scales[j % 4 + 8] |= (v >> 4) << (2 * (j // 4))
    hmask, low = [0] * 32, [int(x) for x in q]
    m, hm = 0, 1
    for j in range(256):
        if low[j] > 3:
            hmask[m] |= hm
            low[j] -= 4
        m += 1
        if m == 32:
            m, hm = 0, hm << 1
    qs = [0] * 64
    for j in range(0, 256, 128):
        for lane in range(32):
            qs[j // 4 + lane] = (low[j + lane] | (low[j + lane + 32] << 2)
                                 | (low[j + lane + 64] << 4) | (low[j + lane + 96] << 6))
    return bytes(hmask + qs + scales + _f16(d))


# -- llama.cpp's dequantize_row_q2_K / q3_K, element by element in float32 -------------------
def _llama_cpp_q2_k(raw: np.ndarray) -> np.ndarray:
    f32 = np.float32
    out = []
    for blk in raw.reshape(-1, 84):
        scales, qs = blk[0:16], blk[16:80]
        d, dmin = f32(blk[80:82].view(np.float16)[0]), f32(blk[82:84].view(np.float16)[0])
        y, i_s = [], 0
        for n in (0, 1):
            q = qs[32 * n : 32 * n + 32]
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    sc = int(scales[i_s])
                    i_s += 1
                    dl, ml = d * f32(sc & 0xF), dmin * f32(sc >> 4)
                    y += [dl * f32((int(q[half + i]) >> shift) & 3) - ml for i in range(16)]
        out.append(y)
    return np.array(out, dtype=np.float32)


def _llama_cpp_q3_k(raw: np.ndarray) -> np.ndarray:
    f32, k1, k2 = np.float32, 0x03030303, 0x0F0F0F0F
    out = []
    for blk in raw.reshape(-1, 110):
        hm, qs = blk[0:32], blk[32:96]
        d = f32(blk[108:110].view(np.float16)[0])
        a0, a1, tmp = (int(v) for v in np.frombuffer(blk[96:108].tobytes(), "<u4"))
        aux = [(a0 & k2) | ((tmp & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4),
               ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
               ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
        scales = np.array(aux, dtype="<u4").view(np.int8)
        y, i_s, m = [], 0, 1
        for n in (0, 1):
            q = qs[32 * n : 32 * n + 32]
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    dl = d * f32(int(scales[i_s]) - 32)
                    i_s += 1
                    y += [dl * f32(((int(q[half + i]) >> shift) & 3)
                                   - (0 if int(hm[half + i]) & m else 4)) for i in range(16)]
                m <<= 1
        out.append(y)
    return np.array(out, dtype=np.float32)


def _chosen_blocks(type_id: int, n: int, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Blocks of chosen fields (per row, per block) and the fields, for an [n, k] weight."""
    rng = _rng(f"fields-{type_id}")
    nb = k // 256
    f = {"d": rng.uniform(0.002, 0.05, (n, nb)).astype(np.float16),
         "dmin": rng.uniform(0.002, 0.05, (n, nb)).astype(np.float16),
         "q": rng.integers(0, 4 if type_id == Q2_K else 8, (n, nb, 256)),
         "sc": rng.integers(0, 16 if type_id == Q2_K else 64, (n, nb, 16)),
         "mn": rng.integers(0, 16, (n, nb, 16))}
    rows = []
    for r in range(n):
        row = b""
        for b in range(nb):
            if type_id == Q2_K:
                row += _write_q2_k(f["d"][r, b], f["dmin"][r, b], f["sc"][r, b], f["mn"][r, b],
                                   f["q"][r, b])
            else:
                row += _write_q3_k(f["d"][r, b], f["sc"][r, b], f["q"][r, b])
        rows.append(np.frombuffer(row, dtype=np.uint8))
    return np.stack(rows), f


@pytest.mark.parametrize("type_id", [Q2_K, Q3_K], ids=["Q2_K", "Q3_K"])
def test_blocks_from_the_published_layout_unpack_to_their_fields(type_id: int) -> None:
    n, k = 4, 512
    raw, f = _chosen_blocks(type_id, n, k)
    gq = unpack(torch.from_numpy(raw), type_id, k)
    assert (gq.bits, gq.group_size) == ((2, 16) if type_id == Q2_K else (3, 16))
    # the codes are the written values; one scale and zero per 16 weights
    assert torch.equal(gq.codes, torch.from_numpy(f["q"].reshape(n, k)).to(torch.uint8))
    d = torch.from_numpy(f["d"].astype(np.float32))[..., None]
    sc = torch.from_numpy(f["sc"]).float()
    if type_id == Q2_K:
        dmin = torch.from_numpy(f["dmin"].astype(np.float32))[..., None]
        scale, zero = d * sc, -dmin * torch.from_numpy(f["mn"]).float()
    else:  # signed scale (stored - 32), signed value (code - 4)
        scale = d * (sc - 32)
        zero = -4 * scale
    torch.testing.assert_close(gq.scales, scale.reshape(n, -1), atol=0, rtol=0)
    torch.testing.assert_close(gq.zeros, zero.reshape(n, -1), atol=0, rtol=0)
    # and the three readers of those bytes agree to the bit
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id)).astype(np.float32)
    loops = (_llama_cpp_q2_k if type_id == Q2_K else _llama_cpp_q3_k)(raw).reshape(n, k)
    np.testing.assert_array_equal(ref, loops)
    torch.testing.assert_close(gq.dequantize(), torch.from_numpy(ref), atol=0, rtol=0)


@pytest.mark.parametrize("type_id", [Q2_K, Q3_K], ids=["Q2_K", "Q3_K"])
def test_random_bytes_agree_with_llama_cpp_loops(type_id: int) -> None:
    """Arbitrary bytes (all 8 bits of every field used), finite fp16 d / dmin."""
    name, per_block, nbytes = GGML_TYPES[type_id]
    n, k = 3, 512
    rng = _rng(f"bytes-{name}")
    raw = rng.integers(0, 256, (n, k // per_block, nbytes), dtype=np.uint8)
    for off in ((80, 82) if type_id == Q2_K else (108,)):
        d = rng.uniform(-0.05, 0.05, (n, k // per_block)).astype(np.float16)  # negative d too
        raw[..., off : off + 2] = d.view(np.uint8).reshape(n, k // per_block, 2)
    raw = raw.reshape(n, -1)
    loops = (_llama_cpp_q2_k if type_id == Q2_K else _llama_cpp_q3_k)(raw).reshape(n, k)
    got = unpack(torch.from_numpy(raw), type_id, k).dequantize()
    torch.testing.assert_close(got, torch.from_numpy(loops), atol=0, rtol=0)


def test_fused_q3_k_with_q4_k_splits_groups_to_16() -> None:
    """A Q3_K_M qkv: Q3_K q/k beside a Q4_K v runs as one GroupQuant of 4-bit codes in groups
    of 16, which the CPU int4 GEMM refuses: torch's int8 GEMM (rows requantized)."""
    w = torch.randn(3, 64, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    parts = [unpack(pack(w[0], Q3_K), Q3_K, 512), unpack(pack(w[1], Q3_K), Q3_K, 512),
             unpack(pack(w[2], Q4_K), Q4_K, 512)]
    gq = concat_group_quants(parts)
    assert (gq.bits, gq.group_size) == (4, 16)
    torch.testing.assert_close(gq.dequantize(), torch.cat([p.dequantize() for p in parts]),
                               atol=0, rtol=0)
    kern = make_kernel(gq, torch.device("cpu"))
    assert isinstance(kern, CpuInt8Kernel)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    y = x @ gq.dequantize().t()
    torch.testing.assert_close(kern(x), y, atol=2e-2 * y.abs().max().item(), rtol=0)


# -- tiny models ---------------------------------------------------------------------------
@contextmanager
def _k_quant_writer() -> Iterator[None]:
    """gguf-py has no K-quant quantizer: blocks from modelport's packer, whose bytes gguf-py's
    own dequantizer reads back (test_quant_gguf.py::test_pack_round_trips...)."""
    real = gguf.quants.quantize

    def quantize(t: np.ndarray, q: gguf.GGMLQuantizationType) -> np.ndarray:
        if q.name in PACK_TYPES:
            return pack(torch.from_numpy(np.ascontiguousarray(t)), int(q)).numpy()
        return real(t, q)

    gguf.quants.quantize = quantize
    try:
        yield
    finally:
        gguf.quants.quantize = real


# llama.cpp's mixes for a dense model (src/llama-quant.cpp), as overrides of the base type
MIXES = {
    "Q3_K": ("Q3_K", {}),  # Q3_K_S
    "Q2_K": ("Q2_K", {}),
    "Q3_K_M": ("Q3_K", {"attn_v.weight": "Q4_K", "attn_output.weight": "Q4_K",
                        "ffn_down.weight": "Q4_K"}),
    "Q2_K_mix": ("Q2_K", {"attn_v.weight": "Q4_K", "attn_output.weight": "Q3_K",
                          "ffn_down.weight": "Q3_K"}),
}


@pytest.fixture(scope="module")
def tiny_k(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q23")
    # rows of 256 and 512 inputs: whole K-quant super-blocks (4 / 2 heads of 64)
    hf = make_tiny_llama_dir(root / "hf", seed=7, hidden_size=256, intermediate_size=512)
    with _k_quant_writer():
        return {mix: make_tiny_llama_gguf(hf, root / f"tiny-{mix}.gguf", base, over)
                for mix, (base, over) in MIXES.items()}


def _kernels(model: torch.nn.Module) -> dict[str, type]:
    return {name: type(m.qkernel) for name, m in model.named_modules() if hasattr(m, "qkernel")}


_EXPECT = {  # layer -> kernel, per mix
    "Q3_K": dict.fromkeys(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), CpuInt8Kernel),
    "Q2_K": dict.fromkeys(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), CpuInt8Kernel),
    # the Q4_K o_proj and down_proj alone in the int4 GEMM; the fused qkv (Q3_K beside Q4_K,
    # groups of 16) and gate_up in the int8 one
    "Q3_K_M": {"qkv_proj": CpuInt8Kernel, "o_proj": CpuInt4Kernel,
               "gate_up_proj": CpuInt8Kernel, "down_proj": CpuInt4Kernel},
    "Q2_K_mix": dict.fromkeys(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                              CpuInt8Kernel),
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_tiny_model_keeps_q2_k_q3_k_blocks_by_default(
    tiny_k: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mix: str
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    path = tiny_k[mix]
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2}
    base, over = MIXES[mix]
    assert types == {base, *over.values()}
    floats = load_cpu(path, "none")
    assert not _kernels(floats)
    ref = run_one_sequence(floats, PROMPT)
    model = load_cpu(path, None)  # no flag: kept on an x86 CPU, as the engine does
    kernels = _kernels(model)
    assert len(kernels) == 2 * 4
    for name, cls in kernels.items():
        assert cls is _EXPECT[mix][name.rsplit(".", 1)[1]], name
    for m in model.modules():
        if getattr(m, "quant_method", None) is not None:
            assert "weight" not in m._parameters  # no float copy of the weight was kept
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.gguf_types == (base, base, over.get("attn_v.weight", base))
    # the int8 GEMM (rows requantized to 8 bits, bf16 activations) against the float path:
    # 2.1-2.5 % relative (RMS), at most 3 % of the largest logit, as a Q5_1 or Q8_0 file of
    # this model gives on the same kernel (2.7 %, 2.9-3.1 %)
    got = run_one_sequence(model, PROMPT)
    assert ((got - ref).norm() / ref.norm()).item() < 0.04
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # the kept weights themselves are exactly the float path's: on the reference kernel
    # (dequantize per call, fp32) only the sums' order differs
    monkeypatch.setattr(quant_kernels, "make_kernel", lambda gq, device, **kw: DequantKernel(gq))
    monkeypatch.setattr("modelport.quantization.loading.NARROW_CPU_LM_HEAD", False)
    exact = load_cpu(path, "gguf")
    assert set(_kernels(exact).values()) == {DequantKernel}
    torch.testing.assert_close(run_one_sequence(exact, PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_kept_by_default_with_q2_k_q3_k_types() -> None:
    assert kept_on_cpu_by_default(["Q3_K", "Q4_K", "Q5_K", "Q6_K"])  # a Q3_K_M file
    assert kept_on_cpu_by_default(["Q2_K", "Q3_K", "Q4_K"])  # a Q2_K file
    assert not kept_on_cpu_by_default(["Q3_K", "IQ4_NL"])  # 576-wide rows fall back to IQ4_NL
    assert not kept_on_cpu_by_default(["IQ3_S", "Q4_K"])


# -- the planner ---------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["Q3_K_M", "Q2_K_mix"])
def test_planner_counts_the_kernels_bytes_of_a_q2_k_q3_k_file(
    tiny_k: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mix: str
) -> None:
    from modelport.planner.gguf_mix import kept_bytes
    from modelport.planner.hardware import resolve_device
    from modelport.planner.model_source import resolve_model
    from modelport.planner.plan import PlanRequest, make_plan
    from modelport.quantization.triton_gemm import TritonKernel

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    path = tiny_k[mix]
    src = resolve_model(str(path))
    assert src.gguf_cpu_keepable
    plan = make_plan(PlanRequest(src, resolve_device("cpu", memory_gib=8), max_model_len=256,
                                 max_num_seqs=4))
    assert plan.request.keeps_quantized
    model = load_cpu(path, None)
    kernels = [m.qkernel for m in model.modules() if hasattr(m, "qkernel")]
    linear = sum(_held_bytes(k) for k in kernels)
    assert kept_bytes(src.gguf_linear, on_cpu=True) == linear
    assert plan.resident_per_gpu == _held_bytes(model)  # the whole plan, to the byte
    # on CUDA: the Triton kernels' 4-bit codes with an fp16 scale and zero per 16 (their
    # buffers built here on the CPU, where no kernel launches)
    monkeypatch.setattr(quant_kernels, "make_kernel",
                        lambda gq, device, **kw: TritonKernel(gq, torch.device("cpu")))
    triton = [m.qkernel for m in load_cpu(path, "gguf").modules() if hasattr(m, "qkernel")]
    assert {type(k) for k in triton} == {TritonKernel}
    # 16 where a Q2_K / Q3_K part is (a Q3_K_M file's Q4_K o_proj / ffn_down alone: 32)
    assert {k.group for k in triton} == ({16, 32} if mix == "Q3_K_M" else {16})
    assert kept_bytes(src.gguf_linear, on_cpu=False) == sum(_held_bytes(k) for k in triton)


# published sizes (GB) of Meta-Llama-3.1-8B-Instruct GGUF files made by llama.cpp's quantizer,
# and the tensor mix llama.cpp reports when it loads each
_LLAMA_8B = {
    "q2_k": (3.18, {"F32": 65, "Q2_K": 129, "Q3_K": 64, "Q4_K": 32, "Q6_K": 1}),
    "q3_k_s": (3.66, {"F32": 65, "Q3_K": 225, "Q6_K": 1}),
    "q3_k_m": (4.02, {"F32": 65, "Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1}),
    "q3_k_l": (4.32, {"F32": 65, "Q3_K": 129, "Q5_K": 96, "Q6_K": 1}),
}


@pytest.mark.parametrize("file_type", list(_LLAMA_8B))
def test_low_bit_mix_estimate_matches_published_llama_8b_files(file_type: str) -> None:
    from modelport.config import ModelConfig
    from modelport.planner.presets import find_model_preset
    from modelport.planner.weights import WeightFormat, estimate_weights

    cfg = ModelConfig.from_hf_dict(find_model_preset("llama-3.1-8b")[1])
    w = estimate_weights(cfg, WeightFormat("bf16", f"gguf-{file_type}"))
    size, storage = _LLAMA_8B[file_type]
    assert w.total_bytes / (size * 1e9) == pytest.approx(1.0, abs=0.01)
    assert w.storage == storage


def test_low_bit_mix_rows_not_of_256_fall_back_to_iq4_nl() -> None:
    from modelport.planner.gguf_mix import tensor_type
    from modelport.planner.tensors import COLUMN, TensorSpec

    t = TensorSpec("blk.3.attn_q.weight", "linear", (576, 576), COLUMN, 3)  # SmolLM2's width
    assert tensor_type(t, "q3_k_m", 30, True).name == "IQ4_NL"
    t = TensorSpec("blk.3.attn_v.weight", "linear", (192, 1024), COLUMN, 3)
    assert tensor_type(t, "q2_k", 30, True, n_gqa=3).name == "Q3_K"
    assert tensor_type(t, "q2_k", 30, True, n_gqa=4).name == "Q4_K"


# -- CUDA (GPU machine: -m gpu) ------------------------------------------------------------
def _random_gq(type_id: int, n: int, k: int, seed: int) -> GroupQuant:
    name, per_block, nbytes = GGML_TYPES[type_id]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // per_block, nbytes), dtype=np.uint8)
    offs = {Q2_K: (80, 82), Q3_K: (108,), Q4_K: (0, 2)}[type_id]
    for off in offs:
        d = rng.uniform(0.002, 0.02, (n, k // per_block)).astype(np.float16)
        raw[..., off : off + 2] = d.view(np.uint8).reshape(n, k // per_block, 2)
    return unpack(torch.from_numpy(raw.reshape(n, -1)), type_id, k)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["Q2_K", "Q3_K", "Q3_K+Q4_K"])
def test_triton_kernels_run_q2_k_q3_k_against_the_reference(case: str) -> None:
    """The W4 Triton GEMV / GEMM / dequant paths on Q2_K / Q3_K codes (2 / 3 bits held as
    4-bit codes, groups of 16), and a fused Q3_K + Q4_K qkv, against x @ the reference
    dequantization, bf16 and fp16 activations."""
    from modelport.quantization.triton_gemm import TritonKernel, fits

    for i, (n, k, m) in enumerate([(256, 512, 1), (384, 1024, 3), (512, 768, 7), (256, 512, 64),
                                   (640, 1024, 300)]):
        if case == "Q3_K+Q4_K":
            gq = concat_group_quants([_random_gq(Q3_K, n // 2, k, i), _random_gq(Q4_K, n // 2, k, i)])
        else:
            gq = _random_gq(Q2_K if case == "Q2_K" else Q3_K, n, k, i)
        assert gq.group_size == 16 and fits(gq)
        kern = make_kernel(gq, torch.device("cuda"))
        assert type(kern) is TritonKernel
        w = gq.dequantize().cuda()
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to("cuda", dtype)
            ref = x.float() @ w.t()
            got = kern(x).float()
            torch.testing.assert_close(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
