"""OLMoE and GraniteMoE against HF transformers.

Tiny random HF models (tests/helpers/tiny_moe.py: hidden 64, 8 experts, top-2) saved with
save_pretrained: OLMoE per expert with q/k norms over the whole projections, GraniteMoE with
its experts stacked (input_linear / output_linear) and Granite's four multipliers set away
from 1. Logits and greedy generation through LLM (alone and batched) must match HF's fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import TINY_PROMPT, hf_reference_logits, run_one_sequence
from helpers.tiny_models import load_cpu_fp32 as load
from helpers.tiny_moe import make_tiny_moe_dir as make_moe_dir
from helpers.tiny_moe import tiny_moe_config
from modelport import LLM
from modelport.models.moe_config import moe_spec
from test_models_moe import greedy, hf_greedy

KV_MEM = 8 << 20
ARCHS = ("olmoe", "granitemoe")
PROMPTS = [TINY_PROMPT[:23], [5, 9, 200], TINY_PROMPT[30:41]]


@pytest.fixture(scope="module", params=ARCHS)
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_moe_dir(tmp_path_factory.mktemp(request.param) / "m", request.param)


def test_logits_match_hf(moe_dir: Path) -> None:
    model = load(moe_dir)
    layer = model.model.layers[0]
    if type(model).__name__ == "OlmoeForCausalLM":  # norms over all heads, loaded (not ones)
        assert layer.self_attn.q_norm.weight.shape == (64,)
        assert layer.self_attn.k_norm.weight.shape == (32,)
        assert not torch.all(layer.self_attn.k_norm.weight == 1)
    else:
        assert layer.self_attn.attn.scale == 0.05 and layer.residual_multiplier == 0.3
        assert model.model.embedding_multiplier == 6.0 and model.lm_head.logits_scaling == 4.0
        assert layer.block_sparse_moe.gate.weight.abs().sum() > 0
    prompt = TINY_PROMPT[:40]
    ours, ref = run_one_sequence(model, prompt), hf_reference_logits(moe_dir, prompt)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_llm_greedy_matches_hf_and_batching(moe_dir: Path) -> None:
    # a 16-token budget splits the 23-token prompt into prefill chunks
    llm = LLM(str(moe_dir), kv_cache_memory=KV_MEM, max_num_batched_tokens=16, block_size=8,
              enable_prefix_caching=False)
    alone = [list(llm.generate({"prompt_token_ids": p}, greedy(10), use_tqdm=False)[0]
                  .outputs[0].token_ids) for p in PROMPTS]
    assert alone == hf_greedy(moe_dir, PROMPTS, 10)
    batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(10),
                           use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in batched] == alone
    assert len({tuple(a) for a in alone}) > 1


def test_moe_specs() -> None:
    olmoe = moe_spec(tiny_moe_config("olmoe"))
    assert olmoe is not None
    assert (olmoe.num_experts, olmoe.top_k, olmoe.expert_intermediate_size) == (8, 2, 48)
    assert not olmoe.renormalize and olmoe.sparse_layers == {0, 1}
    assert moe_spec(tiny_moe_config("olmoe", norm_topk_prob=True)).renormalize  # type: ignore[union-attr]
    granite = moe_spec(tiny_moe_config("granitemoe"))
    assert granite is not None and granite.renormalize  # softmax over the top-k logits
    assert (granite.num_experts, granite.expert_intermediate_size) == (8, 48)


def test_olmoe_clip_qkv_is_refused() -> None:
    from modelport.models.moe import OlmoeForCausalLM

    with pytest.raises(ValueError, match="clip_qkv=8.0 is not supported"):
        OlmoeForCausalLM(tiny_moe_config("olmoe", clip_qkv=8.0))


def test_granitemoe_transformers5_names_load(tmp_path: Path) -> None:
    # transformers 5's in-memory names (router.weight, experts.gate_up_proj / down_proj),
    # as a checkpoint written from its state dict would carry them
    from safetensors.torch import save_file

    src = make_moe_dir(tmp_path / "a", "granitemoe")
    dst = tmp_path / "b"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.block_sparse_moe.router.weight" in state
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in state
    save_file(state, str(dst / "model.safetensors"))
    prompt = TINY_PROMPT[:20]
    torch.testing.assert_close(run_one_sequence(load(dst), prompt),
                               run_one_sequence(load(src), prompt), atol=0, rtol=0)


def test_granitemoe_quantization_is_refused(tmp_path: Path) -> None:
    d = make_moe_dir(tmp_path / "g", "granitemoe")
    with pytest.raises(ValueError, match="GraniteMoE .*quantized checkpoints are not supported"):
        LLM(str(d), kv_cache_memory=KV_MEM, quantization="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_model_matches_hf_and_graphs_match_eager(tmp_path: Path, arch: str) -> None:
    d = make_moe_dir(tmp_path / arch, arch)

    def tokens(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(8),
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    fp32 = LLM(str(d), device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    assert tokens(fp32) == hf_greedy(d, PROMPTS, 8)
    del fp32
    torch.cuda.empty_cache()
    runs = {}
    for eager in (True, False):
        llm = LLM(str(d), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3,
                  max_model_len=512, enforce_eager=eager)
        assert (llm.llm_engine.core.runner.graphs is None) == eager
        runs[eager] = tokens(llm)
        del llm
        torch.cuda.empty_cache()
    assert runs[True] == runs[False]
