"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against HF transformers.

Tiny random HF models (hidden 64, 8 experts, top-2) are saved with save_pretrained (the
per-expert checkpoint layout) and loaded by our loader; logits, greedy generation through
LLM and batching must match. The CUDA path (Triton grouped GEMM) runs here in the Triton
interpreter and on the GPU machine in the gpu-marked tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import (
    TINY_PROMPT,
    hf_reference_logits,
    run_one_sequence,
)
from helpers.tiny_models import load_cpu_fp32 as load
from helpers.tiny_moe import make_tiny_moe_dir as make_moe_dir
from helpers.tiny_moe import tiny_moe_config as _config
from helpers.triton_interp import PRELUDE as _PRELUDE
from modelport import LLM, SamplingParams
from modelport.config import ModelConfig
from modelport.layers.fused_moe import FusedMoE, moe_reference, route
from modelport.loader import load_model_config, resolve_model
from modelport.models.moe_config import active_params, check_moe_options, moe_spec

ROOT = Path(__file__).resolve().parent.parent
KV_MEM = 8 << 20
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module", params=ARCHS)
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_moe_dir(tmp_path_factory.mktemp(request.param) / "m", request.param)


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """HF generate's greedy continuations, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=258)
            out.append(ids[0, len(p):].tolist())
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


# -- the models ---------------------------------------------------------------------------------

def test_logits_match_hf(moe_dir: Path) -> None:
    model = load(moe_dir)
    arch = json.loads((moe_dir / "config.json").read_text())["architectures"][0]
    layers = model.model.layers
    if arch == "Qwen2MoeForCausalLM":  # shared expert + gate on sparse layers, layer 1 dense
        assert layers[0].mlp.shared_expert is not None and not hasattr(layers[1].mlp, "experts")
        assert layers[0].self_attn.qkv_proj.bias.abs().sum() > 0
    if arch == "Qwen3MoeForCausalLM":
        assert [hasattr(x.mlp, "experts") for x in layers] == [False, True, False, True]
    prompt = TINY_PROMPT[:40]
    ours, ref = run_one_sequence(model, prompt), hf_reference_logits(moe_dir, prompt)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_llm_greedy_matches_hf_and_batching(moe_dir: Path) -> None:
    # a 16-token budget splits the 23-token prompt into prefill chunks; no prefix cache, so
    # the batched run computes every prompt again, several requests in one step
    llm = LLM(str(moe_dir), kv_cache_memory=KV_MEM, max_num_batched_tokens=16, block_size=8,
              enable_prefix_caching=False)
    prompts = [TINY_PROMPT[:23], [5, 9, 200], TINY_PROMPT[30:41]]
    alone = [list(llm.generate({"prompt_token_ids": p}, greedy(8), use_tqdm=False)[0]
                  .outputs[0].token_ids) for p in prompts]
    assert alone == hf_greedy(moe_dir, prompts, 8)
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in batched] == alone
    assert len({tuple(a) for a in alone}) > 1  # the prompts do lead to different tokens


# -- the fused layer ----------------------------------------------------------------------------

def naive_moe(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, renormalize: bool) -> torch.Tensor:
    """One token at a time, straight from the definition."""
    out = torch.zeros_like(x)
    i = w13.shape[1] // 2
    for t in range(x.shape[0]):
        p = torch.softmax(logits[t].double(), -1)
        top = torch.topk(p, top_k)
        weights = top.values / top.values.sum() if renormalize else top.values
        for wt, e in zip(weights, top.indices.tolist()):
            h = w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:i]) * h[i:]
            out[t] += (wt * (w2[e].double() @ act)).to(x.dtype)
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_reference_matches_naive_loop(renormalize: bool) -> None:
    g = torch.Generator().manual_seed(1)
    moe = FusedMoE(num_experts=6, top_k=3, hidden_size=32, intermediate_size=24,
                   renormalize=renormalize)
    moe.w13.weight.data = torch.randn(6, 48, 32, generator=g) * 0.2
    moe.w2.weight.data = torch.randn(6, 32, 24, generator=g) * 0.2
    x, logits = torch.randn(11, 32, generator=g), torch.randn(11, 6, generator=g) * 3
    ref = naive_moe(x, logits, moe.w13.weight, moe.w2.weight, 3, renormalize)
    torch.testing.assert_close(moe(x, logits), ref, atol=1e-5, rtol=1e-5)
    w, ids = route(logits, 3, renormalize)
    assert ids.shape == (11, 3) and torch.allclose(w.sum(-1), torch.ones(11)) == renormalize


def test_expert_weight_loading_checks_shards() -> None:
    moe = FusedMoE(num_experts=2, top_k=1, hidden_size=8, intermediate_size=4, renormalize=True)
    up = torch.full((4, 8), 3.0)
    moe.w13.weight_loader(moe.w13.weight, up, "1.up")
    assert torch.equal(moe.w13.weight[1, 4:], up)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe.w13.weight_loader(moe.w13.weight, torch.zeros(5, 8), "0.gate")
    with pytest.raises(ValueError, match="no shard '2.gate'"):
        moe.w13.weight_loader(moe.w13.weight, torch.zeros(4, 8), "2.gate")


def test_missing_expert_tensor_is_reported(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = make_moe_dir(tmp_path / "m", "mixtral")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights for model\.layers\.1\.block_sparse_moe"
                                         r"\.experts\.w13\.weight"):
        load(d)


# -- unsupported options ------------------------------------------------------------------------

def test_unsupported_options_are_refused_at_load(tmp_path: Path) -> None:
    cfg = _config("qwen3_moe")
    spec = moe_spec(cfg)
    assert spec is not None and spec.sparse_layers == {1, 3} and spec.renormalize
    assert moe_spec(_config("mixtral")).renormalize  # Mixtral always renormalises
    check_moe_options(cfg, quantization="awq")
    # quantized experts split over ranks as float ones (tests/test_moe_tensor_parallel_quant.py)
    check_moe_options(cfg, quantization="awq", tensor_parallel_size=2)
    check_moe_options(cfg, tensor_parallel_size=2)  # tests/test_moe_tensor_parallel.py
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide intermediate_size"):
        check_moe_options(cfg, tensor_parallel_size=3)  # the dense layers' 128
    with pytest.raises(ValueError, match="enable_lora is not supported for MoE"):
        check_moe_options(cfg, enable_lora=True)
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        moe_spec(_config("mixtral", hidden_act="gelu"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_spec(_config("qwen2_moe", num_experts_per_tok=9))
    d = make_moe_dir(tmp_path / "m", "mixtral")
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide num_attention_heads"):
        LLM(str(d), tensor_parallel_size=3, kv_cache_memory=KV_MEM)  # 96 % 3 == 0, 4 heads
    with pytest.raises(ValueError, match="enable_lora is not supported for MoE"):
        LLM(str(d), enable_lora=True, kv_cache_memory=KV_MEM)
    src = resolve_model(str(d))  # the loader itself, under the engine's check
    from modelport.quantization.loading import resolve_quantization

    with pytest.raises(ValueError, match=r"\(bitsandbytes\) MoE experts are not supported on CUDA"):
        resolve_quantization("bitsandbytes", src, load_model_config(src), "cuda",
                             load_format="dummy")  # FP8 / AWQ / GPTQ: test_moe_quantized_cuda
    cfg_path = d / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "sliding_window": 16}))
    with pytest.raises(ValueError, match="Mixtral with sliding_window=16 is not supported"):
        load(d)


def test_transformers5_stacked_layout_loads(tmp_path: Path) -> None:
    # a checkpoint written from transformers 5's modules as they are (experts.gate_up_proj
    # [E, 2I, H], experts.down_proj [E, H, I]) loads into the same model as the per-expert one
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    per_expert = make_moe_dir(tmp_path / "a", "qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32,
                                              local_files_only=True)
    stacked = tmp_path / "b"
    stacked.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, stacked / "model.safetensors", metadata={"format": "pt"})
    (stacked / "config.json").write_text((per_expert / "config.json").read_text())
    a, b = load(per_expert), load(stacked)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_moe_gguf_is_refused_without_the_moe_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MoE GGUFs load (tests/test_loader_gguf_archs.py); were models/moe.py not importable,
    they get this clear refusal."""
    import gguf
    import numpy as np

    monkeypatch.setitem(sys.modules, "modelport.models.moe", None)  # its import fails

    path = tmp_path / "mixtral-8x1.gguf"  # llama.cpp writes Mixtral as "llama" + expert_count
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_expert_count(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"mixture-of-experts GGUF files \(llama\.expert_count=8"):
        load_model_config(resolve_model(str(path)))


