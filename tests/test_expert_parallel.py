"""Expert parallelism (``enable_expert_parallel``, vLLM's ``--enable-expert-parallel``): the
tensor-parallel ranks share out an MoE model's experts, whole, instead of slicing every expert
(parallel/moe_parallel.py). Each rank's block output is a partial sum over the experts it
holds; the ranks' sums equal the unsharded block, and TP=2 with experts shared out gives
TP=1's greedy tokens and logprobs (CPU ranks on gloo). Quantized experts (kept GGUF, AWQ,
GPTQ with act-order, FP8 checkpoint and online) are shared out as whole per-expert layers,
the checkpoints of tests/test_moe_tensor_parallel_quant.py; on CUDA restacked (forced on CPU
here, and the grouped kernels in the Triton interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

import test_moe_tensor_parallel_quant as tpq
from helpers.kernel_cache import seeded_cache
from helpers.tiny_models import assert_same_greedy
from helpers.tiny_models import load_cpu_fp32 as _load
from helpers.tiny_moe import make_tiny_moe_dir, random_quant_experts
from helpers.tiny_moe import tiny_moe_config as cfg
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.engine.arg_utils import EngineArgs
from modelport.entrypoints.openai.api_server import engine_args_from, make_parser
from modelport.layers.fused_moe import ExpertMLP, FusedMoE
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.models.moe_config import check_moe_options, moe_quant_tp_refusal
from modelport.parallel.moe_parallel import shard_experts, sharded_at_build
from modelport.parallel.tensor_parallel import shard_model
from modelport.quantization import kernels
from modelport.quantization import loading as quant_loading
from test_models_moe import _PRELUDE
from test_moe_tensor_parallel import (
    KW,
    PROMPTS,
    _moe_blocks,
    _stacked_copy,
    assert_same_tokens_and_logprobs,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=("mixtral", "qwen2_moe"))  # one with a shared expert
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Mixtral's experts 99 channels wide: two ranks could not slice them, but can share them
    kw = {"intermediate_size": 99} if request.param == "mixtral" else {}
    return make_tiny_moe_dir(tmp_path_factory.mktemp(request.param) / "m", request.param, **kw)


def test_rank_shares_sum_to_the_whole_block(moe_dir: Path) -> None:
    full = _load(moe_dir)
    ranks = []
    for rank in range(2):
        m = _load(moe_dir)
        shard_model(m, rank, 2, expert_parallel=True)
        ranks.append(m)
    blocks = _moe_blocks(full)
    assert blocks
    x = torch.randn(7, 64)
    for i, ref in blocks:
        e, two_i, h = ref.experts.w13.weight.shape
        parts = [dict(_moe_blocks(m))[i] for m in ranks]
        for rank, p in enumerate(parts):
            # experts [4r, 4r + 4) whole, the router replicated
            assert p.experts.num_experts == e // 2 and p.experts.expert_offset == rank * e // 2
            assert torch.equal(p.experts.w13.weight, ref.experts.w13.weight[rank * 4:rank * 4 + 4])
            assert torch.equal(p.experts.w2.weight, ref.experts.w2.weight[rank * 4:rank * 4 + 4])
            assert torch.equal(p.gate.weight, ref.gate.weight)
            assert f"holds [{rank * 4}, {rank * 4 + 4}) of 8" in repr(p.experts)
            if p.shared_expert is not None:  # split by channels, as without expert parallelism
                assert p.shared_expert.down_proj.weight.shape[1] * 2 == (
                    ref.shared_expert.down_proj.weight.shape[1])
        with torch.no_grad():
            # one token (the decode path) and several
            for xs in (x[:1], x):
                y0, y1 = parts[0](xs), parts[1](xs)
                torch.testing.assert_close(y0 + y1, ref(xs), atol=1e-5, rtol=1e-5)
            # over 7 tokens both ranks hold some of the chosen experts: each is only a part
            assert not torch.allclose(y0, ref(x), atol=1e-3)
            assert not torch.allclose(y1, ref(x), atol=1e-3)


def test_experts_load_as_the_rank_share(moe_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's own load builds its share of the experts and never reads the other rank's
    tensors: per-expert and (Qwen) stacked checkpoints give a whole load's weights sharded
    after."""
    from modelport.loader import hf

    read: list[str] = []
    real_open = hf._open

    class Spy:  # safetensors' file handle, recording the tensors read
        def __init__(self, path: Path) -> None:
            self.f = real_open(path)

        def __enter__(self) -> Spy:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.f.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(hf, "_open", Spy)
    dirs = [moe_dir]
    if "qwen" in str(moe_dir):
        dirs.append(_stacked_copy(moe_dir, tmp_path / "stacked"))
    for rank in range(2):
        after = _load(moe_dir)
        shard_model(after, rank, 2, expert_parallel=True)
        want = dict(after.named_parameters())
        for d in dirs:
            src = resolve_model(str(d))
            read.clear()
            with sharded_at_build(rank, 2, expert_parallel=True):
                got = load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                                 torch.device("cpu"),
                                 transform=partial(shard_model, rank=rank, size=2,
                                                   expert_parallel=True))
            ids = {int(n.split(".experts.")[1].split(".")[0]) for n in read
                   if ".experts." in n and n.split(".experts.")[1][0].isdigit()}
            if d == moe_dir:  # per-expert tensors: only this rank's experts [4r, 4r + 4) read
                assert ids == set(range(rank * 4, rank * 4 + 4)), (rank, sorted(ids))
            experts = [m for m in got.modules() if isinstance(m, FusedMoE)]
            assert experts and all(m.ep_shard == (rank, 2) and m.num_experts == 4
                                   for m in experts)
            params = dict(got.named_parameters())
            assert params.keys() == want.keys()
            for name, p in params.items():
                assert torch.equal(p, want[name]), (d.name, rank, name)


