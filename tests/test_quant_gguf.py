"""GGUF kept quantized: our block unpacking vs gguf-py's reference, and whole tiny models."""

from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import modelport.quantization.loading as quant_loading
from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    load_cpu,
    make_tiny_llama_dir,
    make_tiny_llama_gguf,
    run_one_sequence,
)
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.quantization.gguf_formats import unpack
from modelport.quantization.gguf_types import GGML_CODES, GGML_TYPES
from modelport.quantization.kernels import (
    CPU_INT4_GROUPS,
    CpuInt4Kernel,
    CpuInt8Kernel,
    CpuQ8Kernel,
    make_kernel,
)

# where each format keeps its float16 scale fields (byte offsets inside a block)
_F16_FIELDS = {"Q4_0": (0,), "Q8_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2),
               "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def _random_blocks(name: str, per_block: int, nbytes: int, n: int, k: int) -> np.ndarray:
    """Random but valid blocks: random codes, finite positive float16 scales."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # not hash(): salted per process
    raw = rng.integers(0, 256, (n, k // per_block, nbytes), dtype=np.uint8)
    for off in _F16_FIELDS[name]:
        f16 = rng.uniform(0.005, 0.05, (n, k // per_block)).astype(np.float16)
        raw[..., off : off + 2] = f16.view(np.uint8).reshape(n, k // per_block, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("type_id", sorted(GGML_TYPES), ids=[v[0] for _, v in sorted(GGML_TYPES.items())])
def test_unpack_matches_gguf_reference_dequantize(type_id: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name, per_block, nbytes = GGML_TYPES[type_id]
    n, k = 16, 512
    raw = _random_blocks(name, per_block, nbytes, n, k)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id)).astype(np.float32)
    gq = unpack(torch.from_numpy(raw), type_id, k)
    torch.testing.assert_close(gq.dequantize(), torch.from_numpy(ref), atol=0, rtol=0)
    # the torch-free table the planner sizes kernels by: random codes fill exactly those bits
    assert (gq.bits, gq.group_size) == GGML_CODES[name]
    assert int(gq.codes.max()) == 2**gq.bits - 1 and gq.scales.shape[1] == k // gq.group_size
    # and the kernel that will run it agrees with the reference on activations: Q8_0 on its
    # block scales by default, on the row requantization with MODELPORT_Q8_CPU=rows; Q2_K /
    # Q3_K's groups of 16 (which torch's int4 GEMM refuses) on the row requantization too
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(type_id))
    y_ref = x @ torch.from_numpy(ref).t()
    int4 = gq.bits <= 4 and gq.group_size in CPU_INT4_GROUPS
    expect = [CpuInt4Kernel if int4 else CpuInt8Kernel]
    if name == "Q8_0":
        expect = [CpuQ8Kernel, CpuInt8Kernel]
    for i, cls in enumerate(expect):
        if i:
            monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")
        kern = make_kernel(gq, torch.device("cpu"))
        assert type(kern) is cls
        # bf16 activations in the int4 / int8 kernels (int8 adds a per-row requantization of
        # the weight), x quantized per block of 32 to int8 in the Q8_0 block kernel
        tol = 2e-2 * y_ref.abs().max().item()
        torch.testing.assert_close(kern(x), y_ref, atol=tol, rtol=0)


def test_truncated_row_is_a_clear_error() -> None:
    raw = torch.zeros(4, 20 * 2 - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="truncated or mismatched"):
        unpack(raw, 3, 64)
    with pytest.raises(ValueError, match="cannot be kept quantized"):
        unpack(torch.zeros(4, 18 * 8, dtype=torch.uint8), 20, 256)  # IQ4_NL


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("qg") / "hf", seed=5)


_load = load_cpu


def _assert_int4_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Logits of the kept model vs the float path: the same weights, bf16 activations in
    torch's int4 kernel (or its int8 one, which also requantizes each weight row)."""
    assert (got - ref).abs().max().item() < 0.03 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def _linear_kernels(model: torch.nn.Module) -> list[type]:
    return [type(m.qkernel) for m in model.modules() if hasattr(m, "qkernel")]


@pytest.mark.parametrize("qtype,q8_cpu,kernel", [
    ("Q4_1", None, CpuInt4Kernel), ("Q4_0", None, CpuInt4Kernel), ("Q8_0", None, CpuQ8Kernel),
    ("Q8_0", "rows", CpuInt8Kernel), ("Q5_1", None, CpuInt8Kernel)])
def test_kept_quantized_matches_dequantized_path(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str,
    q8_cpu: str | None, kernel: type
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    if q8_cpu is not None:  # Q8_0 on the row requantization (CpuInt8Kernel), as before
        monkeypatch.setenv("MODELPORT_Q8_CPU", q8_cpu)
    # the linear layers alone: the bf16 LM head of the kept path has its own test below
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ref = run_one_sequence(_load(path, "none"), PROMPT)
    model = _load(path, "gguf")
    kinds = _linear_kernels(model)
    assert len(kinds) == 2 * 4 and set(kinds) == {kernel}  # qkv, o, gate_up, down per layer
    for m in model.modules():
        if getattr(m, "quant_method", None) is not None:
            assert "weight" not in m._parameters  # no float copy of the weight was kept
    _assert_int4_close(run_one_sequence(model, PROMPT), ref)


def test_kept_path_on_cpu_narrows_the_fp32_lm_head_to_bf16(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    wide = _load(path, "none")
    model = _load(path, "gguf")
    assert wide.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # lookups stay exact
    torch.testing.assert_close(model.lm_head.weight.float(), wide.lm_head.weight,
                               atol=0, rtol=2**-8)  # fmt: skip
    hidden = torch.randn(5, wide.config.hidden_size)
    ref = wide.compute_logits(hidden)
    got = model.compute_logits(hidden)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)
    assert _load(path, "gguf").lm_head.weight.dtype == torch.float32


def test_mixed_types_in_one_fused_layer(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q4_K_M-style file: attn_v in 8-bit while q/k are 4-bit, fused into one qkv matmul."""
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-mixed.gguf", "Q4_1", {"attn_v.weight": "Q8_0"})
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors if "attn_v" in t.name} == {"Q8_0"}
    ref = run_one_sequence(_load(path, "none"), PROMPT)
    model = _load(path, "gguf")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.gguf_types == ("Q4_1", "Q4_1", "Q8_0")
    assert isinstance(qkv.qkernel, CpuInt8Kernel)  # 8-bit codes: no int4 kernel for this one
    got = run_one_sequence(model, PROMPT)
    assert (got - ref).abs().max().item() < 0.03 * ref.abs().max().item()  # o/mlp run int4
    # the fused layer itself against the dequantized model's q/k/v projection: within the
    # int8 kernel's per-row requantization and bf16 activations
    dense = _load(path, "none").model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, dense.input_size)
    y = dense(x)
    torch.testing.assert_close(qkv(x), y, atol=1e-2 * y.abs().max().item(), rtol=0)


def test_float_gguf_with_gguf_quantization_is_a_clear_error(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-f32.gguf", "F32")
    with pytest.raises(ValueError, match="no linear layer of the model could be quantized"):
        _load(path, "gguf")
    with pytest.raises(ValueError, match="GGUF file: use --quantization gguf"):
        _load(path, "awq")


def test_truncated_gguf_file_is_a_clear_error(tiny_hf: Path, tmp_path: Path) -> None:
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-q4.gguf", "Q4_1")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        src = resolve_model(str(cut))
        load_model(src, load_model_config(src), LoadConfig(quantization="gguf"), torch.float32,
                   torch.device("cpu"))


def test_kept_path_reads_a_cached_tensor_table_instead_of_reparsing(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import gguf as gguf_py

    from modelport.loader import gguf as loader_gguf

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    first = run_one_sequence(_load(path, "gguf"), PROMPT)  # parses once, writes the table
    assert list((tmp_path / "cache" / loader_gguf.TENSOR_TABLE_KIND).glob("*/tensors.json"))

    def no_parse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the GGUF metadata was parsed again")

    loader_gguf._cached_reader.cache_clear()
    monkeypatch.setattr(gguf_py, "GGUFReader", no_parse)
    again = run_one_sequence(_load(path, "gguf"), PROMPT)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    # a changed file is a new cache key: it is parsed again, not served from the old table
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="parsed again"):  # open_gguf wraps parse failures
        _load(path, "gguf")


@pytest.mark.parametrize("qtype,cpu,kernels", [
    ("Q4_1", "AVX512", {CpuInt4Kernel}), ("Q4_0", "AVX2", {CpuInt4Kernel}),  # torch's int4 GEMM
    ("Q8_0", "AVX512", {CpuQ8Kernel}),  # its blocks in the C block-scale kernel
    ("Q5_1", "AVX2", {CpuInt8Kernel}),  # torch's int8 GEMM
    ("Q4_1", "DEFAULT", set()),  # no AVX2 (e.g. an ARM laptop): floats, as before
    ("F32", "AVX512", set()),
])
def test_gguf_without_quantization_keeps_its_blocks_on_an_avx2_cpu(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, cpu: str,
    kernels: set[type],
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    model = _load(path, None)
    assert set(_linear_kernels(model)) == kernels
    floats = _load(path, "none")  # explicit: always the float path
    assert _linear_kernels(floats) == []
    assert model.lm_head.weight.dtype == torch.float32  # untied: the default keeps it fp32
    if kernels:
        _assert_int4_close(run_one_sequence(model, PROMPT), run_one_sequence(floats, PROMPT))


def test_gguf_with_mixed_types_is_kept_by_default_in_every_cpu_kernel(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q4_1 (int4) with a Q8_0 ffn_down (the Q8_0 block kernel) and a Q5_1 attn_v (its fused
    q/k/v in torch's int8 GEMM) is kept by default."""
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-mixed-down.gguf", "Q4_1",
                                {"ffn_down.weight": "Q8_0", "attn_v.weight": "Q5_1"})
    model = _load(path, None)
    down = model.model.layers[0].mlp.down_proj
    assert down.gguf_types == ("Q8_0",) and isinstance(down.qkernel, CpuQ8Kernel)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.qkernel, CpuInt8Kernel)
    assert set(_linear_kernels(model)) == {CpuInt4Kernel, CpuInt8Kernel, CpuQ8Kernel}
    _assert_int4_close(run_one_sequence(model, PROMPT), run_one_sequence(_load(path, "none"), PROMPT))
    # a float linear weight anywhere: the float path
    path = make_tiny_llama_gguf(tiny_hf, tmp_path / "tiny-f16-down.gguf", "Q4_1",
                                {"ffn_down.weight": "F16"})
    assert _linear_kernels(_load(path, None)) == []


def test_quantization_none_on_a_quantized_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(hf_config={"quantization_config": {"quant_method": "awq"}})
    src = SimpleNamespace(path=tmp_path / "awq-model", kind="hf")
    with pytest.raises(ValueError, match="awq checkpoint: quantization='none' only loads a GGUF"):
        quant_loading.resolve_quantization("none", src, cfg, "cpu")  # type: ignore[arg-type]


def test_tied_bf16_head_refines_each_rows_top_logits_from_the_fp32_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelport.layers.embedding import REFINE_TOPK

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    hf = make_tiny_llama_dir(tmp_path / "tied", seed=7, tie_word_embeddings=True)
    path = make_tiny_llama_gguf(hf, tmp_path / "tied-Q4_1.gguf", "Q4_1")
    for q in (None, "gguf"):  # the default narrows a tied head too
        model = _load(path, q)
        head, table = model.lm_head, model.model.embed_tokens.weight
        assert head.weight.dtype == torch.bfloat16 and table.dtype == torch.float32
        hidden = torch.randn(6, table.shape[1]) * 3
        got = model.compute_logits(hidden)
        wide = hidden @ table.t()  # what the fp32 head computes
        narrow = (hidden.to(torch.bfloat16) @ head.weight.t()).float()  # the bf16 matmul alone
        top = narrow.topk(REFINE_TOPK, dim=-1).indices  # the rows' entries it refines
        torch.testing.assert_close(got.gather(1, top), wide.gather(1, top), atol=1e-5, rtol=1e-5)
        assert torch.equal(got.argmax(-1), wide.argmax(-1))
        rest = torch.ones_like(got, dtype=torch.bool).scatter_(1, top, False)
        assert ((got - wide)[rest].abs().max() < 0.02 * wide.abs().max())  # bf16 elsewhere
        assert 0 < (got - wide)[rest].abs().max()  # ... really read from the bf16 copy


# the packer's round-to-nearest error on Gaussian weights, relative (L2), per type
_PACK_ERR = {"Q8_0": 0.01, "Q4_0": 0.12, "Q4_K": 0.12, "Q3_K": 0.2, "Q2_K": 0.4}


@pytest.mark.parametrize("name", list(_PACK_ERR))
def test_pack_round_trips_through_the_gguf_reference(name: str) -> None:
    """The dummy-weight packer writes blocks gguf-py's own dequantizer reads back close to the
    float weight (RTN error of the type), and our unpacking reads them the same way."""
    from modelport.quantization.gguf_formats import PACK_TYPES, pack

    t = PACK_TYPES[name]
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(t)) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0, codes decode to 0
    raw = pack(w, t)
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(t)).astype(np.float32)
    ref = torch.from_numpy(ref).reshape(6, 512)
    err = ((ref - w).norm() / w.norm()).item()
    assert err < _PACK_ERR[name], err
    assert torch.equal(ref[0, :32], torch.zeros(32))
    torch.testing.assert_close(unpack(raw, t, 512).dequantize(), ref, atol=1e-6, rtol=1e-5)