def test_planner_counts_every_expert(moe_dir: Path) -> None:
    from modelport.planner.weights import WeightFormat, estimate_weights

    cfg = load_model_config(resolve_model(str(moe_dir)))
    model = load(moe_dir)
    # the planner does not list attention biases (Qwen2-MoE's q/k/v) or q/k norms (Qwen3)
    skipped = sum(p.numel() for n, p in model.named_parameters()
                  if n.endswith(("qkv_proj.bias", "q_norm.weight", "k_norm.weight")))
    total = sum(p.numel() for p in model.parameters())
    assert estimate_weights(cfg, WeightFormat("bf16")).num_params == total - skipped
    # FLOPs count a token's path only: router, top-2 of 8 experts, shared expert
    spec = moe_spec(cfg)
    per_expert = 3 * cfg.hidden_size * spec.expert_intermediate_size
    idle = (spec.num_experts - spec.top_k) * per_expert * len(spec.sparse_layers)
    assert active_params(cfg) == total - idle  # num_params counts every weight
    assert cfg.num_params == total


def test_planner_sizes_real_moe_shapes() -> None:
    from modelport.planner.weights import WeightFormat, estimate_weights

    mixtral = ModelConfig.from_hf_dict(dict(
        architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2))
    qwen3 = ModelConfig.from_hf_dict(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True))
    # Mixtral-8x7B: 46.7B parameters, 12.9B active; Qwen3-30B-A3B: 30.5B, 3.3B active
    for cfg, total, active in ((mixtral, 46.70, 12.88), (qwen3, 30.53, 3.35)):
        n = estimate_weights(cfg, WeightFormat("bf16")).num_params
        assert round(n / 1e9, 2) == total and round(active_params(cfg) / 1e9, 2) == active