def test_ep2_greedy_and_logprobs_equal_tp1(moe_dir: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    want = LLM(str(moe_dir), **KW).generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                            use_tqdm=False)
    if "mixtral" in str(moe_dir):  # 99 channels an expert: slicing them is refused
        with pytest.raises(ValueError, match="intermediate_size=99"):
            LLM(str(moe_dir), tensor_parallel_size=2, **KW)
    llm = LLM(str(moe_dir), tensor_parallel_size=2, enable_expert_parallel=True, **KW)
    try:
        assert llm.llm_engine.config.parallel_config.enable_expert_parallel
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_tokens_and_logprobs(got, want)


def test_refusals(tmp_path: Path) -> None:
    # the number of experts must divide; the shared expert is still sliced, so its size too
    with pytest.raises(ValueError, match=r"must divide the number of experts \(6\)"):
        check_moe_options(cfg("mixtral", num_local_experts=6), tensor_parallel_size=4,
                          expert_parallel=True)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=75"):
        check_moe_options(cfg("qwen2_moe", shared_expert_intermediate_size=75,
                              moe_intermediate_size=45), tensor_parallel_size=2,
                          expert_parallel=True)
    check_moe_options(cfg("qwen2_moe", moe_intermediate_size=45), tensor_parallel_size=2,
                      expert_parallel=True)  # the experts stay whole: accepted
    check_moe_options(cfg("mixtral"), tensor_parallel_size=2, expert_parallel=True,
                      quantization="awq")  # quantized experts are shared out whole too
    # whole experts: only the shared expert and the dense MLPs need whole groups a rank
    mixtral96 = cfg("mixtral", intermediate_size=96)
    assert "splits 96 input columns" in moe_quant_tp_refusal(mixtral96, 2, 32, "gptq")
    assert moe_quant_tp_refusal(mixtral96, 2, 32, "gptq", expert_parallel=True) is None
    qwen = cfg("qwen2_moe", moe_intermediate_size=96, shared_expert_intermediate_size=96)
    assert "splits 96 input columns" in moe_quant_tp_refusal(qwen, 2, 32, "gptq",
                                                             expert_parallel=True)
    d = make_tiny_moe_dir(tmp_path / "m", "mixtral")
    with pytest.raises(ValueError, match="data-parallel replicas are independent engines"):
        EngineArgs(model=str(d), tensor_parallel_size=2, data_parallel_size=2,
                   enable_expert_parallel=True).create_engine_config()
    config = EngineArgs(model=str(d), tensor_parallel_size=2, enable_expert_parallel=True,
                        quantization="fp8", device="cpu").create_engine_config()
    assert config.parallel_config.enable_expert_parallel
    # the sharding itself: mixed layouts and per-expert (quantized) layers are refused
    experts = FusedMoE(8, 2, 64, 32, True)
    shard_experts("e", experts, 1, 2, expert_parallel=True)
    with pytest.raises(RuntimeError, match="built for rank 1 of 2"):
        shard_experts("e", experts, 0, 2, expert_parallel=True)
    with pytest.raises(RuntimeError, match="sharded without it"):
        shard_experts("e", experts, 1, 2)
    # per-expert (quantized) layers loaded whole: the rank keeps its share, named by global id
    quantized = FusedMoE(8, 2, 64, 32, True)
    quantized.unstack()
    shard_experts("e", quantized, 1, 2, expert_parallel=True)
    assert [n for n, _ in quantized.named_children()] == ["4", "5", "6", "7"]
    assert quantized.expert(0) is quantized.get_submodule("4")
    assert "per-expert layers, holds [4, 8) of 8" in repr(quantized)
    with pytest.raises(ValueError, match="not within"):
        FusedMoE(4, 2, 64, 32, True).set_expert_range(6, 8)


