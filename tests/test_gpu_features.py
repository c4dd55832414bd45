"""Features added on the CPU path, checked on CUDA: embeddings (the pooling runner, bf16
against the fp32 CPU vectors) and structured outputs (a grammar request batched with plain
ones under CUDA graphs and async scheduling, which must leave the plain ones unchanged)."""

from __future__ import annotations

import gc
import re

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir

pytestmark = pytest.mark.gpu

PROMPTS = ["hello world", "an embedding of a much longer prompt, " * 3, "x", "short one"]
REGEX = r"[a-c]{4}-[0-9]{3}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("gpuf") / "m", hidden_size=256,
                               num_heads=4, num_kv_heads=1, intermediate_size=512,
                               num_layers=3)


def _llm(model_dir, device: str, **kw):
    from modelport import LLM

    if device == "cuda":
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.3)
    else:
        kw.update(kv_cache_memory=16 << 20)
    return LLM(str(model_dir), device=device, max_model_len=512, block_size=16,
               max_num_batched_tokens=64, **kw)


@pytest.fixture(autouse=True)
def _free_cuda_memory():
    # each test's engines hold a share of the GPU (gpu_memory_utilization): release it before
    # the next test's engine sizes its KV cache from what is free
    yield
    gc.collect()
    torch.cuda.empty_cache()


def test_embeddings_on_cuda_match_the_cpu_vectors(model_dir):
    llm = _llm(model_dir, "cuda", runner="pooling")
    gpu = llm.embed(PROMPTS)
    del llm
    cpu = _llm(model_dir, "cpu", runner="pooling").embed(PROMPTS)
    for g, c in zip(gpu, cpu, strict=True):
        a = torch.tensor(g.outputs.embedding)
        b = torch.tensor(c.outputs.embedding)
        assert a.shape == b.shape
        assert abs(a.norm().item() - 1.0) < 1e-3
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.995


def test_grammar_request_in_a_graph_batch_leaves_the_others_unchanged(model_dir):
    from modelport import SamplingParams, StructuredOutputsParams

    llm = _llm(model_dir, "cuda")
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    guided = SamplingParams(temperature=0, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    outs = llm.generate(PROMPTS + ["guided"], [plain] * len(PROMPTS) + [guided])
    assert [o.outputs[0].token_ids for o in outs[:-1]] == alone
    assert re.fullmatch(REGEX, outs[-1].outputs[0].text), outs[-1].outputs[0].text
    # and the same grammar sampled with a seed, twice: the same text, still in the language
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    a, b = (llm.generate(["guided"], seeded)[0].outputs[0].text for _ in range(2))
    assert a == b and re.fullmatch(REGEX, a), a


def test_kv_cache_memory_sizes_the_cuda_cache_as_vllms_kv_cache_memory_bytes(model_dir):
    from modelport import LLM
    from modelport.config import kv_cache_bytes_per_token

    # the tiny model's KV: 3 layers x 1 KV head x 64 dims x 2 (K, V) x 2 bytes (bf16) a token
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=512,
              kv_cache_memory_bytes=4 << 20, block_size=16)
    mc = llm.llm_engine.config.model_config
    per_block = 16 * kv_cache_bytes_per_token(mc, 2)
    assert llm.llm_engine.core.kv.num_blocks == (4 << 20) // per_block
    assert len(llm.generate("hello", use_tqdm=False)[0].outputs[0].token_ids) > 0
    # a second engine in the same process still fits: the first took 4 MiB, not 90 %
    second = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=512,
                 kv_cache_memory=4 << 20)
    assert second.llm_engine.core.kv.num_blocks == (4 << 20) // per_block
    del llm, second
    gc.collect()
    total = torch.cuda.mem_get_info()[1]
    with pytest.raises(ValueError, match="does not fit"):
        LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=512,
            kv_cache_memory=2 * total)
