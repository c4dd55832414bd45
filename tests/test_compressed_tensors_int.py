"""compressed-tensors integer weight-only checkpoints (llm-compressor's W4A16 / W8A16,
"pack-quantized") on tiny Llamas built here from the format's published description.

The writer below follows that description, not modelport's code: per linear module
``weight_packed`` (int32 [out, ceil(in / p)], p = 32 / bits codes a word along the input,
first code in the lowest bits, each code the signed value + 2**(bits - 1)), ``weight_scale``
([out, in / group] or [out, 1]), ``weight_shape`` ([out, in]), asymmetric ``weight_zero_point``
(the same offset codes packed along the output rows) and act-order ``weight_g_idx``. The
reference is an independent dequantization, (q - zero) * scale, saved as a float checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    greedy_token_ids,
    load_cpu,
    make_tiny_llama_dir,
    run_one_sequence,
    write_checkpoint_folder,
)
from modelport.quantization.kernels import CpuInt4Kernel, CpuInt8Kernel
from modelport.quantization.tools.writer import is_quantizable

KW = {"kv_cache_memory": 16 << 20, "max_model_len": 256, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("cti") / "hf", seed=21)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes -> int32 words along ``dim`` (zero-padded to whole words), value j of a
    word at bits [j * bits, (j + 1) * bits)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, 1)
    pad = -v.shape[1] % per
    v = torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1)
    words = torch.zeros(v.shape[0], v.shape[1] // per, dtype=torch.int64)
    for j in range(per):
        words |= v[:, j::per] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, signed
    return words.to(torch.int32).movedim(1, dim).contiguous()


def quantize(w: torch.Tensor, bits: int, group: int | None, sym: bool,
             g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest in compressed-tensors' signed range [-2**(b-1), 2**(b-1) - 1]:
    {q (signed), scale [N, G] (bf16), zero (signed, asym only), ref (float dequantized)}."""
    n, k = w.shape
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if g_idx is None:
        g_idx = torch.arange(k) // (group or k)
    groups = int(g_idx.max()) + 1
    scale = torch.empty(n, groups)
    zero = torch.zeros(n, groups)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scale[:, g] = cols.abs().amax(dim=1) / hi
        else:
            mn, mx = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scale[:, g] = (mx - mn) / (hi - lo)
            zero[:, g] = (lo - torch.round(mn / scale[:, g])).clamp(lo, hi)
    scale = scale.clamp(min=1e-8).to(torch.bfloat16)
    s, z = scale.float()[:, g_idx], zero[:, g_idx]
    q = (torch.round(w / s) + z).clamp(lo, hi)
    out = {"q": q.to(torch.int64), "scale": scale, "ref": (q - z) * s}
    if not sym:
        out["zero"] = zero.to(torch.int64)
    return out


def int_args(bits: int, strategy: str, group: int | None = None, sym: bool = True,
             actorder: str | None = None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
            "group_size": group, "dynamic": False, "actorder": actorder, "observer": "minmax",
            "observer_kwargs": {}}


def ct_config(groups: dict, ignore: list[str], fmt: str = "pack-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
            "version": "0.10.2"}


def group(args: dict, targets: list[str] | None = None) -> dict:
    return {"targets": targets or ["Linear"], "weights": args, "input_activations": None,
            "output_activations": None, "format": None}


