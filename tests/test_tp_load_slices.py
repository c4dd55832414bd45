"""A tensor-parallel rank builds and loads only its slice of the dense projections
(parallel/tp_load.py): the result equals loading whole and cutting (shard_model), and no
full-size q/k/v, gate_up, o or down weight is ever allocated on the rank."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.layers.linear import Linear
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.parallel.moe_parallel import sharded_at_build
from modelport.parallel.tensor_parallel import AllReduceLinear, shard_model

CPU = torch.device("cpu")
PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 99, 5]]
KW = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16)


def _make_phi3(path: Path) -> Path:
    """Phi-3 stores q/k/v and gate/up already fused: the loaders' fused-tensor branch."""
    from transformers import AutoModelForCausalLM, Phi3Config

    cfg = Phi3Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                     bos_token_id=256, eos_token_id=257, pad_token_id=258,
                     initializer_range=0.05)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tpload")
    return {
        # 4 heads / 2 KV heads: GQA with KV heads == tensor_parallel_size
        "llama": make_tiny_llama_dir(root / "llama"),
        "qwen2": make_tiny_qwen2_dir(root / "qwen2"),  # q/k/v bias
        "phi3": _make_phi3(root / "phi3"),
        # distinct full / slice shapes: 8 heads of 8, 2 KV heads, intermediate 80
        "odd": make_tiny_llama_dir(root / "odd", num_heads=8, num_kv_heads=2,
                                   intermediate_size=80, with_tokenizer=False),
    }


def _load(d: Path, rank: int | None, fmt: str = "auto") -> torch.nn.Module:
    """rank None: today's reference (whole model loaded, then cut for rank 0 by
    shard_model); else a rank's own load, as the runner does it."""
    src = resolve_model(str(d))
    cfg = load_model_config(src)
    lc = LoadConfig(load_format=fmt)
    if rank is None:
        return load_model(src, cfg, lc, torch.float32, CPU)
    with sharded_at_build(rank, 2):
        return load_model(src, cfg, lc, torch.float32, CPU,
                          transform=partial(shard_model, rank=rank, size=2))


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3"])
def test_rank_load_equals_load_whole_then_shard(dirs: dict[str, Path], name: str) -> None:
    for rank in range(2):
        want = _load(dirs[name], None)
        shard_model(want, rank, 2)
        got = _load(dirs[name], rank)
        wp, gp = dict(want.named_parameters()), dict(got.named_parameters())
        assert gp.keys() == wp.keys()
        for k, p in gp.items():
            assert p.shape == wp[k].shape and torch.equal(p, wp[k]), (name, rank, k)
        wm, gm = dict(want.named_modules()), dict(got.named_modules())
        assert gm.keys() == wm.keys()
        for k, m in gm.items():
            assert type(m) is type(wm[k]), (name, rank, k)
            for attr in ("num_heads", "num_kv_heads", "q_size", "kv_size", "shard_ranges",
                         "input_size", "output_size"):
                assert getattr(m, attr, None) == getattr(wm[k], attr, None), (k, attr)
        sliced = [k for k, m in gm.items() if getattr(m, "tp_shard", None) == (rank, 2)]
        assert len(sliced) == 4 * 2  # qkv, o, gate_up, down of both layers