def test_dummy_gguf_weights_for_a_float_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks: --load-format dummy --quantization gguf packs random weights in one type
    (a float config, or a GGUF file whose own types then give way)."""
    wide = make_tiny_llama_dir(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    for name in ("Q4_K", "Q8_0"):
        monkeypatch.setenv("MODELPORT_DUMMY_GGUF_TYPE", name)
        model = load_cpu(wide, "gguf", fmt="dummy")
        layer = model.model.layers[0].mlp.gate_up_proj
        assert layer.gguf_types == (name,)
        assert torch.isfinite(run_one_sequence(model, PROMPT[:8])).all()
    gguf_file = make_tiny_llama_gguf(wide, tmp_path / "wide.gguf", "Q8_0")
    monkeypatch.setenv("MODELPORT_DUMMY_GGUF_TYPE", "Q4_K")
    model = load_cpu(gguf_file, "gguf", fmt="dummy")  # the file's Q8_0 gives way to Q4_K
    assert model.model.layers[0].self_attn.qkv_proj.gguf_types == ("Q4_K",)
    monkeypatch.setenv("MODELPORT_DUMMY_GGUF_TYPE", "Q6_K")
    with pytest.raises(ValueError, match="Q4_0, Q8_0, Q4_K"):
        load_cpu(wide, "gguf", fmt="dummy")
    with pytest.raises(ValueError, match="needs a .gguf file"):
        load_cpu(wide, "gguf")