def write_int_checkpoint(tiny: Path, out: Path, qc: dict, scheme, seed: int = 0  # noqa: ANN001
                         ) -> tuple[Path, Path]:
    """(pack-quantized folder, float folder of its reference dequantization). ``scheme(module)``
    gives a module's (bits, group or None, symmetric, act-order) or None to keep it float."""
    gen = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    qt, ref = {}, {}
    for name, w in load_file(str(tiny / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        how = scheme(module) if is_quantizable(name) else None
        if how is None:
            qt[name] = ref[name] = w
            continue
        bits, grp, sym, actorder = how
        offset = 1 << (bits - 1)
        g_idx = None
        if actorder:  # groups of the columns in a (random) activation order, the same for
            # modules of one input (q/k/v, gate/up), as GPTQ orders them by the same Hessian
            key = re.sub(r"\.(q|k|v)_proj$|\.(gate|up)_proj$", lambda x: "." + str(x.lastindex), module)
            perm = perms.setdefault(key, torch.randperm(w.shape[1], generator=gen))
            g_idx = torch.empty(w.shape[1], dtype=torch.int64)
            g_idx[perm] = torch.arange(w.shape[1]) // grp
        r = quantize(w.float(), bits, grp, sym, g_idx)
        qt[f"{module}.weight_packed"] = pack(r["q"] + offset, bits, dim=1)
        qt[f"{module}.weight_scale"] = r["scale"]
        qt[f"{module}.weight_shape"] = torch.tensor(list(w.shape))
        if not sym:
            qt[f"{module}.weight_zero_point"] = pack(r["zero"] + offset, bits, dim=0)
        if g_idx is not None:
            qt[f"{module}.weight_g_idx"] = g_idx.to(torch.int32)
        ref[name] = r["ref"]
    return write_checkpoint_folder(tiny, out / "q", qt, qc), write_checkpoint_folder(tiny, out / "ref", ref, None)


def load_exact(path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """The model with every integer layer on the float32 dequantizing kernel: its logits are
    the converted weights' own, to compare exactly with the reference."""
    from modelport.quantization import kernels

    with monkeypatch.context() as m:
        m.setattr(kernels, "make_kernel", lambda gq, device, **kw: kernels.DequantKernel(gq))
        return load_cpu(path)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_pack_matches_the_published_example() -> None:
    """compressed-tensors' docstring example: 8-bit values [1, 2] (+128 -> 129, 130) pack to
    one int32 33409 (padding zeros above)."""
    assert pack(torch.tensor([[1, 2]]) + 128, 8, dim=1).tolist() == [[33409]]


def test_w4a16_group_symmetric(tiny: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """W4A16 (group 32, symmetric, every linear layer but lm_head): the CPU int4 kernel runs
    it; logits match the independent dequantization up to its bf16 activations and stay
    within 4-bit error of the float model."""
    qc = ct_config({"group_0": group(int_args(4, "group", 32))}, ["lm_head"])
    qdir, rdir = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (4, 32, True, False))
    model = load_cpu(qdir)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.qkernel, CpuInt4Kernel)
    assert not hasattr(layer, "weight_packed") and not hasattr(layer, "weight")
    got = run_one_sequence(model, PROMPT)
    want = run_one_sequence(load_cpu(rdir), PROMPT)
    torch.testing.assert_close(run_one_sequence(load_exact(qdir, monkeypatch), PROMPT), want,
                               atol=1e-4, rtol=1e-4)
    assert rel_err(got, want) < 0.02  # the int4 kernel's bf16 activations
    original = run_one_sequence(load_cpu(tiny), PROMPT)
    assert rel_err(want, original) < 0.25  # 4-bit error


def test_w4a16_asymmetric_act_order_and_targets(tiny: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Asymmetric 4-bit (zero points packed along the output rows) with act-order g_idx for
    the attention projections (a "re:" target), symmetric group 64 for the rest (a class-name
    target), layer 1's MLP ignored (float in the file): each layer gets its own scheme, and
    the logits match the reference dequantization."""
    attn = r"re:model\.layers\.\d+\.self_attn\.[qkvo]_proj$"
    qc = ct_config({"group_0": group(int_args(4, "group", 32, sym=False, actorder="group"), [attn]),
                    "group_1": group(int_args(4, "group", 64), ["QuantLinear"])},
                   ["lm_head", r"re:model\.layers\.1\.mlp\..*"])

    def scheme(m: str):  # noqa: ANN202
        if ".self_attn." in m:
            return (4, 32, False, True)
        return None if m.startswith("model.layers.1.mlp.") else (4, 64, True, False)

    qdir, rdir = write_int_checkpoint(tiny, tmp_path, qc, scheme)
    model = load_cpu(qdir)
    layers = model.model.layers
    assert layers[0].self_attn.qkv_proj.qkernel.perm is not None  # act-order columns gathered
    assert layers[1].mlp.gate_up_proj.quant_method is None
    assert layers[0].mlp.down_proj.quant_method is not None
    got = run_one_sequence(model, PROMPT)
    want = run_one_sequence(load_cpu(rdir), PROMPT)
    torch.testing.assert_close(run_one_sequence(load_exact(qdir, monkeypatch), PROMPT), want,
                               atol=1e-4, rtol=1e-4)
    assert rel_err(got, want) < 0.02
    assert rel_err(want, run_one_sequence(load_cpu(tiny), PROMPT)) < 0.25


@pytest.mark.parametrize("sym", [True, False])
def test_w8a16_channel_greedy_equals_the_float_model(tiny: Path, tmp_path: Path, sym: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A16 with one scale per output channel ([out, 1]), symmetric and asymmetric, through
    LLM(...): the same first greedy tokens as the float model, logits close to the
    reference; quantization="compressed-tensors" names the checkpoint's own config."""
    from modelport import LLM

    qc = ct_config({"group_0": group(int_args(8, "channel", sym=sym))}, ["lm_head"])
    qdir, rdir = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (8, None, sym, False))
    model = load_cpu(qdir)
    assert isinstance(model.model.layers[0].mlp.down_proj.qkernel, CpuInt8Kernel)
    got = run_one_sequence(model, PROMPT)
    want = run_one_sequence(load_cpu(rdir), PROMPT)
    torch.testing.assert_close(run_one_sequence(load_exact(qdir, monkeypatch), PROMPT), want,
                               atol=1e-4, rtol=1e-4)
    original = run_one_sequence(load_cpu(tiny), PROMPT)
    assert rel_err(want, original) < 0.02  # 8-bit per channel: measured 0.013 / 0.011
    # the CPU int8 GEMM (bf16 activations; asymmetric rows requantized symmetric): 0.015 / 0.021
    assert rel_err(got, original) < 0.03
    prompts = [PROMPT[:20], PROMPT[30:45]]
    want = greedy_token_ids(LLM(model=str(tiny), **KW), prompts, 8)
    assert greedy_token_ids(LLM(model=str(qdir), **KW), prompts, 8) == want
    alias = LLM(model=str(qdir), quantization="compressed-tensors", **KW)
    assert greedy_token_ids(alias, prompts, 8) == want


def test_quantization_names(tiny: Path, tmp_path: Path) -> None:
    """quantization="compressed-tensors" on a checkpoint without such a config, or another
    method on a compressed-tensors one: refused naming what to do."""
    qc = ct_config({"group_0": group(int_args(4, "group", 32))}, ["lm_head"])
    qdir, _ = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (4, 32, True, False))
    with pytest.raises(ValueError, match=r"no compressed-tensors quantization_config.*drop "
                       r"--quantization"):
        load_cpu(tiny, "compressed-tensors")
    with pytest.raises(ValueError, match=r"is a compressed-tensors checkpoint but "
                       r"quantization='gptq'"):
        load_cpu(qdir, "gptq")
    assert load_cpu(qdir, "compressed_tensors") is not None


@pytest.mark.parametrize("change,match", [
    ({"input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                            "dynamic": True}, "format": "int-quantized"},
     r"activation quantization with integer weights \(W8A8: int 8-bit activations in the "
     r"'int-quantized' format.* is not supported .*W4A16 / W8A16"),
    ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     r"sparsity \('sparse-24-bitmask'"),
    ({"weights": int_args(3, "group", 32)}, r"3-bit integer weights.*4- or 8-bit weights"),
    ({"weights": {**int_args(4, "block"), "block_structure": [32, 32]}},
     r"integer weights with the 'block' strategy"),
    ({"weights": {**int_args(4, "group", 32), "dynamic": True}}, r"dynamic weight quantization"),
    ({"format": "marlin-24"}, r"integer weights in the 'marlin-24' format"),
    ({"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
      "format": "nvfp4-pack-quantized"}, r"'nvfp4-pack-quantized' format"),
])
def test_unsupported_schemes_refused_before_loading(tiny: Path, tmp_path: Path, change: dict,
                                                     match: str) -> None:
    """Each unsupported part is named with the alternative, from config.json alone."""
    g = group(int_args(8, "channel"))
    g.update({k: v for k, v in change.items() if k in ("weights", "input_activations")})
    qc = ct_config({"group_0": g}, ["lm_head"], change.get("format", "pack-quantized"))
    if "sparsity_config" in change:
        qc["sparsity_config"] = change["sparsity_config"]
    out = write_checkpoint_folder(tiny, tmp_path / "ct", {}, qc)  # no weights: refused before reading any
    with pytest.raises(ValueError, match=r"compressed-tensors checkpoint: .*" + match) as err:
        load_cpu(out)
    msg = str(err.value)
    assert "not supported" in msg and str(out) in msg and "AWQ or GPTQ" in msg


def test_missing_or_truncated_tensors(tiny: Path, tmp_path: Path) -> None:
    """A module without its weight_scale, a weight_packed cut short, a wrong weight_shape, a
    missing zero point: each a clear error naming the tensor."""
    qc = ct_config({"group_0": group(int_args(4, "group", 32))}, ["lm_head"])
    qdir, _ = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (4, 32, True, False))
    tensors = load_file(str(qdir / "model.safetensors"))
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]

    def variant(name: str, edit, qc: dict = cfg) -> Path:  # noqa: ANN001
        t = dict(tensors)
        edit(t)
        return write_checkpoint_folder(tiny, tmp_path / name, t, qc)

    k = "model.layers.0.self_attn.k_proj"
    bad = variant("noscale", lambda t: t.pop(f"{k}.weight_scale"))
    with pytest.raises(ValueError, match=r"missing weights for model\.layers\.0\.self_attn\."
                       r"qkv_proj\.weight_scale"):
        load_cpu(bad)
    bad = variant("short", lambda t: t.update({f"{k}.weight_packed": t[f"{k}.weight_packed"][:, :4]}))
    with pytest.raises(ValueError, match=r"shape mismatch for weight_packed shard 'k'.*\(32, 4\)"):
        load_cpu(bad)
    bad = variant("shape", lambda t: t.update({f"{k}.weight_shape": torch.tensor([32, 128])}))
    with pytest.raises(ValueError, match=r"weight_shape \(shard 'k'\): checkpoint says \[32, 128\]"):
        load_cpu(bad)
    asym = json.loads(json.dumps(cfg))
    asym["config_groups"]["group_0"]["weights"]["symmetric"] = False
    bad = variant("nozero", lambda t: None, asym)
    with pytest.raises(ValueError, match=r"missing weights for .*weight_zero_point"):
        load_cpu(bad)


