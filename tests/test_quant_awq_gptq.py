"""AWQ and GPTQ loaders on checkpoints built here in the public layouts.

Each checkpoint's weights are dequantized by a reference written in this file straight from
the layout descriptions (numpy bit twiddling, no code shared with the loader); the quantized
model must match a float model holding those reference weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import load_cpu, make_tiny_llama_dir, run_one_sequence
from modelport.quantization import kernels
from modelport.quantization.awq import AWQConfig, pack_awq, pack_awq_gemv
from modelport.quantization.gptq import GPTQConfig, pack_gptq
from modelport.quantization.tools.rtn import rtn_quantize
from modelport.quantization.tools.writer import is_quantizable, write_checkpoint


# -- independent reference dequantization (from the published layouts) ------------------
def _u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).astype(np.int64)


def ref_dequant_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group: int) -> np.ndarray:
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column 8c + order[i]
    def unpack(words: np.ndarray) -> np.ndarray:
        out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
        for i in range(8):
            out[:, order[i]::8] = (words >> (4 * i)) & 15
        return out
    q, z, s = unpack(_u32(qweight)), unpack(_u32(qzeros)), scales.float().numpy()
    rows = np.arange(q.shape[0]) // group
    return ((q - z[rows]) * s[rows]).T.astype(np.float32)


def ref_dequant_awq_gemv(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         group: int) -> np.ndarray:
    """AutoAWQ's GEMV layout: rows are outputs, nibble i of word c is input 8c + i; zeros
    packed the same way and scales both padded past the K / group real groups."""
    def unpack(words: np.ndarray) -> np.ndarray:
        out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
        for i in range(8):
            out[:, i::8] = (words >> (4 * i)) & 15
        return out
    q = unpack(_u32(qweight))  # [N, K]
    groups = q.shape[1] // group
    z, s = unpack(_u32(qzeros))[:, :groups], scales.float().numpy()[:, :groups]
    cols = np.arange(q.shape[1]) // group
    return ((q - z[:, cols]) * s[:, cols]).astype(np.float32)


def ref_dequant_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, bits: int) -> np.ndarray:
    per, mask = 32 // bits, (1 << bits) - 1
    qw, qz = _u32(qweight), _u32(qzeros)
    q = np.zeros((qw.shape[0] * per, qw.shape[1]), dtype=np.int64)
    z = np.zeros((qz.shape[0], qz.shape[1] * per), dtype=np.int64)
    for i in range(per):
        q[i::per, :] = (qw >> (bits * i)) & mask
        z[:, i::per] = (((qz >> (bits * i)) & mask) + 1) & mask  # stored as zero - 1
    g = g_idx.numpy().astype(np.int64)
    return ((q - z[g]) * scales.float().numpy()[g]).T.astype(np.float32)


# -- building checkpoints ------------------------------------------------------------------
def quantize_folder(src: Path, out: Path, method: str, bits: int = 4, group: int = 32,
                    sym: bool = False, act_order: bool = False, seed: int = 0,
                    quantizable: Callable[[str], bool] = is_quantizable) -> tuple[Path, Path]:
    """RTN-quantize every linear weight into `method`'s layout; also write the reference
    float folder (weights = reference dequantization of what was written)."""
    tensors = load_file(str(src / "model.safetensors"))
    qt: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not quantizable(name):
            qt[name] = ref[name] = w
            continue
        prefix = name.removesuffix(".weight")
        k = w.shape[1]
        # fused shards (q/k/v, gate/up; Mixtral's expert w1/w3) see the same input, hence
        # the same act-order
        shared = prefix.replace("k_proj", "q_proj").replace("v_proj", "q_proj")
        shared = shared.replace("up_proj", "gate_proj").replace(".w3", ".w1")
        gen = torch.Generator().manual_seed(seed + sum(map(ord, shared)))
        perm = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
        codes_p, zeros, scales = rtn_quantize(w[:, perm], bits, group, sym)
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // group
        if method == "awq":
            packed = pack_awq(codes, zeros, scales)
            deq = ref_dequant_awq(packed["qweight"], packed["qzeros"], packed["scales"], group)
        elif method == "awq-gemv":
            packed = pack_awq_gemv(codes, zeros, scales, group)
            deq = ref_dequant_awq_gemv(packed["qweight"], packed["qzeros"], packed["scales"],
                                       group)
        else:
            packed = pack_gptq(codes, zeros, scales, bits, g_idx=g_idx)
            deq = ref_dequant_gptq(packed["qweight"], packed["qzeros"], packed["scales"],
                                   packed["g_idx"], bits)
        qt.update({f"{prefix}.{k2}": v for k2, v in packed.items()})
        ref[name] = torch.from_numpy(deq)
    cfg = (AWQConfig(bits=bits, group_size=group) if method == "awq"
           else AWQConfig(bits=bits, group_size=group, version="gemv") if method == "awq-gemv"
           else GPTQConfig(bits=bits, group_size=group, desc_act=act_order, sym=sym))
    qdir = write_checkpoint(src, out / method, qt, cfg, float_dtype=torch.float32)
    rdir = out / f"{method}-ref"
    rdir.mkdir()
    save_file({k2: v.contiguous() for k2, v in ref.items()}, str(rdir / "model.safetensors"))
    (rdir / "config.json").write_text((src / "config.json").read_text())
    return qdir, rdir


_load = load_cpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("aq") / "hf", seed=7)


CASES = [
    ("awq", 4, 32, False, False),
    ("awq-gemv", 4, 32, False, False),  # AutoAWQ's "version": "gemv" (zeros / scales padded)
    ("awq-gemv", 4, 64, False, False),
    ("gptq", 4, 32, True, False),
    ("gptq", 4, 64, False, True),
    ("gptq", 8, 32, True, True),
]


@pytest.mark.parametrize("method,bits,group,sym,act_order", CASES)
def test_loader_matches_reference_dequantization(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    method: str, bits: int, group: int, sym: bool, act_order: bool,
) -> None:
    qdir, rdir = quantize_folder(tiny, tmp_path, method, bits, group, sym, act_order)
    qc = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == method.removesuffix("-gemv")
    assert qc.get("version", "gemm") == ("gemv" if method == "awq-gemv" else "gemm")
    ref = run_one_sequence(_load(rdir), PROMPT)
    # the format itself (reference dequant kernel): exact up to float rounding
    monkeypatch.setattr(kernels, "cpu_int4_fits", lambda gq: False)
    monkeypatch.setattr(kernels, "cpu_int8_fits", lambda gq: False)
    torch.testing.assert_close(run_one_sequence(_load(qdir), PROMPT), ref, atol=2e-4, rtol=1e-4)
    monkeypatch.undo()
    # the fast kernel the loader picks (int4 CPU GEMM for 4-bit, int8 for 8-bit and for
    # act-order groups, bf16 activations)
    model = _load(qdir)
    kinds = {type(m.qkernel) for m in model.modules() if hasattr(m, "qkernel")}
    assert kinds == ({kernels.CpuInt4Kernel} if bits == 4 else {kernels.CpuInt8Kernel})
    got = run_one_sequence(model, PROMPT)
    assert (got - ref).abs().max().item() < 0.03 * ref.abs().max().item()


def test_8bit_greedy_tokens_match_the_float_model(tiny: Path, tmp_path: Path) -> None:
    qdir, _ = quantize_folder(tiny, tmp_path, "gptq", bits=8, group=32)
    float_model, q_model = _load(tiny), _load(qdir)
    ids_f, ids_q = list(PROMPT[:8]), list(PROMPT[:8])
    for _ in range(5):  # a random tiny model has near-ties later on
        ids_f.append(int(run_one_sequence(float_model, ids_f)[-1].argmax()))
        ids_q.append(int(run_one_sequence(q_model, ids_q)[-1].argmax()))
    assert ids_q == ids_f
    # wherever the float model's top-1 leads by more than twice the 8-bit error, argmax agrees
    lf, lq = run_one_sequence(float_model, PROMPT), run_one_sequence(q_model, PROMPT)
    err = (lf - lq).abs().max().item()
    assert err < 0.03 * lf.abs().max().item()
    top2 = lf.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert clear.sum() > len(PROMPT) // 2
    assert torch.equal(lf.argmax(-1)[clear], lq.argmax(-1)[clear])


def _set_qc(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_checkpoints_give_clear_errors(tiny: Path, tmp_path: Path) -> None:
    qdir, _ = quantize_folder(tiny, tmp_path, "gptq", bits=4, group=32)
    _set_qc(qdir, group_size=64)
    with pytest.raises(ValueError, match="shape mismatch.*group size"):
        _load(qdir)
    _set_qc(qdir, group_size=32, bits=3)
    with pytest.raises(ValueError, match="unsupported bit width 3"):
        _load(qdir)
    _set_qc(qdir, bits=4)
    _load(qdir)  # repaired config loads
    with pytest.raises(ValueError, match="is a gptq checkpoint but quantization='awq'"):
        _load(qdir, "awq")
    with pytest.raises(ValueError, match="not a awq checkpoint"):
        _load(tiny, "awq")
    weights = qdir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        _load(qdir)


def test_awq_layouts_other_than_gemm_and_gemv_are_refused(tiny: Path, tmp_path: Path) -> None:
    qdir, _ = quantize_folder(tiny, tmp_path, "awq")
    _set_qc(qdir, version="exllama")
    with pytest.raises(ValueError, match="AWQ version 'exllama' is not supported.*gemm, gemv"):
        _load(qdir)
    _set_qc(qdir, version="gemv")  # a GEMM checkpoint labelled GEMV: its shapes do not fit
    with pytest.raises(ValueError, match="shape mismatch for qweight"):
        _load(qdir)
    gdir, _ = quantize_folder(tiny, tmp_path / "g", "awq-gemv")
    _set_qc(gdir, group_size=16)
    with pytest.raises(ValueError, match="group_size 16 is not one AutoAWQ writes"):
        _load(gdir)


def test_pack_gptq_without_g_idx_takes_contiguous_groups() -> None:
    """No g_idx and no group_size: the groups are K / G contiguous inputs (G = the scales'
    column count), not one group for all inputs (a bug that made a 4-bit checkpoint's
    perplexity 3.7e6 in bench/quant_quality.py)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    codes, zeros, scales = rtn_quantize(w, 4, 16, True)
    packed = pack_gptq(codes, zeros, scales, 4)
    assert packed["g_idx"].tolist() == [i // 16 for i in range(64)]
    deq = ref_dequant_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert (torch.from_numpy(deq) - w).abs().max() < scales.max() * 0.51 + 1e-3


@pytest.mark.parametrize("bits,group,act_order", [(8, 32, False), (6, 16, False), (5, 32, True),
                                                  (4, 16, False), (4, 16, True)])
def test_cpu_int8_kernel_against_the_reference_dequantization(
    bits: int, group: int, act_order: bool
) -> None:
    """CpuInt8Kernel (torch's int8 weight-only GEMM up to 16 rows, the int8 weight expanded to
    bf16 above) computes x @ W^T for W requantized per row, whose error against the format's
    own weight is at most half a step of the row's int8 scale."""
    n, k = 48, 128
    gen = torch.Generator().manual_seed(bits * 100 + group)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    gq = kernels.GroupQuant(
        torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8),
        torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3,
        -torch.rand(n, k // group, generator=gen) * 0.1, group, bits,
        g_idx=g_idx if act_order else None)
    kern = kernels.make_kernel(gq, torch.device("cpu"))
    assert isinstance(kern, kernels.CpuInt8Kernel)
    w = gq.dequantize()
    w8 = kern.qweight.float() * kern.scale.float()[:, None]
    step = w.abs().amax(1) / 127
    assert ((w8 - w).abs() <= step[:, None] * 0.5 + w.abs().amax(1, keepdim=True) * 2**-8).all()
    for m in (1, 16, 17, 64):  # both branches of the kernel
        x = torch.randn(m, k, generator=gen)
        want = x.to(torch.bfloat16).float() @ w8.t()
        got = kern(x)
        assert got.dtype == x.dtype and got.shape == (m, n)
        torch.testing.assert_close(got, want, atol=1e-2 * want.abs().max().item(), rtol=0)
        ref = x @ w.t()
        assert (got - ref).abs().max() < 2e-2 * ref.abs().max(), m
