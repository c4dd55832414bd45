"""The opt-in L2 weight prefetch of decode layers (layers/l2_prefetch.py): its settings, the
layer swap, and that the prefetching layer computes exactly what the plain layer does
(on CPU with the prefetch a no-op; on CUDA with the side-stream kernels, eager and in CUDA
graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import TINY_PROMPT, make_tiny_llama_dir
from modelport.config import LoadConfig
from modelport.layers import l2_prefetch
from modelport.layers.attention import (
    ForwardContext,
    build_single_sequence_metadata,
    forward_context,
)
from modelport.loader import load_model, load_model_config, resolve_model


@pytest.fixture
def plan_env(monkeypatch):
    def set_env(**env: str) -> None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        l2_prefetch.settings.cache_clear()

    yield set_env
    l2_prefetch.settings.cache_clear()


def test_plan_names_stages_and_targets() -> None:
    assert l2_prefetch.parse_plan("attn:o, down:next_qkv,attn:gate_up") == {
        "attn": ("o", "gate_up"), "down": ("next_qkv",)}
    assert l2_prefetch.parse_plan("") == {}
    for bad in ("attn", "attn:lm_head", "mlp:o", "attn=o"):
        with pytest.raises(ValueError, match="is not stage:target"):
            l2_prefetch.parse_plan(bad)


def test_bad_kind_or_size_is_a_clear_error(plan_env) -> None:
    plan_env(MODELPORT_L2_PREFETCH="attn:o", MODELPORT_L2_PREFETCH_KIND="dma")
    with pytest.raises(ValueError, match="KIND must be one of bulk, load"):
        l2_prefetch.settings()
    plan_env(MODELPORT_L2_PREFETCH_KIND="load", MODELPORT_L2_PREFETCH_MB="lots")
    with pytest.raises(ValueError, match="MODELPORT_L2_PREFETCH_MB"):
        l2_prefetch.settings()
    plan_env(MODELPORT_L2_PREFETCH_MB="1.5", MODELPORT_L2_PREFETCH_ROWS="4")
    assert l2_prefetch.settings() == ({"attn": ("o",)}, 3 * 2**19, "load", 4)


def _model(tmp_path: Path, num_layers: int = 3):
    src = resolve_model(str(make_tiny_llama_dir(tmp_path / "m", num_layers=num_layers)))
    cfg = load_model_config(src)
    return load_model(src, cfg, LoadConfig(), torch.float32, torch.device("cpu")), cfg


def test_swap_chains_the_layers_without_new_submodules(tmp_path, plan_env) -> None:
    model, _ = _model(tmp_path)
    keys = list(model.state_dict())
    plan_env(MODELPORT_L2_PREFETCH="")
    assert l2_prefetch.use_l2_prefetch(model) == 0
    plan_env(MODELPORT_L2_PREFETCH="attn:o")
    assert l2_prefetch.use_l2_prefetch(model) == 3
    layers = list(model.model.layers)
    assert all(type(x) is l2_prefetch.PrefetchLlamaLayer for x in layers)
    assert [x._next_layer for x in layers] == [layers[1], layers[2], None]
    assert list(model.state_dict()) == keys  # the next layer is not registered as a child


def _forward(model, cfg, ids: list[int]) -> torch.Tensor:
    bs, t = 16, len(ids)
    kv = [torch.zeros(2, -(-t // bs), bs, cfg.num_key_value_heads, cfg.head_dim)
          for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad(), forward_context(ForwardContext(build_single_sequence_metadata(t, bs),
                                                         kv)):
        return model(torch.tensor(ids), torch.arange(t))


def test_prefetching_layer_computes_what_the_plain_layer_does(tmp_path, plan_env,
                                                               monkeypatch) -> None:
    """The prefetching forward is its own copy of the layer's steps; with every stage
    prefetching (a no-op on CPU tensors) it gives the plain layer's hidden states, bit for
    bit."""
    from modelport.layers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # the module tree, not the C step
    model, cfg = _model(tmp_path)
    ids = TINY_PROMPT[:23]
    plain = _forward(model, cfg, ids)
    plan_env(MODELPORT_L2_PREFETCH=",".join(f"{s}:{t}" for s, t in zip(
        l2_prefetch.STAGES, ("o", "o", "o", "gate_up", "gate_up", "down", "down", "next_qkv"))))
    l2_prefetch.use_l2_prefetch(model)
    calls = []
    monkeypatch.setattr(l2_prefetch, "_applies", lambda x, rows: calls.append(x.shape) or True)
    got = _forward(model, cfg, ids)
    assert len(calls) == cfg.num_hidden_layers  # every layer took the prefetching code
    torch.testing.assert_close(got, plain, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bulk", "load"])
def test_prefetch_kernels_read_only_and_replay_in_a_graph(kind) -> None:
    from modelport.layers import triton_l2_prefetch as k

    fn = k.bulk_prefetch if kind == "bulk" else k.load_prefetch
    w = torch.randn(3000, 1000, device="cuda", dtype=torch.bfloat16)  # 6,000,000 bytes
    before = w.clone()
    fn(w, 6_000_000 // 16 * 16)
    fn(w, 4096)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # captured off the default stream, as the runner does
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(w, 1_000_000 // 16 * 16)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(w, before)


@pytest.mark.gpu
def test_spans_take_the_largest_tensors_first_up_to_the_cap() -> None:
    lin = torch.nn.Linear(1000, 300, bias=True).cuda()  # weight 1.2 MB, bias 1.2 KB
    assert [(t.shape, n) for t, n in l2_prefetch.spans(lin, 2**21)] == [
        (lin.weight.shape, 1_200_000), (lin.bias.shape, 1200)]
    assert [(t.shape, n) for t, n in l2_prefetch.spans(lin, 100_007)] == [
        (lin.weight.shape, 100_000)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bulk", "load"])
def test_engine_with_prefetch_gives_the_same_bits(tmp_path_factory, plan_env, kind) -> None:
    """Every stage prefetching, eager prefill and CUDA-graph decode of one and several rows:
    the same tokens and top logprobs as without."""
    from modelport import LLM, SamplingParams

    model_dir = make_tiny_llama_dir(tmp_path_factory.mktemp("l2") / "m", hidden_size=256,
                                    num_heads=4, num_kv_heads=1, intermediate_size=512,
                                    num_layers=3)
    prompts = [TINY_PROMPT[:5], TINY_PROMPT[:40], TINY_PROMPT[3:20]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    runs = {}
    for on in (True, False):
        plan = "norm1:o,qkv:o,attn:gate_up,norm2:down,down:next_qkv" if on else ""
        plan_env(MODELPORT_L2_PREFETCH=plan, MODELPORT_L2_PREFETCH_KIND=kind,
                 MODELPORT_L2_PREFETCH_ROWS="4")
        llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=256,
                  block_size=16, gpu_memory_utilization=0.3, max_num_batched_tokens=64)
        layers = llm.llm_engine.core.runner.model.model.layers
        assert (type(layers[0]) is l2_prefetch.PrefetchLlamaLayer) == on
        outs = [llm.generate(prompt_token_ids=[p], sampling_params=params, use_tqdm=False)[0]
                for p in prompts]
        outs += llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        runs[on] = [(o.outputs[0].token_ids,
                     [{t: (lp.logprob, lp.rank) for t, lp in d.items()}
                      for d in o.outputs[0].logprobs]) for o in outs]
        del llm
        torch.cuda.empty_cache()
    assert [len(t) for t, _ in runs[True]] == [10] * 6
    assert runs[True] == runs[False]
