"""FP8 (checkpoints, online, device checks) and bitsandbytes NF4 checkpoints on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    load_cpu,
    make_tiny_llama_dir,
    run_one_sequence,
    write_checkpoint_folder,
)
from modelport.quantization.fp8 import FP8Config, fp8_supported
from modelport.quantization.kernels import CpuInt8Kernel
from modelport.quantization.nf4 import NF4_CODE, NF4Config, nf4_encode
from modelport.quantization.tools.writer import is_quantizable, write_checkpoint

_load = load_cpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("f8") / "hf", seed=13)


def _write_variant(tiny: Path, out: Path, encode, config) -> tuple[Path, Path]:  # noqa: ANN001
    """Quantized folder + a float folder holding the reference dequantization."""
    tensors = load_file(str(tiny / "model.safetensors"))
    qt, ref = {}, {}
    for name, w in tensors.items():
        if not is_quantizable(name):
            qt[name] = ref[name] = w
            continue
        pieces, deq = encode(w)
        qt.update({f"{name}{'.' + k if k else ''}": v for k, v in pieces.items()})
        ref[name] = deq
    qdir = write_checkpoint(tiny, out / "q", qt, config, float_dtype=torch.float32)
    rdir = out / "ref"
    rdir.mkdir()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(rdir / "model.safetensors"))
    (rdir / "config.json").write_text((tiny / "config.json").read_text())
    return qdir, rdir


def _fp8_per_tensor(w: torch.Tensor):  # noqa: ANN202
    scale = w.abs().max() / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale.reshape(())}, q.float() * scale


def _assert_cpu_int8_default(qdir: Path, ref: torch.Tensor, fmt: str) -> None:
    """The CPU default for FP8 / NF4: torch's int8 GEMM on the weight rows requantized to
    int8 (bf16 activations), the format's own bytes dropped; logits near the exact path's."""
    model = _load(qdir)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(getattr(qkv, f"{fmt}_int8"), CpuInt8Kernel)
    assert not hasattr(qkv, "fp8_weight" if fmt == "fp8" else "nf4_codes")
    got = run_one_sequence(model, PROMPT)
    assert (got - ref).abs().max().item() < 0.03 * ref.abs().max().item()


def test_fp8_checkpoint_per_tensor_scales(tiny: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoint tensor names are X.weight / X.weight_scale: the encoder returns suffix keys
    def enc(w: torch.Tensor):  # noqa: ANN202
        pieces, deq = _fp8_per_tensor(w)
        return {"": pieces["weight"], "_scale": pieces["weight_scale"]}, deq

    qdir, rdir = _write_variant(tiny, tmp_path, lambda w: enc(w), FP8Config())
    # rename X.weight._scale -> X.weight_scale (the public name)
    t = load_file(str(qdir / "model.safetensors"))
    t = {k.replace(".weight._scale", ".weight_scale"): v for k, v in t.items()}
    save_file(t, str(qdir / "model.safetensors"))
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")  # the FP8 bytes kept, exact
    model = _load(qdir)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.fp8_weight.dtype == torch.float8_e4m3fn
    # q, k and v had different per-tensor scales: fused into one per-channel vector
    assert len(set(qkv.fp8_scale.tolist())) == 3
    ref = run_one_sequence(_load(rdir), PROMPT)
    torch.testing.assert_close(run_one_sequence(model, PROMPT), ref, atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("MODELPORT_FP8_CPU_INT8")
    _assert_cpu_int8_default(qdir, ref, "fp8")


def test_fp8_online_from_float(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")  # the FP8 bytes kept, exact

    def per_channel(w: torch.Tensor):  # noqa: ANN202 - E4M3 with scale = row amax / 448
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        return {}, (w / scale).to(torch.float8_e4m3fn).float() * scale

    _, rdir = _write_variant(tiny, tmp_path, per_channel, FP8Config())
    model = _load(tiny, "fp8")
    layer = model.model.layers[1].mlp.gate_up_proj
    assert layer.fp8_weight.dtype == torch.float8_e4m3fn and "weight" not in layer._parameters
    got = run_one_sequence(model, PROMPT)
    torch.testing.assert_close(got, run_one_sequence(_load(rdir), PROMPT), atol=1e-4, rtol=1e-4)
    original = run_one_sequence(_load(tiny), PROMPT)
    assert (got - original).abs().max().item() < 0.1 * original.abs().max().item()


ATTN = r"re:model\.layers\.\d+\.self_attn\.[qkvo]_proj$"
# the FP8 part of a compressed-tensors config.json, as llm-compressor's FP8 schemes describe it
CT_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
CT_DYNAMIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
              "dynamic": True}
CT_STATIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
             "dynamic": False}


def _ct_config(groups: dict, ignore: list[str], fmt: str = "float-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None}


def test_compressed_tensors_fp8_checkpoint(tiny: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An llm-compressor-style FP8 checkpoint built here from the format's description: the
    attention projections in one group (channel strategy, scales [out, 1] in bf16, dynamic
    per-token activations), the other linear layers in a "Linear" group (tensor strategy,
    scale [1], static per-tensor input_scale), some layers ignored (kept in bf16) by exact
    name and by "re:" regex. Logits match an independent dequantization of the file and stay
    within FP8's error of the float model."""
    ignored = {"model.layers.1.mlp.down_proj", "model.layers.0.mlp.gate_proj",
               "model.layers.0.mlp.up_proj"}
    qc = _ct_config({"group_0": {"targets": [ATTN],
                                 "weights": {**CT_WEIGHTS, "strategy": "channel"},
                                 "input_activations": CT_DYNAMIC},
                     "group_1": {"targets": ["Linear"],
                                 "weights": {**CT_WEIGHTS, "strategy": "tensor"},
                                 "input_activations": CT_STATIC}},
                    ["lm_head", "model.layers.1.mlp.down_proj", r"re:.*layers\.0\.mlp\.(gate|up)_proj$"])
    qt, ref = {}, {}
    for name, w in load_file(str(tiny / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not is_quantizable(name) or module in ignored:
            qt[name] = w.to(torch.bfloat16) if module in ignored else w
            ref[name] = qt[name].float()
            continue
        if ".self_attn." in name:  # channel: amax of each row / 448, stored as bf16 [out, 1]
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
        else:  # tensor: one value, shape [1]
            scale = (w.abs().max() / 448.0).reshape(1)
            qt[f"{module}.input_scale"] = torch.tensor([0.02])
        q = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
        qt[name], qt[f"{module}.weight_scale"] = q, scale
        ref[name] = q.float() * scale.float()  # independent dequantization, broadcast by shape
    qdir = write_checkpoint_folder(tiny, tmp_path / "ct", qt, qc)
    rdir = write_checkpoint_folder(tiny, tmp_path / "ref", ref, None)
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")  # the FP8 bytes kept, exact
    model = _load(qdir)
    layers = model.model.layers
    assert layers[0].self_attn.qkv_proj.fp8_weight.dtype == torch.float8_e4m3fn
    assert layers[1].mlp.gate_up_proj.fp8_weight.dtype == torch.float8_e4m3fn
    for layer in (layers[0].mlp.gate_up_proj, layers[1].mlp.down_proj):  # ignored: float
        assert layer.quant_method is None and layer.weight.dtype == torch.float32
    assert layers[0].mlp.down_proj.quant_method is not None
    want = run_one_sequence(_load(rdir), PROMPT)
    torch.testing.assert_close(run_one_sequence(model, PROMPT), want, atol=1e-4, rtol=1e-4)
    original = run_one_sequence(_load(tiny), PROMPT)
    assert (want - original).abs().max().item() < 0.1 * original.abs().max().item()
    monkeypatch.delenv("MODELPORT_FP8_CPU_INT8")
    _assert_cpu_int8_default(qdir, want, "fp8")
    assert _load(qdir, "fp8") is not None  # quantization="fp8" names the detected method
    with pytest.raises(ValueError, match=r"is a fp8 checkpoint but quantization='awq'"):
        _load(qdir, "awq")
    from modelport.planner.model_source import _hf_quantization

    assert _hf_quantization({"quantization_config": qc}) == "fp8"


def test_compressed_tensors_library_reads_and_writes_the_layout(tiny: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the compressed-tensors package is installed (not a dependency: skipped without
    it; 0.20.0 checked): a checkpoint it compresses (FP8_DYNAMIC, one layer ignored by regex)
    loads here with that layer float, and transformers reads what `quantize --method fp8`
    writes, both within FP8's error of the float model."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    apply_quantization_config(hf, QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        ignore=["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"]))
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "weight_scale"):  # what llm-compressor's observer computes
                m.weight_scale.copy_(m.weight.abs().amax(dim=1, keepdim=True) / 448.0)
    compressor = ModelCompressor.from_pretrained_model(hf, quantization_format="float-quantized")
    compressor.compress_model(hf)
    hf.save_pretrained(str(tmp_path / "lib"))
    compressor.update_config(str(tmp_path / "lib"))
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")
    model = _load(tmp_path / "lib")
    assert model.model.layers[1].mlp.down_proj.quant_method is None
    assert model.model.layers[0].mlp.down_proj.fp8_weight.dtype == torch.float8_e4m3fn
    original = run_one_sequence(_load(tiny), PROMPT)
    got = run_one_sequence(model, PROMPT)
    assert ((got - original).norm() / original.norm()).item() < 0.1  # measured 0.059

    out = quantize_model(str(tiny), tmp_path / "ours", None, QuantizeOptions(method="fp8"),
                         progress=False).output
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert theirs.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        logits = theirs(torch.tensor([PROMPT])).logits[0]
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    assert ((logits - want).norm() / want.norm()).item() < 0.15  # measured 0.069


def test_compressed_tensors_fused_layer_quantized_alike(tiny: Path, tmp_path: Path) -> None:
    """q/k/v load into one fused layer: ignoring only q_proj (the rest FP8) is refused."""
    qc = _ct_config({"group_0": {"targets": ["Linear"],
                                 "weights": {**CT_WEIGHTS, "strategy": "channel"},
                                 "input_activations": CT_DYNAMIC}},
                    ["lm_head", "model.layers.0.self_attn.q_proj"])
    out = write_checkpoint_folder(tiny, tmp_path / "ct", load_file(str(tiny / "model.safetensors")), qc)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj is one fused "
                       r"layer.*q_proj \(float\), .*k_proj \(dynamic\)"):
        _load(out)


@pytest.mark.parametrize("change,match", [
    ({"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                  "symmetric": True, "dynamic": False}, "input_activations": None,
      "format": "nvfp4-pack-quantized"},
     r"'nvfp4-pack-quantized' format.*type='float', num_bits=4.*AWQ or GPTQ"),
    ({"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True,
                  "dynamic": False}, "input_activations": {**CT_DYNAMIC, "type": "int"},
      "format": "int-quantized"}, r"'int-quantized' format"),
    ({"weights": {**CT_WEIGHTS, "strategy": "block", "block_structure": [128, 128]}},
     r"FP8 weights with the 'block' strategy"),
    ({"weights": {**CT_WEIGHTS, "strategy": "group", "group_size": 32}},
     r"FP8 weights with the 'group' strategy"),
    ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     r"sparsity \('sparse-24-bitmask'"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}},
     r"quantized KV cache.*--kv-cache-dtype fp8"),
])
def test_compressed_tensors_other_schemes_refused(tiny: Path, tmp_path: Path, change: dict,
                                                  match: str) -> None:
    """Every compressed-tensors scheme but FP8 and integer weight-only ones
    (test_compressed_tensors_int.py) is refused up front, naming the part and what to use
    instead; the refusal comes before any weight is read (a folder without
    weights gives the same error)."""
    group = {"targets": ["Linear"], "weights": {**CT_WEIGHTS, "strategy": "channel"},
             "input_activations": CT_DYNAMIC}
    top = {k: change[k] for k in ("sparsity_config", "kv_cache_scheme") if k in change}
    fmt = change.get("format", "float-quantized")
    group.update({k: v for k, v in change.items() if k in ("weights", "input_activations")})
    qc = {**_ct_config({"group_0": group}, ["lm_head"], fmt), **top}
    out = write_checkpoint_folder(tiny, tmp_path / "ct", load_file(str(tiny / "model.safetensors")), qc)
    with pytest.raises(ValueError, match=r"compressed-tensors checkpoint: .*" + match) as err:
        _load(out)
    assert "not supported" in str(err.value) and str(out) in str(err.value)
    (out / "model.safetensors").unlink()  # refused from config.json alone
    with pytest.raises(ValueError, match=match):
        _load(out)
    from modelport.planner.model_source import _hf_quantization

    assert _hf_quantization({"quantization_config": qc}) is None


