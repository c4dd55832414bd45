"""Tensor parallelism with quantized weights on CPU (gloo): GPTQ (with and without act-order),
AWQ, FP8, GGUF and NF4 checkpoints shard through their LinearMethod and compute what one
rank does."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.kernel_cache import seeded_cache
from helpers.tiny_models import assert_same_greedy, make_tiny_llama_dir, make_tiny_llama_gguf
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.parallel.tensor_parallel import shard_model
from modelport.quantization.base import LinearMethod, TPShard
from modelport.quantization.fp8 import FP8Config
from modelport.quantization.kernels import DequantKernel, GroupQuant, shard_group_quant
from modelport.quantization.nf4 import NF4Config, nf4_encode
from modelport.quantization.tools.writer import is_quantizable, write_checkpoint
from test_quant_awq_gptq import quantize_folder

PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 99]]
CASES = {  # name -> (method, act_order)
    "gptq": ("gptq", False),
    "gptq-act-order": ("gptq", True),
    "awq": ("awq", False),
    "awq-gemv": ("awq-gemv", False),  # loaded whole on each rank, then cut (no slice_cuts)
    "fp8": ("fp8", False),
    "gguf-q4_0": ("gguf", False),
    "gguf-q8_0": ("gguf", False),  # kept by default on an x86 CPU (int8 kernel)
    "nf4": ("bitsandbytes", True),  # double quantization
    "fp8-online": ("fp8", True),  # a float checkpoint quantized at load time
}
# cases whose format is asked for (--quantization) rather than detected from the checkpoint
REQUESTED = {"gguf-q4_0": "gguf", "fp8-online": "fp8"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seeded_cache(tmp_path_factory.mktemp("tpq-cache"))


@pytest.fixture(autouse=True)
def _cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GGUF configs; the CPU kernels built once (helpers/kernel_cache.py), not in every rank
    monkeypatch.setenv("MODELPORT_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tpq")
    hf = make_tiny_llama_dir(root / "hf", seed=3)  # hidden 64, intermediate 128, 4/2 heads
    out: dict[str, Path] = {}
    for name, (method, act_order) in CASES.items():
        (root / name).mkdir()
        if name == "fp8-online":
            out[name] = hf
        elif method == "fp8":
            out[name] = _fp8_checkpoint(hf, root / name)
        elif method == "bitsandbytes":
            out[name] = _nf4_checkpoint(hf, root / name)
        elif method == "gguf":
            qtype = name.removeprefix("gguf-").upper()
            out[name] = make_tiny_llama_gguf(hf, root / name / f"tiny-{name}.gguf", qtype)
        else:
            out[name] = quantize_folder(hf, root / name, method, 4, 32, act_order=act_order)[0]
    return out


def _fp8_checkpoint(hf: Path, out: Path) -> Path:
    """Per-tensor scales (as FP8 checkpoints usually store them): fused q/k/v differ."""
    qt: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(hf / "model.safetensors")).items():
        if not is_quantizable(name):
            qt[name] = w
            continue
        scale = w.abs().max() / 448.0
        qt[name] = (w / scale).to(torch.float8_e4m3fn)
        qt[name.removesuffix(".weight") + ".weight_scale"] = scale.reshape(()).float()
    return write_checkpoint(hf, out / "fp8", qt, FP8Config(), float_dtype=torch.float32)


def _nf4_checkpoint(hf: Path, out: Path) -> Path:
    """bitsandbytes layout, blocks of 64 (o_proj's 32 columns per rank lie inside a block)."""
    qt: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(hf / "model.safetensors")).items():
        if not is_quantizable(name):
            qt[name] = w
            continue
        for k, v in nf4_encode(w, 64, True).items():
            qt[f"{name}.{k}" if k else name] = v
    return write_checkpoint(hf, out / "nf4", qt, NF4Config(double_quant=True),
                            float_dtype=torch.float32)