def test_fp8_targets_by_class_name_and_mixed_groups(tiny: Path, tmp_path: Path) -> None:
    """FP8 groups target layers by a class name ending in "Linear" too; a config mixing an
    FP8 group (attention) with a W8A16 group (MLP) loads each layer on its own path."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
           "dynamic": False}
    dyn = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
           "dynamic": True}
    qt, ref = {}, {}
    for name, w in load_file(str(tiny / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not is_quantizable(name):
            qt[name] = ref[name] = w
            continue
        if ".self_attn." in name:
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
            q = (w / scale.float()).to(torch.float8_e4m3fn)
            qt[name], qt[f"{module}.weight_scale"] = q, scale
            ref[name] = q.float() * scale.float()
        else:
            r = quantize(w, 8, None, True)
            qt[f"{module}.weight_packed"] = pack(r["q"] + 128, 8, dim=1)
            qt[f"{module}.weight_scale"] = r["scale"]
            qt[f"{module}.weight_shape"] = torch.tensor(list(w.shape))
            ref[name] = r["ref"]
    only_fp8 = ct_config({"group_0": {"targets": ["LlamaLinear"], "weights": fp8,
                                      "input_activations": dyn}},
                         ["lm_head", r"re:.*mlp\..*"], "float-quantized")
    fp8_dir = write_checkpoint_folder(tiny, tmp_path / "fp8", {k: v for k, v in qt.items()
                                                    if ".mlp." not in k or "weight_" not in k}
                           | {k: v for k, v in ref.items() if ".mlp." in k}, only_fp8)
    for name in (None, "compressed-tensors"):  # the alias names an FP8 checkpoint's own too
        model = load_cpu(fp8_dir, name)
        assert model.model.layers[0].self_attn.qkv_proj.quant_method is not None
        assert model.model.layers[0].mlp.down_proj.quant_method is None
    mixed = ct_config({"group_0": {"targets": [r"re:.*self_attn\..*"], "weights": fp8,
                                   "input_activations": dyn, "format": "float-quantized"},
                       "group_1": {**group(int_args(8, "channel")), "format": "pack-quantized"}},
                      ["lm_head"], "mixed-precision")
    qdir = write_checkpoint_folder(tiny, tmp_path / "mixed", qt, mixed)
    rdir = write_checkpoint_folder(tiny, tmp_path / "ref", ref, None)
    model = load_cpu(qdir)
    assert hasattr(model.model.layers[0].mlp.gate_up_proj, "qkernel")
    got = run_one_sequence(model, PROMPT)
    assert rel_err(got, run_one_sequence(load_cpu(rdir), PROMPT)) < 0.03


def test_planner_sizes_the_checkpoint(tiny: Path, tmp_path: Path) -> None:
    """`modelport plan` detects a W4A16 checkpoint and uses its measured bytes."""
    from modelport.planner.hardware import resolve_device
    from modelport.planner.model_source import resolve_model
    from modelport.planner.plan import PlanRequest, make_plan
    from modelport.planner.weights import WeightFormat, estimate_weights

    qc = ct_config({"group_0": group(int_args(4, "group", 32))}, ["lm_head"])
    qdir, _ = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (4, 32, True, False))
    src = resolve_model(str(qdir))
    assert (src.quantization, src.group_size) == ("w4a16", 32)
    cfg = resolve_model(str(tiny)).config
    predicted = estimate_weights(cfg, WeightFormat("float32", "w4a16", group_size=32))
    assert predicted.total_bytes == src.weight_bytes  # every packed word, scale and shape
    plan = make_plan(PlanRequest(src, resolve_device("l4"), max_num_seqs=4))
    assert plan.request.effective_quantization == "w4a16"
    assert plan.weights.total_bytes == src.weight_bytes
    dense = make_plan(PlanRequest(resolve_model(str(tiny)), resolve_device("l4"), max_num_seqs=4))
    assert plan.resident_per_gpu < dense.resident_per_gpu  # the float embedding dominates
    qc8 = ct_config({"group_0": group(int_args(8, "channel", sym=False))}, ["lm_head"])
    q8, _ = write_int_checkpoint(tiny, tmp_path / "w8", qc8, lambda m: (8, None, False, False))
    src8 = resolve_model(str(q8))
    assert (src8.quantization, src8.group_size) == ("w8a16", -1)
    plan8 = make_plan(PlanRequest(src8, resolve_device("l4"), max_num_seqs=4))
    assert plan8.weights.total_bytes == src8.weight_bytes
    assert plan.resident_per_gpu < plan8.resident_per_gpu < dense.resident_per_gpu


def test_moe_experts_and_dummy_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen3-MoE W4A16 checkpoint (experts quantized per expert, the router ignored): each
    expert becomes its own integer layer, the logits are the reference dequantization's. And
    load_format="dummy" packs random weights in a config's own layout (benchmarks)."""
    from helpers.tiny_moe import make_tiny_moe_dir

    moe = make_tiny_moe_dir(tmp_path / "hf", "qwen3_moe", moe_intermediate_size=64)
    qc = ct_config({"group_0": group(int_args(4, "group", 32, sym=False))},
                   ["lm_head", r"re:.*mlp\.gate$"])
    qdir, rdir = write_int_checkpoint(moe, tmp_path, qc, lambda m: (4, 32, False, False))
    got = run_one_sequence(load_exact(qdir, monkeypatch), PROMPT)
    torch.testing.assert_close(got, run_one_sequence(load_cpu(rdir), PROMPT), atol=1e-4, rtol=1e-4)
    assert rel_err(run_one_sequence(load_cpu(qdir), PROMPT), got) < 0.02
    for args in (int_args(4, "group", 32, sym=False, actorder="group"), int_args(8, "channel")):
        qc = ct_config({"group_0": group(args)}, ["lm_head"])
        out = write_checkpoint_folder(moe, tmp_path / f"dummy{args['num_bits']}", {}, qc)
        model = load_cpu(out, fmt="dummy")
        assert model.model.layers[0].self_attn.qkv_proj.quant_method is not None
        assert torch.isfinite(run_one_sequence(model, PROMPT[:8])).all()


