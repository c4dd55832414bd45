"""Expert parallelism (``enable_expert_parallel``, vLLM's ``--enable-expert-parallel``): the
tensor-parallel ranks share out an MoE model's experts, whole, instead of slicing every expert
(parallel/moe_parallel.py). Each rank's block output is a partial sum over the experts it
holds; the ranks' sums equal the unsharded block, and TP=2 with experts shared out gives
TP=1's greedy tokens and logprobs (CPU ranks on gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import load_cpu_fp32 as _load
from helpers.tiny_moe import make_tiny_moe_dir
from helpers.tiny_moe import tiny_moe_config as cfg
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.engine.arg_utils import EngineArgs
from modelport.entrypoints.openai.api_server import engine_args_from, make_parser
from modelport.layers.fused_moe import FusedMoE
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.models.moe_config import check_moe_options
from modelport.parallel.moe_parallel import shard_experts, sharded_at_build
from modelport.parallel.tensor_parallel import shard_model
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


def test_experts_load_as_the_rank_share(moe_dir: Path, tmp_path: Path) -> None:
    """A rank's own load builds its share of the experts and skips the other rank's tensors:
    per-expert and (Qwen) stacked checkpoints give a whole load's weights sharded after."""
    dirs = [moe_dir]
    if "qwen" in str(moe_dir):
        dirs.append(_stacked_copy(moe_dir, tmp_path / "stacked"))
    for rank in range(2):
        after = _load(moe_dir)
        shard_model(after, rank, 2, expert_parallel=True)
        want = dict(after.named_parameters())
        for d in dirs:
            src = resolve_model(str(d))
            with sharded_at_build(rank, 2, expert_parallel=True):
                got = load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                                 torch.device("cpu"),
                                 transform=partial(shard_model, rank=rank, size=2,
                                                   expert_parallel=True))
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
    check_moe_options(cfg("mixtral"), tensor_parallel_size=1, expert_parallel=True,
                      quantization="awq")  # one rank: nothing to share out
    with pytest.raises(ValueError, match="does not take quantized MoE experts"):
        check_moe_options(cfg("mixtral"), tensor_parallel_size=2, expert_parallel=True,
                          quantization="awq")
    d = make_tiny_moe_dir(tmp_path / "m", "mixtral")
    with pytest.raises(ValueError, match="data-parallel replicas are independent engines"):
        EngineArgs(model=str(d), tensor_parallel_size=2, data_parallel_size=2,
                   enable_expert_parallel=True).create_engine_config()
    with pytest.raises(ValueError, match="does not take quantized MoE experts"):
        EngineArgs(model=str(d), tensor_parallel_size=2, enable_expert_parallel=True,
                   quantization="fp8", device="cpu").create_engine_config()
    # the sharding itself: mixed layouts and per-expert (quantized) layers are refused
    experts = FusedMoE(8, 2, 64, 32, True)
    shard_experts("e", experts, 1, 2, expert_parallel=True)
    with pytest.raises(RuntimeError, match="built for rank 1 of 2"):
        shard_experts("e", experts, 0, 2, expert_parallel=True)
    with pytest.raises(RuntimeError, match="sharded without it"):
        shard_experts("e", experts, 1, 2)
    quantized = FusedMoE(8, 2, 64, 32, True)
    quantized.unstack()
    with pytest.raises(ValueError, match="does not take quantized MoE experts"):
        shard_experts("e", quantized, 0, 2, expert_parallel=True)
    with pytest.raises(ValueError, match="not within"):
        FusedMoE(4, 2, 64, 32, True).set_expert_range(6, 8)


def test_cli_flag_reaches_the_engine_args() -> None:
    for argv in (["--enable-expert-parallel"], ["-ep"]):
        args = make_parser().parse_args(["--model", "/m", "-tp", "2", *argv])
        assert engine_args_from(args).enable_expert_parallel is True
    assert engine_args_from(make_parser().parse_args(["--model", "/m"])).enable_expert_parallel \
        is False


_TRITON_SHARES = _PRELUDE + textwrap.dedent("""
    import copy
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import FusedMoE, moe_reference, route
    from modelport.parallel.moe_parallel import shard_experts

    g = torch.Generator().manual_seed(0)
    # 32 and 18 assignments take the few-token GEMVs, 90 the grouped GEMM
    for t, e, k, h, i, size in [(16, 8, 2, 64, 96, 2), (9, 8, 2, 64, 80, 4), (45, 8, 2, 64, 64, 2)]:
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