def test_cli_flag_reaches_the_engine_args() -> None:
    for argv in (["--enable-expert-parallel"], ["-ep"]):
        args = make_parser().parse_args(["--model", "/m", "-tp", "2", *argv])
        assert engine_args_from(args).enable_expert_parallel is True
    assert engine_args_from(make_parser().parse_args(["--model", "/m"])).enable_expert_parallel \
        is False


# -- quantized experts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quant_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moe-epq")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seeded_cache(tmp_path_factory.mktemp("moe-epq-cache"))


@pytest.fixture
def _quant_env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GGUF configs; the CPU kernels built once (helpers/kernel_cache.py), not in every rank
    monkeypatch.setenv("MODELPORT_CACHE", str(cache_dir))
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)
    # FP8 on CPU: the exact dequantized weights, not the int8 GEMM (tpq says why)
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")


def _exact_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact dequantization (no bf16 CPU GEMMs): the ranks' partial outputs must add up."""
    monkeypatch.setattr(kernels, "cpu_int4_fits", lambda gq: False)
    monkeypatch.setattr(kernels, "cpu_int8_fits", lambda gq: False)


def _load_quant(path: Path, case: str, rank: int | None = None) -> torch.nn.Module:
    """The whole model, or rank's of 2 as the runner loads it with expert parallelism."""
    src = resolve_model(str(path))
    cfg_ = LoadConfig(quantization=tpq.REQUESTED.get(case))
    args = (src, load_model_config(src), cfg_, torch.float32, torch.device("cpu"))
    if rank is None:
        return load_model(*args)
    with sharded_at_build(rank, 2, expert_parallel=True):
        return load_model(*args, transform=partial(shard_model, rank=rank, size=2,
                                                   expert_parallel=True))