def test_fp8_per_channel_checkpoint_of_earlier_versions(tiny: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What `modelport quantize --method fp8` wrote before it wrote compressed-tensors:
    quant_method "fp8", one float32 scale per output channel of shape [out]; still loaded."""
    def per_channel(w: torch.Tensor):  # noqa: ANN202
        scale = w.abs().amax(dim=1) / 448.0
        q = (w / scale[:, None]).to(torch.float8_e4m3fn)
        return {"": q, "_scale": scale}, q.float() * scale[:, None]

    qdir, rdir = _write_variant(tiny, tmp_path, per_channel, FP8Config())
    t = {k.replace(".weight._scale", ".weight_scale"): v
         for k, v in load_file(str(qdir / "model.safetensors")).items()}
    save_file(t, str(qdir / "model.safetensors"))
    assert json.loads((qdir / "config.json").read_text())["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": "dynamic"}
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (64,)
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")
    got = run_one_sequence(_load(qdir), PROMPT)
    torch.testing.assert_close(got, run_one_sequence(_load(rdir), PROMPT), atol=1e-4, rtol=1e-4)


def test_fp8_device_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fp8_supported((9, 0)) and fp8_supported((8, 9)) and not fp8_supported((8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*this GPU is 8.0.*AWQ/GPTQ"):
        FP8Config().check_device(torch.device("cuda"))


def _ref_nf4(pieces: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """Independent reading of the bnb layout: high nibble first, absmax per 64, nested map."""
    packed = pieces[""].numpy().reshape(-1).astype(np.int64)
    codes = np.empty(packed.size * 2, dtype=np.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    state = json.loads(bytes(pieces["quant_state.bitsandbytes__nf4"].tolist()))
    a = pieces["absmax"].numpy()
    if a.dtype == np.uint8:
        nmap, nabs = pieces["nested_quant_map"].numpy(), pieces["nested_absmax"].numpy()
        a = nmap[a.astype(np.int64)] * np.repeat(nabs, state["nested_blocksize"])[: a.size]
        a = a + state["nested_offset"]
    vals = np.asarray(NF4_CODE, dtype=np.float32)[codes] * np.repeat(a, state["blocksize"])
    return torch.from_numpy(vals.reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_checkpoint_matches_reference(tiny: Path, tmp_path: Path, double_quant: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def enc(w: torch.Tensor):  # noqa: ANN202
        pieces = nf4_encode(w, 64, double_quant)
        return pieces, _ref_nf4(pieces, *w.shape)

    qdir, rdir = _write_variant(tiny, tmp_path, enc, NF4Config(double_quant=double_quant))
    assert json.loads((qdir / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ref = run_one_sequence(_load(rdir), PROMPT)
    # the format itself: 4-bit codes kept, dequantized per call, exact up to float rounding
    monkeypatch.setenv("MODELPORT_NF4_CPU_INT8", "0")
    model = _load(qdir)
    assert model.model.layers[0].self_attn.qkv_proj.nf4_codes.dtype == torch.uint8
    torch.testing.assert_close(run_one_sequence(model, PROMPT), ref, atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("MODELPORT_NF4_CPU_INT8")
    _assert_cpu_int8_default(qdir, ref, "nf4")
    original = run_one_sequence(_load(tiny), PROMPT)
    assert (ref - original).abs().max().item() < 0.3 * original.abs().max().item()  # 4-bit: ~0.2


def test_dummy_weights_in_every_loadable_format(tmp_path: Path) -> None:
    """Benchmarks load a float config with random weights packed in each format."""
    wide = make_tiny_llama_dir(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    assert "quantization_config" not in json.loads((wide / "config.json").read_text())
    for q in ("awq", "gptq", "fp8", "bitsandbytes"):  # default group size 128
        model = _load(wide, q, fmt="dummy")
        logits = run_one_sequence(model, PROMPT[:8])
        assert torch.isfinite(logits).all(), q


def test_nf4_rows_pack_back_to_the_checkpoint_bytes() -> None:
    """The CUDA layout (``triton_nf4.pack_rows`` of the unpacked codes) is the checkpoint's
    own byte order, row by row."""
    from modelport.quantization.nf4 import nf4_unpack
    from modelport.quantization.triton_nf4 import fits, pack_rows

    w = torch.randn(12, 256, generator=torch.Generator().manual_seed(2))
    pieces = nf4_encode(w, 64, False)
    parts = {"weight": pieces[""], "nf4_absmax": pieces["absmax"],
             "nf4_state": pieces["quant_state.bitsandbytes__nf4"]}
    codes, absmax = nf4_unpack(parts, 12, 256)
    assert torch.equal(pack_rows(codes), pieces[""].reshape(12, 128))
    assert absmax.shape == (12, 4)
    assert fits(256, 64) and not fits(256, 48) and not fits(192, 128) and not fits(4096, 4096)


def test_nf4_checkpoint_written_in_fp16_keeps_its_state_in_fp32(tiny: Path, tmp_path: Path) -> None:
    """The writer narrows float tensors to fp16 but not NF4's absmax / code books (the loader
    checks the code book against NF4's exact values)."""
    tensors = load_file(str(tiny / "model.safetensors"))
    qt = {}
    for name, w in tensors.items():
        pieces = nf4_encode(w, 64, True) if is_quantizable(name) else {"": w}
        qt.update({f"{name}{'.' + k if k else ''}": v for k, v in pieces.items()})
    qdir = write_checkpoint(tiny, tmp_path / "q", qt, NF4Config(double_quant=True))
    stored = load_file(str(qdir / "model.safetensors"))
    name = next(n for n in stored if n.endswith(".quant_map"))
    assert stored[name].dtype == torch.float32
    assert stored[name.replace(".quant_map", ".nested_absmax")].dtype == torch.float32
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.isfinite(run_one_sequence(_load(qdir), PROMPT)).all()