def _load(path: Path, rank: int | None = None, size: int = 2,
          load_config: LoadConfig | None = None) -> torch.nn.Module:
    src = resolve_model(str(path))
    transform = None if rank is None else functools.partial(shard_model, rank=rank, size=size)
    return load_model(src, load_model_config(src), load_config or LoadConfig(), torch.float32,
                      torch.device("cpu"), transform=transform)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_shards_reassemble_the_full_projections(checkpoints: dict[str, Path],
                                                          case: str) -> None:
    cfg = LoadConfig(quantization=REQUESTED.get(case))
    full = _load(checkpoints[case], load_config=cfg)
    parts = [_load(checkpoints[case], rank, load_config=cfg) for rank in range(2)]
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(5, 64, generator=gen), torch.randn(5, 128, generator=gen)
    for i in range(2):
        ref = full.model.layers[i]
        layers = [p.model.layers[i] for p in parts]
        # column parallel: each rank holds its heads of q, k and v
        q, k, v = ref.self_attn.qkv_proj.split(ref.self_attn.qkv_proj(x))
        qs, ks, vs = zip(*(m.self_attn.qkv_proj.split(m.self_attn.qkv_proj(x)) for m in layers))
        for got, want in ((qs, q), (ks, k), (vs, v)):
            torch.testing.assert_close(torch.cat(got, -1), want)
        gu = torch.cat([m.mlp.gate_up_proj(x).chunk(2, -1)[0] for m in layers], -1)
        torch.testing.assert_close(gu, ref.mlp.gate_up_proj(x).chunk(2, -1)[0])
        # row parallel: partial products over each rank's input columns sum to the whole
        # (the fast CPU kernel runs in bf16, so the sum is as close as bf16 allows)
        down = sum(m.mlp.down_proj.inner(h[:, r * 64 : (r + 1) * 64]) for r, m in enumerate(layers))
        torch.testing.assert_close(down, ref.mlp.down_proj(h), atol=3e-2, rtol=2e-2)
        o = sum(m.self_attn.o_proj.inner(x[:, r * 32 : (r + 1) * 32]) for r, m in enumerate(layers))
        torch.testing.assert_close(o, ref.self_attn.o_proj(x), atol=3e-2, rtol=2e-2)
        assert layers[0].self_attn.attn.num_heads == 2


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_tp2_greedy_equals_tp1(checkpoints: dict[str, Path], case: str) -> None:
    path = str(checkpoints[case])
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16,
              quantization=REQUESTED.get(case))
    one = LLM(path, **kw)
    want = one.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
        # each rank holds half the KV heads: the two ranks really split the model
        assert llm.llm_engine.num_kv_blocks == 2 * one.llm_engine.num_kv_blocks
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_greedy(got, want)


def test_group_split_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    hf = make_tiny_llama_dir(tmp_path / "hf", intermediate_size=96)
    q, _ = quantize_folder(hf, tmp_path, "gptq", 4, 32)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 splits 96 input columns into "
                                         r"48 per rank, which is not a multiple of the group "
                                         r"size 32"):
        _load(q, 0)


def test_shard_group_quant_act_order_keeps_referenced_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    n, k, g = 8, 64, 16
    g_idx = torch.arange(k) // g
    g_idx = g_idx[torch.randperm(k, generator=gen)]
    gq = GroupQuant(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                    torch.rand(n, k // g, generator=gen) + 0.1, torch.randn(n, k // g, generator=gen),
                    g, 4, g_idx)
    w = gq.dequantize()
    for r in range(2):
        part = shard_group_quant(gq, 1, torch.arange(r * 32, (r + 1) * 32), tp_size=2)
        assert part.scales.shape[1] == len(torch.unique(g_idx[r * 32 : (r + 1) * 32]))
        torch.testing.assert_close(part.dequantize(), w[:, r * 32 : (r + 1) * 32])
        assert not part.uniform_groups() and isinstance(
            DequantKernel(part), torch.nn.Module)
    # a per-channel (one group) weight: each rank's half lies inside the group
    one = GroupQuant(gq.codes, gq.scales[:, :1], gq.zeros[:, :1], k, 4)
    half = shard_group_quant(one, 1, torch.arange(32, 64), tp_size=2)
    assert half.group_size == 32
    torch.testing.assert_close(half.dequantize(), one.dequantize()[:, 32:])


def test_sharding_after_the_kernels_are_built_is_a_clear_error(
        checkpoints: dict[str, Path]) -> None:
    model = _load(checkpoints["gptq"])  # repacked for the CPU kernel already
    with pytest.raises(ValueError, match="shard a quantized layer before its kernel is built"):
        shard_model(model, 0, 2)

    class Plain(LinearMethod):  # a format without a shard implementation
        def create_weights(self, *a: object) -> None: ...
        def apply(self, *a: object) -> torch.Tensor: ...

    with pytest.raises(ValueError, match="tensor parallelism is not supported with Plain"):
        Plain().shard(torch.nn.Linear(2, 2), TPShard(0, torch.arange(1), 2, 2, 0, 2))