def _cuda_greedy(path: Path, **kw: object) -> tuple[list, object]:
    """First greedy tokens (with top-5 logprobs) of three prompts on CUDA in bf16, CUDA graphs
    on, and the loaded model."""
    from modelport import LLM, SamplingParams

    llm = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3,
              max_model_len=256, **kw)
    prompts = [PROMPT[:23], [5, 9, 200], PROMPT[30:41]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    model = llm.llm_engine.core.runner.model
    return [o.outputs[0] for o in outs], model


def _same_up_to_near_ties(got: list, want: list, tie: float = 0.02) -> None:
    """Greedy tokens equal to the reference's, except from a position where the reference's
    top two are within ``tie`` nats (tiny random models have such near-ties), where the
    token picked must be the reference's runner-up."""
    for g, w in zip(got, want, strict=True):
        for i, (x, y) in enumerate(zip(g.token_ids, w.token_ids)):
            if x != y:
                lp = w.logprobs[i]
                assert x in lp and lp[y].logprob - lp[x].logprob < tie, (i, g, w)
                break


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["w4-group-sym", "w4-group-asym-actorder", "w8-channel-asym"])
def test_cuda_dense(tiny: Path, tmp_path: Path, how: str) -> None:
    """On CUDA the converted weights run the integer kernels (Triton where the groups are
    uniform): the same greedy tokens as their reference dequantization in bf16."""
    import torch

    bits = 8 if how.startswith("w8") else 4
    grp = None if "channel" in how else 32
    sym, actorder = "asym" not in how, "actorder" in how
    args = int_args(bits, "channel" if grp is None else "group", grp, sym,
                    "group" if actorder else None)
    qc = ct_config({"group_0": group(args)}, ["lm_head"])
    qdir, rdir = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (bits, grp, sym, actorder))
    for f in tiny.iterdir():
        if not (rdir / f.name).exists():
            shutil.copy(f, rdir / f.name)
    got, model = _cuda_greedy(qdir)
    kernel = model.model.layers[0].mlp.down_proj.qkernel
    assert next(kernel.buffers()).device.type == "cuda", type(kernel)
    want, _ = _cuda_greedy(rdir)
    _same_up_to_near_ties(got, want)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_cuda_moe_experts_restacked(tmp_path: Path) -> None:
    """A Qwen3-MoE W4A16 checkpoint on CUDA: the experts restacked for the grouped kernels
    (CUDA graphs), the same greedy tokens as the reference dequantization."""
    from helpers.tiny_moe import make_tiny_moe_dir
    from modelport.layers.fused_moe import FusedMoE

    moe = make_tiny_moe_dir(tmp_path / "hf", "qwen3_moe", moe_intermediate_size=64)
    qc = ct_config({"group_0": group(int_args(4, "group", 32, sym=False))},
                   ["lm_head", r"re:.*mlp\.gate$"])
    qdir, rdir = write_int_checkpoint(moe, tmp_path, qc, lambda m: (4, 32, False, False))
    for f in moe.iterdir():
        if not (rdir / f.name).exists():
            shutil.copy(f, rdir / f.name)
    got, model = _cuda_greedy(qdir)
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moes and all(m.quant_experts is not None for m in moes)
    want, _ = _cuda_greedy(rdir)
    _same_up_to_near_ties(got, want)