def test_rank_params_are_slices_of_the_checkpoint(dirs: dict[str, Path]) -> None:
    for name in ("llama", "qwen2"):
        ckpt = load_file(str(dirs[name] / "model.safetensors"))
        for rank in range(2):
            model = _load(dirs[name], rank)
            for i, layer in enumerate(model.model.layers):
                pre = f"model.layers.{i}."

                def half(t: torch.Tensor, dim: int = 0, r: int = rank) -> torch.Tensor:
                    n = t.shape[dim] // 2
                    return t.narrow(dim, r * n, n)

                attn, mlp = layer.self_attn, layer.mlp
                qkv = torch.cat([half(ckpt[f"{pre}self_attn.{p}_proj.weight"]) for p in "qkv"])
                assert attn.qkv_proj.weight.shape == (32 + 16 + 16, 64)
                assert torch.equal(attn.qkv_proj.weight, qkv)
                if name == "qwen2":
                    bias = torch.cat([half(ckpt[f"{pre}self_attn.{p}_proj.bias"]) for p in "qkv"])
                    assert torch.equal(attn.qkv_proj.bias, bias)
                assert isinstance(attn.o_proj, AllReduceLinear)
                assert torch.equal(attn.o_proj.inner.weight,
                                   half(ckpt[f"{pre}self_attn.o_proj.weight"], 1))
                gate_up = torch.cat([half(ckpt[f"{pre}mlp.{p}_proj.weight"])
                                     for p in ("gate", "up")])
                assert torch.equal(mlp.gate_up_proj.weight, gate_up)
                assert mlp.down_proj.inner.weight.shape == (64, 64)
                assert torch.equal(mlp.down_proj.inner.weight,
                                   half(ckpt[f"{pre}mlp.down_proj.weight"], 1))
            assert torch.equal(model.model.embed_tokens.weight, ckpt["model.embed_tokens.weight"])
            assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])


class _Allocations(TorchDispatchMode):
    """Shapes of every new (non-meta) tensor storage an op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.device.type != "meta"
                    and t.untyped_storage().data_ptr() not in inputs):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("fmt", ["auto", "dummy"])
def test_no_full_size_projection_is_allocated(dirs: dict[str, Path], fmt: str) -> None:
    d = dirs["odd"]  # hidden 64, q 64, k/v 16 each, intermediate 80
    full = {(96, 64), (160, 64), (64, 64), (64, 80)}  # qkv, gate_up, o, down
    sliced = {(48, 64), (80, 64), (64, 32), (64, 40)}
    before = _Allocations()
    with before:  # the reference path does allocate them (so the check can fail)
        _load(d, None, fmt)
    assert full <= before.shapes
    for rank in range(2):
        rec = _Allocations()
        with rec:
            model = _load(d, rank, fmt)
        assert not full & rec.shapes, (rank, full & rec.shapes)
        assert sliced <= rec.shapes
        shapes = {tuple(m.weight.shape) for m in model.modules() if type(m) is not Linear
                  and hasattr(m, "tp_shard")} | {tuple(m.inner.weight.shape)
                                                   for m in model.modules()
                                                   if isinstance(m, AllReduceLinear)}
        assert shapes == sliced


def test_dummy_weights_are_slice_sized_and_replicated_equally(dirs: dict[str, Path]) -> None:
    ranks = [_load(dirs["llama"], r, "dummy") for r in range(2)]
    want = _load(dirs["llama"], None, "dummy")
    shard_model(want, 0, 2)
    ref = {k: p.shape for k, p in want.named_parameters()}
    for m in ranks:
        assert {k: p.shape for k, p in m.named_parameters()} == ref
    a, b = (dict(m.named_parameters()) for m in ranks)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(a[k], b[k])  # replicated weights: the same on every rank


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tp2_greedy_tokens_and_logprobs_equal_tp1(dirs: dict[str, Path], name: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    want = LLM(str(dirs[name]), **KW).generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                               use_tqdm=False)
    llm = LLM(str(dirs[name]), tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for gs, ws in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert gs.keys() == ws.keys()
            for tok in gs:
                assert abs(gs[tok].logprob - ws[tok].logprob) < 1e-4


def test_wrong_checkpoint_shape_is_refused_before_cutting(dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """A rank sees only its slice, yet a checkpoint tensor of the wrong full size is still an
    error naming both shapes (not silently cut)."""
    import shutil

    from safetensors.torch import save_file

    for key, bad, shape in (("model.layers.0.self_attn.q_proj.weight", (66, 64), r"\(64, 64\)"),
                            ("model.layers.1.mlp.down_proj.weight", (64, 130), r"\(64, 128\)")):
        d = tmp_path / key.replace(".", "_")
        shutil.copytree(dirs["llama"], d)
        ckpt = load_file(str(d / "model.safetensors"))
        ckpt[key] = torch.zeros(bad)
        save_file(ckpt, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=rf"shape mismatch.*{shape}"):
            _load(d, 1)