def test_planner_refuses_what_moe_refuses(moe_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from modelport.entrypoints.cli import main

    base = ["plan", "--model", str(moe_dir), "--gpu", "h100-80gb"]
    assert main(base) == 0
    out = capsys.readouterr().out
    advice = out.split("serve command")[0]  # quantized MoE on CUDA: FP8 / AWQ / GPTQ only
    assert "--quantization fp8" in advice and "--quantization gguf" not in advice
    assert main([*base, "--num-gpus", "2"]) == 0  # experts split over 2 ranks
    assert "--tensor-parallel-size 2" in capsys.readouterr().out
    assert main([*base, "--num-gpus", "2", "--tensor-parallel-size", "1"]) == 0  # 2 replicas
    capsys.readouterr()
    assert main([*base, "--quantization", "fp8"]) == 0  # FP8 experts run on CUDA
    capsys.readouterr()
    assert main([*base, "--quantization", "gguf-q4_k_m"]) == 2
    assert "quantized (gguf-q4_k_m) experts run on CPU only" in capsys.readouterr().err


# -- the Triton kernel, in the interpreter and compiled for sm_90 -------------------------------


_KERNEL = textwrap.dedent("""
    import torch
    from modelport.layers import triton_moe as tm
    from modelport.layers.fused_moe import moe_reference, route

    g = torch.Generator().manual_seed(0)
    # (tokens, experts, top_k, hidden, intermediate): K and N not multiples of the tiles,
    # more tokens than one block, an expert nobody picks, a single token
    # (float32: the "ieee" dot of float32 models)
    for t, e, k, h, i, bm, dt in [(5, 4, 2, 64, 96, None, torch.half),
                                  (40, 8, 2, 80, 48, None, torch.half),
                                  (1, 8, 3, 64, 40, None, torch.half),
                                  (70, 3, 1, 64, 32, 64, torch.half),
                                  (33, 8, 2, 64, 64, 16, torch.float32)]:
        x = torch.randn(t, h, generator=g).to(dt)
        w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.1).to(dt)
        w2 = (torch.randn(e, h, i, generator=g) * 0.1).to(dt)
        logits = torch.randn(t, e, generator=g) * 3
        logits[:, 0] = -1e4  # expert 0 gets no token
        w, ids = route(logits, k, k > 1)
        if bm is not None:
            tm.block_m_for = lambda m, n, bm=bm: bm
        y = tm.fused_experts(x, w13, w2, w, ids, block_n=32, block_k=32)
        ref = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        tol = 2e-3 if dt == torch.half else 1e-5
        assert y.dtype == dt and y.shape == (t, h) and err < tol, (t, e, k, err)
        print("ok moe", t, e, k, f"{err:.1e}")
""")


def test_align_pads_each_expert_to_whole_blocks() -> None:
    pytest.importorskip("triton")
    from modelport.layers import triton_moe as tm

    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 unused
    rows, block_expert = tm.align(ids, num_experts=4, block_m=4)
    m = ids.numel()
    assert block_expert.numel() == -(-m // 4) + 4  # the worst case, whatever the routing
    assert block_expert.tolist()[:3] == [0, 2, 3] and set(block_expert.tolist()[3:]) == {-1}
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()[:3]):
        block = [r for r in rows[4 * b:4 * b + 4].tolist() if r != m]
        assert block and all(flat[r] == e for r in block)
    assert sorted(r for r in rows.tolist() if r != m) == list(range(m))


_MODEL = textwrap.dedent("""
    import sys
    import torch
    from modelport.config import LoadConfig
    from modelport.layers import fused_moe, triton_moe
    from modelport.loader import load_model, load_model_config, resolve_model
    sys.path.insert(0, sys.argv[2])
    from helpers.tiny_models import TINY_PROMPT, run_one_sequence

    src = resolve_model(sys.argv[1])
    model = load_model(src, load_model_config(src), LoadConfig(), torch.float32,
                       torch.device("cpu"))
    prompt = TINY_PROMPT[:24]
    ref = run_one_sequence(model, prompt)  # the torch reference experts
    def triton_forward(self, x, router_logits):  # what FusedMoE runs on CUDA
        w, ids = fused_moe.route(router_logits, self.top_k, self.renormalize)
        return triton_moe.fused_experts(x, self.w13.weight, self.w2.weight, w, ids)
    fused_moe.FusedMoE.forward = triton_forward
    got = run_one_sequence(model, prompt)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    print("ok model")
""")


def test_triton_moe_kernel_matches_reference_in_interpreter(tmp_path: Path) -> None:
    # the kernel on its own (5 shapes), then a whole Qwen2-MoE (shared expert, a dense layer)
    # whose experts run the CUDA path: the same logits as the torch reference experts
    pytest.importorskip("triton")
    model_dir = make_moe_dir(tmp_path / "m", "qwen2_moe")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", _PRELUDE + _KERNEL + _MODEL, str(model_dir),
                        str(ROOT / "tests")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok moe") == 5 and "ok model" in p.stdout


def test_triton_moe_kernel_compiles_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import kernel_regs

    from modelport.layers import triton_moe as tm

    for gated, bm, dt in ((True, 16, "bf16"), (False, 64, "bf16"), (True, 16, "fp32")):
        sig = dict(a_ptr=f"*{dt}", w_ptr=f"*{dt}", out_ptr=f"*{dt}", sorted_ptr="*i32",
                   block_expert_ptr="*i32", weight_ptr="*fp32", N="i32", K="i32",
                   num_rows="i32", stride_am="i32", stride_we="i32", stride_wn="i32",
                   stride_om="i32")
        const = dict(TOP_K=2 if gated else 1, GATED=gated, MUL_WEIGHT=not gated,
                     PRECISION="ieee" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=64,
                     BLOCK_K=64)
        r = kernel_regs.compile_sm90(tm.moe_gemm_kernel, sig, const,
                                     ("a_ptr", "w_ptr", "out_ptr", "K", "stride_am"), 4, 2)
        assert 0 < r["regs"] <= 255 and r["sass_instr"] > 100 and r["programs_per_sm"] >= 1, r


# -- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fused_moe_matches_reference_and_graph_capture() -> None:
    from modelport.layers import triton_moe as tm

    g = torch.Generator().manual_seed(0)
    for t in (1, 7, 300):
        x = torch.randn(t, 128, generator=g).bfloat16()
        w13 = (torch.randn(8, 2 * 96, 128, generator=g) * 0.1).bfloat16()
        w2 = (torch.randn(8, 128, 96, generator=g) * 0.1).bfloat16()
        w, ids = route(torch.randn(t, 8, generator=g) * 3, 2, True)
        ref = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
        dev = [a.cuda() for a in (x, w13, w2, w, ids)]
        y = tm.fused_experts(*dev)
        assert ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item() < 2e-2
        # captured once, replayed with a different routing: the static shapes still hold
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            tm.fused_experts(*dev)  # warm-up (compiles) off the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = tm.fused_experts(*dev)
        w2_, ids2 = route(torch.randn(t, 8, generator=g) * 3, 2, True)
        dev[3].copy_(w2_.cuda())
        dev[4].copy_(ids2.cuda())
        graph.replay()
        ref2 = moe_reference(x.float(), w13.float(), w2.float(), w2_, ids2)
        assert ((out.float().cpu() - ref2).abs().max() / ref2.abs().max()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_model_matches_hf_and_graphs_match_eager(tmp_path: Path, arch: str) -> None:
    d = make_moe_dir(tmp_path / arch, arch)
    prompts = [TINY_PROMPT[:23], [5, 9, 200], TINY_PROMPT[30:41]]

    def tokens(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8),
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # float32 on the GPU (the Triton experts with exact float32 dots) gives HF's tokens
    fp32 = LLM(str(d), device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    assert tokens(fp32) == hf_greedy(d, prompts, 8)
    del fp32
    torch.cuda.empty_cache()
    # bfloat16: decode replayed from CUDA graphs (the experts captured) equals eager
    runs = {}
    for eager in (True, False):
        llm = LLM(str(d), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3,
                  max_model_len=512, enforce_eager=eager)
        assert (llm.llm_engine.core.runner.graphs is None) == eager
        runs[eager] = tokens(llm)
        del llm
        torch.cuda.empty_cache()
    assert runs[True] == runs[False]