@pytest.mark.parametrize("how", ["w4-asym-actorder", "w8-channel"])
def test_tensor_parallel_shards_reassemble(tiny: Path, tmp_path: Path, how: str) -> None:
    """Each tensor-parallel rank's slice (loaded whole, cut in its canonical form before the
    kernel is built) computes its part of the full layer: column-parallel outputs concatenate,
    row-parallel partial products sum."""
    import functools

    from modelport.config import LoadConfig
    from modelport.loader import load_model, load_model_config, resolve_model
    from modelport.parallel.tensor_parallel import shard_model

    bits, grp, sym, actorder = (4, 32, False, True) if how.startswith("w4") else (8, None, True, False)
    args = int_args(bits, "group" if grp else "channel", grp, sym, "group" if actorder else None)
    qdir, _ = write_int_checkpoint(tiny, tmp_path, ct_config({"group_0": group(args)}, ["lm_head"]),
                                   lambda m: (bits, grp, sym, actorder))
    src = resolve_model(str(qdir))

    def load(rank: int | None) -> torch.nn.Module:
        shard = None if rank is None else functools.partial(shard_model, rank=rank, size=2)
        return load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                          torch.device("cpu"), transform=shard)

    full, parts = load(None), [load(r) for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(5, 64, generator=gen), torch.randn(5, 128, generator=gen)
    ref, layers = full.model.layers[1], [p.model.layers[1] for p in parts]
    gu = torch.cat([m.mlp.gate_up_proj(x).chunk(2, -1)[0] for m in layers], -1)
    torch.testing.assert_close(gu, ref.mlp.gate_up_proj(x).chunk(2, -1)[0])
    down = sum(m.mlp.down_proj.inner(h[:, r * 64 : (r + 1) * 64]) for r, m in enumerate(layers))
    torch.testing.assert_close(down, ref.mlp.down_proj(h), atol=3e-2, rtol=2e-2)
    o = sum(m.self_attn.o_proj.inner(x[:, r * 32 : (r + 1) * 32]) for r, m in enumerate(layers))
    torch.testing.assert_close(o, ref.self_attn.o_proj(x), atol=3e-2, rtol=2e-2)


def test_tensor_parallel_greedy_equals_one_rank(tiny: Path, tmp_path: Path) -> None:
    """LLM(..., tensor_parallel_size=2) on a W4A16 checkpoint: the tokens of one rank."""
    from helpers.tiny_models import assert_same_greedy
    from modelport import LLM, SamplingParams

    qc = ct_config({"group_0": group(int_args(4, "group", 32))}, ["lm_head"])
    qdir, _ = write_int_checkpoint(tiny, tmp_path, qc, lambda m: (4, 32, True, False))
    prompts = [[256, 10, 20, 30], [256] + list(range(40, 77))]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16)
    want = LLM(str(qdir), **kw).generate(prompt_token_ids=prompts, sampling_params=greedy,
                                         use_tqdm=False)
    llm = LLM(str(qdir), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=greedy, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_greedy(got, want)


@pytest.mark.parametrize("how", ["w4-sym", "w4-asym-actorder", "w8-channel-asym"])
def test_tensor_parallel_rank_built_as_its_slice(tiny: Path, tmp_path: Path, how: str) -> None:
    """A tensor-parallel rank builds each layer as its slice and cuts the checkpoint tensors
    as they stream in: the same packed tensors, bit for bit, as loading whole and cutting
    before repacking, holding about half of each layer (test_tp_quant_sharded_load's check;
    act-order: every group's float32 scales stay whole on a row slice, more than its 10 %
    slack on this tiny model's 2 groups, so half the codes is checked there)."""
    from test_tp_quant_sharded_load import _check_rank, _rank, _state

    bits, grp = (8, None) if how.startswith("w8") else (4, 32)
    sym, actorder = "asym" not in how, "actorder" in how
    args = int_args(bits, "group" if grp else "channel", grp, sym, "group" if actorder else None)
    qdir, _ = write_int_checkpoint(tiny, tmp_path, ct_config({"group_0": group(args)}, ["lm_head"]),
                                   lambda m: (bits, grp, sym, actorder))
    if not actorder:
        _check_rank(qdir, None, min_layers=8)
        return
    for rank in range(2):
        new, held = _rank(qdir, rank, None, at_load=True)
        old, held_old = _rank(qdir, rank, None, at_load=False)
        got, want = _state(new), _state(old)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        sliced = [n for n, m in new.named_modules() if getattr(m, "tp_shard", None) == (rank, 2)]
        assert len(sliced) == 8
        for n in sliced:
            assert held[n]["weight_packed"] * 2 == held_old[n]["weight_packed"]


def test_fused_layer_parts_quantized_differently_refused(tiny: Path, tmp_path: Path) -> None:
    """gate/up load into one fused layer: an integer gate beside a float (ignored) up is
    refused, naming both parts."""
    qc = ct_config({"group_0": group(int_args(4, "group", 32))},
                   ["lm_head", "model.layers.0.mlp.up_proj"])
    qdir, _ = write_int_checkpoint(
        tiny, tmp_path, qc, lambda m: None if m == "model.layers.0.mlp.up_proj" else (4, 32, True, False))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_up_proj is one fused "
                       r"layer.*gate_proj \(.+\), .*up_proj \(float\)"):
        load_cpu(qdir)