def _expert_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The routed experts' repacked tensors (kernel buffers; FP8 codes as bytes), named as
    in an unsharded model (a rank's blocks are wrapped in AllReduceMoeBlock's ``block``)."""
    return {n.replace(".block.experts.", ".experts."):
            t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            for n, t in model.state_dict().items() if ".experts." in n}


@pytest.mark.usefixtures("_quant_env")
@pytest.mark.parametrize("arch,case", [("qwen2_moe", "gptq-act-order"), ("mixtral", "gguf-q4_0"),
                                       ("qwen3_moe", "fp8"), ("qwen2_moe", "fp8-online"),
                                       ("mixtral", "awq")])
def test_quantized_experts_load_as_the_rank_share(
    quant_root: Path, monkeypatch: pytest.MonkeyPatch, arch: str, case: str
) -> None:
    """A rank builds per-expert layers for its share only, whole and named by global id (the
    checkpoint's experts.<e>), and loads them from the checkpoint with the other rank's
    tensors skipped (a layer for them never exists: a tensor that reached the model would be
    refused as matching no parameter); they hold what a whole load's same experts hold, and
    the ranks' block outputs add up to the whole block."""
    _exact_cpu_kernels(monkeypatch)
    path = tpq._checkpoint(quant_root, arch, case)
    full = _load_quant(path, case)
    want = _expert_tensors(full)
    ranks = [_load_quant(path, case, r) for r in range(2)]
    for rank, m in enumerate(ranks):
        own = {str(e) for e in range(4 * rank, 4 * rank + 4)}
        got = _expert_tensors(m)
        assert got and got.keys() == {n for n in want
                                      if n.split(".experts.")[1].split(".")[0] in own}
        for name, p in got.items():
            assert torch.equal(p, want[name]), (rank, name)
        for moe in (x for x in m.modules() if isinstance(x, FusedMoE)):
            assert moe.ep_shard == (rank, 2) and not moe.stacked
            assert {n for n, _ in moe.named_children()} == own
            for e in range(4):  # whole experts: gate 64 + up 64 rows, 64 down columns
                mlp = moe.expert(e)
                assert isinstance(mlp, ExpertMLP) and mlp.down_proj.quant_method is not None
                assert mlp.gate_up_proj.output_size == 128 and mlp.down_proj.input_size == 64
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    blocks = tpq._blocks(full)
    assert blocks
    for i, ref in blocks.items():
        parts = [tpq._blocks(m)[i] for m in ranks]
        if ref.shared_expert is not None:  # still split by channels
            assert all(p.shared_expert.down_proj.input_size == 32 for p in parts)
        with torch.no_grad():
            for xs in (x[:1], x):  # one token (the decode path) and several
                torch.testing.assert_close(sum(p(xs) for p in parts), ref(xs), atol=2e-4,
                                           rtol=1e-4)


@pytest.mark.usefixtures("_quant_env")
def test_restacked_quantized_experts_hold_the_rank_share(
    quant_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on CUDA (restack forced on CPU): restack_experts stacks the rank's share in local
    order, act-order GPTQ included (whole experts keep whole groups, which slices do not), and
    QuantExperts adds nothing for the other rank's assignments."""
    orig = FusedMoE.unstack
    monkeypatch.setattr(FusedMoE, "unstack", lambda self, restack=False: orig(self, True))
    _exact_cpu_kernels(monkeypatch)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    for case in ("awq", "gptq-act-order", "fp8"):
        path = tpq._checkpoint(quant_root, "qwen2_moe", case)
        full = _load_quant(path, case)
        ranks = [_load_quant(path, case, r) for r in range(2)]
        for i, ref in tpq._blocks(full).items():
            w13, w2 = ref.experts.quant_experts.dequantize()
            parts = [tpq._blocks(m)[i] for m in ranks]
            for r, p in enumerate(parts):
                assert not list(p.experts.children())[1:]  # the per-expert layers are freed
                got13, got2 = p.experts.quant_experts.dequantize()
                torch.testing.assert_close(got13, w13[4 * r:4 * r + 4])
                torch.testing.assert_close(got2, w2[4 * r:4 * r + 4])
            with torch.no_grad():
                for xs in (x[:1], x):
                    torch.testing.assert_close(sum(p(xs) for p in parts), ref(xs), atol=2e-4,
                                               rtol=1e-4)


@pytest.mark.usefixtures("_quant_env")
@pytest.mark.parametrize("arch,case", [("mixtral", "awq"), ("qwen2_moe", "gguf-q8_0"),
                                       ("qwen2_moe", "fp8-online")])
def test_quantized_moe_ep2_greedy_equals_tp1(quant_root: Path, arch: str, case: str) -> None:
    path = str(tpq._checkpoint(quant_root, arch, case))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(tpq.KW, quantization=tpq.REQUESTED.get(case))
    want = LLM(path, **kw).generate(prompt_token_ids=tpq.PROMPTS, sampling_params=greedy,
                                    use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    try:
        got = llm.generate(prompt_token_ids=tpq.PROMPTS, sampling_params=greedy, use_tqdm=False)
        model = llm.llm_engine.core.runner.model  # rank 0's: experts 0-3, whole
        experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.ep_shard == (0, 2) for m in experts)
        assert all({n for n, _ in m.named_children()} == {"0", "1", "2", "3"} for m in experts)
        assert all(m.expert(e).down_proj.input_size == 64 for m in experts for e in range(4))
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_greedy(got, want)


_TRITON_SHARES = _PRELUDE + textwrap.dedent("""
    import copy
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import FusedMoE, moe_reference, route
    from modelport.parallel.moe_parallel import shard_experts

    g = torch.Generator().manual_seed(0)
    # 32 and 18 assignments take the few-token GEMVs, 90 the grouped GEMM (the GEMVs' time in
    # the interpreter goes as assignments x intermediate / 8 and tokens x hidden / 8: small)
    for t, e, k, h, i, size in [(16, 8, 2, 32, 32, 2), (9, 8, 2, 32, 16, 4), (45, 8, 2, 64, 64, 2)]:
        full = FusedMoE(e, k, h, i, True)
        full.w13.weight.data = torch.randn(e, 2 * i, h, generator=g) * 0.1
        full.w2.weight.data = torch.randn(e, h, i, generator=g) * 0.1
        x = torch.randn(t, h, generator=g)
        w, ids = route(torch.randn(t, e, generator=g) * 3, k, True)
        ref = moe_reference(x, full.w13.weight, full.w2.weight, w, ids)
        total = torch.zeros(t, h)
        for rank in range(size):
            m = copy.deepcopy(full)
            shard_experts("experts", m, rank, size, expert_parallel=True)
            # what FusedMoE.forward hands the kernels on CUDA: another rank's assignments
            # as id e // size at weight 0
            lw, lids = m._own_assignments(w, ids, e // size)
            assert int(lids.max()) == e // size and bool((lw[lids == e // size] == 0).all())
            y = tm.fused_experts(x, m.w13.weight, m.w2.weight, lw, lids, block_n=32, block_k=32,
                                 elsewhere=True)
            total += y.float()
        err = (total - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, (t, size, err)
        print("ok shares", t, size, f"{err:.1e}")
""")


def test_triton_experts_on_rank_shares_sum_to_the_whole_in_interpreter() -> None:
    """On CUDA the grouped GEMM skips another rank's assignments (the few-token GEMVs run
    expert 0 at weight zero for them): the ranks' outputs add up to the unsharded reference
    (Triton interpreter)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", _TRITON_SHARES], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok shares") == 3


_TRITON_QUANT_SHARES = _PRELUDE + textwrap.dedent("""
    import torch
    from helpers.tiny_moe import random_quant_experts
    from modelport.layers.fused_moe import FusedMoE, moe_reference, route
    from modelport.layers.moe_quant import QuantExperts

    g = torch.Generator().manual_seed(0)
    e, k, h, i = 8, 2, 64, 64
    fp8, ints = random_quant_experts(g, e, h, i, 32, 0.1, 0.02, 0.05)
    # 6 assignments take the few-token GEMVs, 40 the grouped GEMM
    for t in (3, 20):
        x = torch.randn(t, h, generator=g).half()
        w, ids = route(torch.randn(t, e, generator=g) * 3, k, True)
        for kind, make, parts in (("fp8", QuantExperts.from_fp8, fp8),
                                  ("int", QuantExperts.from_group_quant, ints)):
            w13, w2 = make(parts).dequantize()
            ref = moe_reference(x.float(), w13.half().float(), w2.half().float(), w, ids)
            total = torch.zeros(t, h)
            for rank in range(2):
                share = make(parts[4 * rank:4 * rank + 4])  # what restack_experts stacks
                moe = FusedMoE(4, k, h, i, True)
                moe.set_expert_range(4 * rank, e)
                lw, lids = moe._own_assignments(w, ids, 4)  # FusedMoE.forward's local ids
                # what QuantExperts runs on CUDA for the rank's share
                total += share.grouped_gemm(x, lw, lids, True, block_n=32).float()
            err = (total - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-3, (kind, t, err)
            print("ok quant shares", kind, t, f"{err:.1e}")
""")


def test_restacked_quantized_rank_shares_sum_to_the_whole_in_interpreter() -> None:
    """QuantExperts' CUDA path (FP8 and 4-bit integer codes; the few-token GEMVs and the
    grouped GEMM) on each rank's share, another rank's assignments given the phantom id:
    the ranks' outputs add up to the unsharded reference (Triton interpreter)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", _TRITON_QUANT_SHARES], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok quant shares") == 4, p.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rank_shares_sum_to_the_whole_on_cuda() -> None:
    """FusedMoE.forward on CUDA (few-token GEMVs and the grouped GEMM, bf16): each rank's
    share, summed, equals the unsharded layer."""
    import copy

    g = torch.Generator().manual_seed(0)
    for t in (1, 8, 300):
        full = FusedMoE(8, 2, 256, 512, True).cuda()
        full.w13.weight.data = (torch.randn(8, 1024, 256, generator=g) * 0.05).cuda().bfloat16()
        full.w2.weight.data = (torch.randn(8, 256, 512, generator=g) * 0.05).cuda().bfloat16()
        x = torch.randn(t, 256, generator=g).cuda().bfloat16()
        logits = (torch.randn(t, 8, generator=g) * 3).cuda()
        ref = full(x, logits).float()
        total = torch.zeros_like(ref)
        for rank in range(2):
            m = copy.deepcopy(full)
            shard_experts("experts", m, rank, 2, expert_parallel=True)
            total += m(x, logits).float()
        err = (total - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-2, (t, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restacked_quantized_rank_shares_sum_to_the_whole_on_cuda() -> None:
    """FusedMoE.forward over restacked FP8 and AWQ-like 4-bit experts on CUDA (route_topk's
    int32 ids, the few-token GEMVs and the grouped GEMM, bf16): each rank's share, summed,
    equals the unsharded layer."""
    from modelport.layers.moe_quant import QuantExperts

    g = torch.Generator().manual_seed(0)
    e, h, i = 8, 256, 512
    fp8, ints = random_quant_experts(g, e, h, i, 128, 0.05, 0.004, 0.02)

    def layer(make, parts, first: int | None) -> FusedMoE:  # noqa: ANN001
        moe = FusedMoE(len(parts), 2, h, i, True)
        if first is not None:
            moe.set_expert_range(first, e)
        moe.quant_experts = make(parts)
        return moe.cuda()

    for make, parts in ((QuantExperts.from_fp8, fp8), (QuantExperts.from_group_quant, ints)):
        full = layer(make, parts, None)
        shares = [layer(make, parts[4 * r:4 * r + 4], 4 * r) for r in range(2)]
        for t in (1, 8, 300):
            x = torch.randn(t, h, generator=g).cuda().bfloat16()
            logits = (torch.randn(t, e, generator=g) * 3).cuda()
            ref = full(x, logits).float()
            total = sum(m(x, logits).float() for m in shares)
            err = (total - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-2, (make.__name__, t, err)


def test_planner_takes_expert_parallelism(tmp_path: Path, capsys) -> None:
    """`modelport plan --enable-expert-parallel`: the degrees the engine accepts with experts
    shared out (the number of experts must divide, not their width), the flag in the serve
    command it prints, and no data-parallel replicas beside it."""
    import json

    from modelport.entrypoints.cli import main
    from modelport.planner.parallel import tp_refusal, valid_tp_degrees

    wide = cfg("mixtral", intermediate_size=99)
    assert valid_tp_degrees(wide) == [1]
    assert valid_tp_degrees(wide, expert_parallel=True) == [1, 2]
    assert tp_refusal(wide, 2, expert_parallel=True) is None
    assert "number of experts (3)" in tp_refusal(cfg("mixtral", num_local_experts=3), 2, True)
    d = make_tiny_moe_dir(tmp_path / "m", "mixtral", intermediate_size=99)
    base = ["plan", "--model", str(d), "--gpu", "h100-80gb", "--num-gpus", "2",
            "--max-model-len", "256", "--max-num-seqs", "4"]
    assert main([*base, "--json"]) == 2  # sliced experts: 99 channels do not split in two
    assert "intermediate_size=99" in capsys.readouterr().err
    assert main([*base, "--enable-expert-parallel", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parallelism"]["valid_tensor_parallel_sizes"] == [1, 2]
    assert "--tensor-parallel-size 2 --enable-expert-parallel" in out["serve_command"]
    assert main([*base, "-tp", "1", "-ep", "--json"]) == 2
    assert "--enable-expert-parallel" in capsys.readouterr().err
