"""Tensor parallelism of the MoE models on CPU (gloo): each rank keeps a slice of every
expert's intermediate channels, and the sharded model computes what the single-rank one does.

Tiny random HF models (helpers/tiny_moe.py): Mixtral (experts only) and Qwen2-MoE (q/k/v
bias, a shared expert behind its sigmoid gate, one dense MLP layer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from helpers.kernel_cache import seeded_cache
from helpers.tiny_models import load_cpu_fp32 as _load
from helpers.tiny_moe import make_tiny_moe_dir
from helpers.tiny_moe import tiny_moe_config as cfg
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.layers.fused_moe import FusedMoE, SparseMoeBlock
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.models.moe_config import check_moe_options
from modelport.parallel.moe_parallel import (
    AllReduceMoeBlock,
    shard_experts,
    sharded_at_build,
)
from modelport.parallel.tensor_parallel import AllReduceLinear, shard_model
from modelport.planner.parallel import tp_refusal, valid_tp_degrees
from test_models_moe import _PRELUDE

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[256, 10, 20, 30], [256] + list(range(40, 77)), [256, 99, 5, 200, 31]]
KW = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=16)


@pytest.fixture(scope="module", params=("mixtral", "qwen2_moe"))  # one with a shared expert
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_moe_dir(tmp_path_factory.mktemp(request.param) / "m", request.param)


def _moe_blocks(model: torch.nn.Module) -> list[tuple[int, SparseMoeBlock]]:
    out = []
    for i, layer in enumerate(model.model.layers):
        ffn = getattr(layer, layer.ffn_name)
        if isinstance(ffn, AllReduceMoeBlock):
            ffn = ffn.block
        if isinstance(ffn, SparseMoeBlock):
            out.append((i, ffn))
    return out


def test_rank_slices_sum_to_the_whole_block(moe_dir: Path) -> None:
    """Each rank's block output (before the all-reduce) is a partial sum: the two add up to
    the unsharded block's output, shared expert and its gate included."""
    full = _load(moe_dir)
    ranks = []
    for rank in range(2):
        m = _load(moe_dir)
        shard_model(m, rank, 2)  # no forward here, so no process group is needed
        ranks.append(m)
    blocks = _moe_blocks(full)
    assert blocks
    x = torch.randn(7, 64)
    for i, ref in blocks:
        parts = [dict(_moe_blocks(m))[i] for m in ranks]
        for rank, (m, p) in enumerate(zip(ranks, parts)):
            wrapper = getattr(m.model.layers[i], m.model.layers[i].ffn_name)
            assert isinstance(wrapper, AllReduceMoeBlock) and wrapper.block is p
            e, two_i, h = ref.experts.w13.weight.shape
            assert p.experts.w13.weight.shape == (e, two_i // 2, h)
            assert p.experts.w2.weight.shape == (e, h, two_i // 4)
            # [gate | up] per rank: this rank's gate rows, then the same rows of up
            inter, part = two_i // 2, two_i // 4
            lo = rank * part
            torch.testing.assert_close(p.experts.w13.weight[:, :part],
                                       ref.experts.w13.weight[:, lo:lo + part])
            torch.testing.assert_close(p.experts.w13.weight[:, part:],
                                       ref.experts.w13.weight[:, inter + lo:inter + lo + part])
            assert torch.equal(p.gate.weight, ref.gate.weight)  # the router is replicated
            if p.shared_expert is not None:  # row-parallel, but no all-reduce of its own
                assert type(p.shared_expert.down_proj) is not AllReduceLinear
                assert torch.equal(p.shared_expert_gate.weight, ref.shared_expert_gate.weight)
        with torch.no_grad():
            torch.testing.assert_close(parts[0](x) + parts[1](x), ref(x), atol=1e-5, rtol=1e-5)
    assert any(p.shared_expert is not None for _, p in blocks) == ("qwen" in str(moe_dir))
    # attention and the dense MLP layers shard as in the dense models
    layer0 = ranks[0].model.layers[0]
    assert isinstance(layer0.self_attn.o_proj, AllReduceLinear)
    if len(blocks) < len(full.model.layers):  # Qwen2-MoE's dense layer 1
        assert isinstance(ranks[0].model.layers[1].mlp.down_proj, AllReduceLinear)


def _stacked_copy(per_expert: Path, out: Path) -> Path:
    """The checkpoint as transformers 5's modules hold it (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]): the loaders' whole-tensor path."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32,
                                              local_files_only=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((per_expert / "config.json").read_text())
    return out


def test_experts_load_as_the_rank_slice(moe_dir: Path, tmp_path: Path) -> None:
    """A rank's load (the runner's) builds each expert stack at its slice size and cuts the
    checkpoint's tensors as they arrive: per-expert and (Qwen) stacked checkpoints give
    exactly the weights of a whole load sharded afterwards."""
    dirs = [moe_dir]
    if "qwen" in str(moe_dir):  # transformers 5 names Mixtral's raw modules differently
        dirs.append(_stacked_copy(moe_dir, tmp_path / "stacked"))
    for rank in range(2):
        after = _load(moe_dir)
        shard_model(after, rank, 2)
        want = dict(after.named_parameters())
        for d in dirs:
            src = resolve_model(str(d))
            with sharded_at_build(rank, 2):
                got = load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                                 torch.device("cpu"), transform=partial(shard_model, rank=rank,
                                                                        size=2))
            experts = [m for m in got.modules() if isinstance(m, FusedMoE)]
            assert experts and all(m.tp_shard == (rank, 2) for m in experts)
            params = dict(got.named_parameters())
            assert params.keys() == want.keys()
            for name, p in params.items():
                assert torch.equal(p, want[name]), (d.name, rank, name)
    with sharded_at_build(0, 2), pytest.raises(RuntimeError, match="does not nest"):
        with sharded_at_build(0, 2):
            pass


def test_tp2_greedy_and_logprobs_equal_tp1(moe_dir: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    want = LLM(str(moe_dir), **KW).generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                            use_tqdm=False)
    llm = LLM(str(moe_dir), tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_tokens_and_logprobs(got, want)


def assert_same_tokens_and_logprobs(got: list, want: list) -> None:
    """Greedy tokens equal, top logprobs within 1e-4 (tests/test_expert_parallel.py too)."""
    tokens = [list(o.outputs[0].token_ids) for o in got]
    assert tokens == [list(o.outputs[0].token_ids) for o in want]
    assert len({tuple(t) for t in tokens}) > 1  # the prompts lead to different tokens
    for g, w in zip(got, want):
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            for tok in lw:
                assert abs(lg[tok].logprob - lw[tok].logprob) < 1e-4


def test_tp_must_divide_the_intermediate_sizes(tmp_path: Path) -> None:
    # 45 and 75 are odd: two ranks cannot take equal slices
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 must divide "
                                         r"moe_intermediate_size=45 \(every expert's"):
        check_moe_options(cfg("qwen2_moe", moe_intermediate_size=45), tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size=75"):
        check_moe_options(cfg("qwen2_moe", shared_expert_intermediate_size=75),
                          tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"must divide intermediate_size=99 \(every expert's"):
        check_moe_options(cfg("mixtral", intermediate_size=99), tensor_parallel_size=2)
    check_moe_options(cfg("qwen2_moe"), tensor_parallel_size=2)  # 48, 80, 128: accepted
    # the planner applies the same rule (and lists the degrees that do divide)
    assert valid_tp_degrees(cfg("mixtral")) == [1, 2]
    assert valid_tp_degrees(cfg("mixtral", intermediate_size=99)) == [1]
    why = tp_refusal(cfg("mixtral", intermediate_size=99), 2)
    assert why is not None and "intermediate_size=99" in why and "valid degrees: 1" in why
    # the engine refuses before any rank starts; the loader's sharding refuses too
    d = make_tiny_moe_dir(tmp_path / "m", "qwen2_moe", moe_intermediate_size=45)
    with pytest.raises(ValueError, match="moe_intermediate_size=45"):
        LLM(str(d), tensor_parallel_size=2, **KW)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 must divide the expert "
                                         r"intermediate size of model\.layers\.0\.mlp \(45\)"):
        shard_model(_load(d), 0, 2)
    with sharded_at_build(1, 2), pytest.raises(
            ValueError, match=r"must divide the expert intermediate size \(45\)"):
        _load(d)  # a rank's own load: refused as the experts are built


def test_gguf_moe_with_tp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4 GGUF MoE on CPU keeps its blocks by default (its experts then split through the
    quantized sharding: tests/test_moe_tensor_parallel_quant.py); quantization='none' loads
    the experts dequantized and splits them like any float experts (one rank's tokens)."""
    from helpers.gguf_archs import write_gguf

    # GGUF configs; the CPU kernels built here, not again in the rank (helpers/kernel_cache.py)
    monkeypatch.setenv("MODELPORT_CACHE", str(seeded_cache(tmp_path)))
    hf_dir = make_tiny_moe_dir(tmp_path / "hf", "qwen2_moe", moe_intermediate_size=64,
                               shared_expert_intermediate_size=64)
    path = str(write_gguf(hf_dir, tmp_path / "m-q4.gguf", "Q4_0"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(path, quantization="none", **KW).generate(
        prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    llm = LLM(path, quantization="none", tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_restacked_experts_are_refused_by_shard_experts() -> None:
    check_moe_options(cfg("mixtral"), tensor_parallel_size=2, quantization="awq")  # accepted
    experts = FusedMoE(4, 2, 64, 32, True)
    experts.unstack()  # the per-expert layers a quantization method takes over: split too
    shard_experts("layers.0.mlp.experts", experts, 0, 2)
    assert experts.get_submodule("3").down_proj.input_size == 16
    experts.quant_experts = torch.nn.Module()  # as after restack_experts (CUDA)
    with pytest.raises(ValueError, match="shard quantized MoE experts before they are "
                                         "restacked"):
        shard_experts("layers.0.mlp.experts", experts, 0, 2)


_TRITON_RANKS = _PRELUDE + textwrap.dedent("""
    import copy
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import FusedMoE, moe_reference, route
    from modelport.parallel.moe_parallel import shard_experts

    g = torch.Generator().manual_seed(0)
    # slices of 40 and 24 channels: not multiples of the 32-wide tiles
    for t, e, k, h, i, size, dt in [(9, 8, 2, 64, 80, 2, torch.float32),
                                    (5, 4, 2, 64, 96, 4, torch.half)]:
        full = FusedMoE(e, k, h, i, True)
        full.w13.weight.data = (torch.randn(e, 2 * i, h, generator=g) * 0.1).to(dt)
        full.w2.weight.data = (torch.randn(e, h, i, generator=g) * 0.1).to(dt)
        x = torch.randn(t, h, generator=g).to(dt)
        w, ids = route(torch.randn(t, e, generator=g) * 3, k, True)
        ref = moe_reference(x.float(), full.w13.weight.float(), full.w2.weight.float(), w, ids)
        total = torch.zeros(t, h)
        for rank in range(size):
            m = copy.deepcopy(full)
            shard_experts("experts", m, rank, size)
            assert m.w13.weight.shape == (e, 2 * i // size, h), m.w13.weight.shape
            y = tm.fused_experts(x, m.w13.weight, m.w2.weight, w, ids, block_n=32, block_k=32)
            assert y.dtype == dt and y.shape == (t, h)
            total += y.float()
        err = (total - ref).abs().max().item() / ref.abs().max().item()
        assert err < (1e-5 if dt == torch.float32 else 3e-3), (size, err)
        print("ok ranks", size, f"{err:.1e}")
""")


def test_triton_experts_on_rank_slices_sum_to_the_whole_in_interpreter() -> None:
    """The CUDA kernel takes a rank's [gate | up] slice unchanged (a smaller intermediate
    size): the ranks' outputs add up to the unsharded reference (Triton interpreter)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", _TRITON_RANKS], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok ranks") == 2
