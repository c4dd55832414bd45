"""The engine on CUDA: greedy tokens equal to HF transformers in bf16, CUDA-graph replay equal
to eager, and KV sizing that refuses clearly instead of running out of memory later."""

from __future__ import annotations

import weakref

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir

pytestmark = pytest.mark.gpu

# ragged prompts: one below a block, several crossing block and chunk boundaries
PROMPTS = [
    [256, 10, 20, 30],
    [256] + list(range(40, 120)),
    [256] + [(13 * i + 7) % 256 for i in range(37)],
    [256, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87, 86, 85],
]
N_NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64 and 4:1 GQA, as the 8B shape has (128, 4:1), but small
    return make_tiny_llama_dir(
        tmp_path_factory.mktemp("gpu") / "m",
        hidden_size=256,
        num_heads=4,
        num_kv_heads=1,
        intermediate_size=512,
        num_layers=3,
    )


def _llm(model_dir, **kw):
    from modelport import LLM

    kw.setdefault("gpu_memory_utilization", 0.3)
    kw.setdefault("max_num_batched_tokens", 64)
    return LLM(
        str(model_dir),
        device="cuda",
        dtype="bfloat16",
        max_model_len=512,
        block_size=16,
        **kw,
    )


def _greedy(n: int = N_NEW, **kw):
    from modelport import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def _hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, local_files_only=True, attn_implementation="sdpa"
        )
        .cuda()
        .eval()
    )
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=258,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def _runner(llm):
    return llm.llm_engine.core.runner


def _assert_same_bits(runs_a, runs_b, n_new: int) -> None:
    """Same tokens and the same top logprobs (float values and ranks) at every position."""
    assert len(runs_a) == len(runs_b)
    for a, b in zip(runs_a, runs_b):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in a.outputs[0].logprobs]
        lb = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in b.outputs[0].logprobs]
        assert len(la) == n_new and la == lb


def test_triton_backend_graphs_and_fused_ops_are_in_use(model_dir):
    from modelport.layers import fused_ops, triton_attention

    llm = _llm(model_dir)
    llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=_greedy(3), use_tqdm=False)
    runner = _runner(llm)
    assert runner.graphs is not None and runner.graphs.graphs
    layers = runner.model.model.layers
    assert all(
        lyr.self_attn.attn.backend is triton_attention.triton_paged_attention for lyr in layers
    )
    assert isinstance(layers[0].input_layernorm, fused_ops.FusedRMSNorm)
    # single-row decode linears run the Triton GEMV (batches of 2+ stay on cuBLAS)
    assert type(layers[0].self_attn.qkv_proj).__name__ == "GemvQKVLinear"


def test_single_stream_greedy_matches_hf_bf16(model_dir):
    """One request at a time: every decode step takes the fused single-row layer path."""
    llm = _llm(model_dir)
    for prompt in PROMPTS[1:3]:
        got = llm.generate(prompt_token_ids=[prompt], sampling_params=_greedy(),
                           use_tqdm=False)[0].outputs[0].token_ids
        assert got[:8] == _hf_greedy(model_dir, prompt, N_NEW)[:8], (prompt[:5], got)


def test_fused_decode_layers_equal_unfused(model_dir, monkeypatch):
    """Fused single-row layers (norm/SiLU/residual inside the GEMVs) against the unfused
    kernels: same greedy tokens, top logprobs within bf16 rounding."""
    params = _greedy(16, logprobs=2)
    runs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MODELPORT_FUSED_DECODE", mode)
        llm = _llm(model_dir)
        layers = _runner(llm).model.model.layers
        assert (type(layers[0]).__name__ == "FusedDecodeLlamaLayer") == (mode == "1")
        runs[mode] = [llm.generate(prompt_token_ids=[p], sampling_params=params,
                                   use_tqdm=False)[0].outputs[0] for p in PROMPTS]
        del llm
        torch.cuda.empty_cache()
    for a, b in zip(runs["1"], runs["0"]):
        assert a.token_ids[:8] == b.token_ids[:8]
        for da, db in zip(a.logprobs[:8], b.logprobs[:8]):
            for t, lp in da.items():
                if t in db:
                    assert abs(lp.logprob - db[t].logprob) < 0.05


def test_greedy_matches_hf_bf16(model_dir):
    llm = _llm(model_dir)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy(), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        want = _hf_greedy(model_dir, prompt, N_NEW)
        got = out.outputs[0].token_ids
        assert got[:8] == want[:8], (prompt[:5], got, want)


def test_cuda_graph_replay_equals_eager(model_dir):
    params = _greedy(N_NEW, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = _llm(model_dir, enforce_eager=eager)
        assert (_runner(llm).graphs is None) == eager
        # 4 equal-length requests: every decode batch is exactly a captured size (4), then 1
        runs[eager] = llm.generate(
            prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False
        ) + llm.generate(prompt_token_ids=PROMPTS[1:2], sampling_params=params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    _assert_same_bits(runs[True], runs[False], N_NEW)


def test_longest_first_decode_batches_replay_equal_eager(model_dir):
    # 32 ragged prompts admitted in one step, so every decode batch is 32 requests, a captured
    # size (the same shapes eager and replayed); from 16 requests on the decode programs are
    # sorted by context length on the device, inside the captured graphs
    from modelport.layers import triton_attention as ta

    prompts = [[256] + [(7 * i + 3 * j) % 250 for j in range(5 + 17 * i % 160)]
               for i in range(32)]
    assert len(prompts) >= 2 * ta.ORDERED_MIN_REQS
    params = _greedy(6, logprobs=1)
    runs = {}
    for eager in (True, False):
        llm = _llm(model_dir, enforce_eager=eager, max_num_batched_tokens=4096)
        runs[eager] = llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                   use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    _assert_same_bits(runs[True], runs[False], 6)


def test_decode_batches_past_the_graph_limit_run_eagerly(model_dir):
    # --cuda-graph-sizes 16: graphs up to 16 rows; the 32-row decode batches run eagerly
    # (the same bits as an eager engine), the 8-row ones replay
    prompts = [[256] + [(5 * i + 3 * j) % 250 for j in range(4 + 9 * i % 70)]
               for i in range(32)]
    params = _greedy(5, logprobs=1)
    runs = {}
    for eager in (True, False):
        llm = _llm(model_dir, enforce_eager=eager, max_num_batched_tokens=4096,
                   cuda_graph_sizes=[16])
        if not eager:
            graphs = _runner(llm).graphs
            assert graphs.max_batch == 16 and max(graphs.graphs) == 16
        runs[eager] = llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                   use_tqdm=False) + \
            llm.generate(prompt_token_ids=prompts[:8], sampling_params=params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    _assert_same_bits(runs[True], runs[False], 5)


def test_rope_in_decode_equals_separate_rotary_and_kv_write(model_dir, monkeypatch):
    from modelport.layers import triton_attention as ta

    params = _greedy(N_NEW, logprobs=2)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(ta, "ROPE_IN_DECODE", fused)
        llm = _llm(model_dir)
        runs[fused] = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                   use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    _assert_same_bits(runs[True], runs[False], N_NEW)


def test_seeded_sampling_on_gpu_is_reproducible_across_batches(model_dir):
    from modelport import SamplingParams

    llm = _llm(model_dir)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=PROMPTS[2:3], sampling_params=p, use_tqdm=False)
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = llm.generate(
        prompt_token_ids=PROMPTS, sampling_params=[other, other, p, other], use_tqdm=False
    )
    assert alone[0].outputs[0].token_ids == mixed[2].outputs[0].token_ids


def test_kv_budget_too_small_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match="max_model_len|KV cache|gpu_memory_utilization"):
        _llm(model_dir, gpu_memory_utilization=0.001)


# ---------------------------------------------------------------------------------------
# fp8 (e4m3) KV cache: the Triton kernels and CUDA graphs serve it too
# ---------------------------------------------------------------------------------------
def test_fp8_kv_cache_runs_on_triton_with_graphs(model_dir):
    from modelport.layers import triton_attention

    llm = _llm(model_dir, kv_cache_dtype="fp8")
    out = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=_greedy(3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    runner = _runner(llm)
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert runner.graphs is not None and runner.graphs.graphs
    for lyr in runner.model.model.layers:
        assert lyr.self_attn.attn.backend is triton_attention.triton_paged_attention
        assert lyr.self_attn.attn._write is triton_attention.write_kv_triton


def test_fp8_kv_cache_greedy_mostly_equals_bf16_cache(model_dir):
    # a tiny random model has near-ties (top-2 logprobs within 0.01), so tokens may part
    # ways; where they do, the fp8 pick must be a near-tie of the bf16 run's choice
    params = _greedy(N_NEW, logprobs=20, prompt_logprobs=0)
    runs = {}
    for kd in ("auto", "fp8"):
        llm = _llm(model_dir, kv_cache_dtype=kd)
        runs[kd] = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    same = 0
    for prompt, a, b in zip(PROMPTS, runs["auto"], runs["fp8"]):
        # teacher-forced prompt logprobs: prefill and prefix reads of the fp8 cache
        for i in range(1, len(prompt)):
            la = a.prompt_logprobs[i][prompt[i]].logprob
            lb = b.prompt_logprobs[i][prompt[i]].logprob
            assert abs(la - lb) < 0.3, (prompt[:3], i, la, lb)
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same += sum(x == y for x, y in zip(ta, tb))
        for i, (x, y) in enumerate(zip(ta, tb)):
            lpa, lpb = a.outputs[0].logprobs[i], b.outputs[0].logprobs[i]
            if x != y:  # first divergence: a near-tie in the bf16 run
                assert y in lpa and lpa[x].logprob - lpa[y].logprob < 0.3, (prompt[:3], i)
                break
            assert abs(lpa[x].logprob - lpb[y].logprob) < 0.3, (prompt[:3], i)
    assert same >= N_NEW * len(PROMPTS) // 2, (same, runs)


def test_fp8_kv_cache_graph_replay_equals_eager(model_dir):
    params = _greedy(N_NEW, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = _llm(model_dir, enforce_eager=eager, kv_cache_dtype="fp8")
        assert (_runner(llm).graphs is None) == eager
        runs[eager] = llm.generate(
            prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False
        ) + llm.generate(prompt_token_ids=PROMPTS[1:2], sampling_params=params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    _assert_same_bits(runs[True], runs[False], N_NEW)


def test_async_scheduling_equals_sync_with_graphs(model_dir):
    from modelport import SamplingParams

    # lengths differ per request, so batches shrink step by step through the graph ladder;
    # length stops are known ahead, so both engines run the same batches and must agree
    # bit for bit (the async engine reads each step's input ids from the previous step's
    # sampled ids on the device)
    params = [_greedy(n) for n in (3, 17, 9, 24)]
    params[2] = SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=9, ignore_eos=True)
    runs = {}
    for mode in (False, True):
        llm = _llm(model_dir, async_scheduling=mode)
        core = llm.llm_engine.core
        assert core.async_scheduling == mode and _runner(llm).graphs is not None
        runs[mode] = [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)]
        assert core.kv.num_free_blocks == core.kv.num_blocks
        del llm, core
        torch.cuda.empty_cache()
    assert [len(t) for t in runs[True]] == [3, 17, 9, 24]
    assert runs[True] == runs[False]


def test_pdl_launches_equal_plain_launches(model_dir, monkeypatch):
    """Programmatic dependent launch only lets a kernel start early and wait on the GPU: the
    same requests with it on (sm90+) and off give the same tokens and logprobs, bit for bit,
    through eager prefill steps and CUDA-graph decode steps of several batch sizes."""
    from modelport.layers import pdl

    if not pdl.enabled():
        pytest.skip("PDL needs compute capability 9.0+")
    params = [_greedy(n, logprobs=2) for n in (5, 14, 9, 12)]
    runs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MODELPORT_PDL", mode)
        pdl.enabled.cache_clear()
        assert pdl.enabled() == (mode == "1")
        llm = _llm(model_dir)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
        runs[mode] = [
            (o.outputs[0].token_ids,
             [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs
        ]
        del llm
        torch.cuda.empty_cache()
    pdl.enabled.cache_clear()
    assert [len(t) for t, _ in runs["1"]] == [5, 14, 9, 12]
    assert runs["1"] == runs["0"]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_graphs_replay_after_wake_up(model_dir, level):
    """Sleep mode with CUDA graphs on: the weights and KV cache come back at new addresses, so
    the graphs captured at start must not replay (they would read freed memory): they are
    dropped at sleep and captured again at wake-up, and the output is bit for bit the same."""
    params = _greedy(N_NEW, logprobs=2)
    llm = _llm(model_dir, enable_sleep_mode=True)
    runner = _runner(llm)
    before = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    assert runner.graphs is not None
    old_graphs = weakref.ref(runner.graphs)  # a strong one would keep the KV cache alive
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved()
    llm.sleep(level=level)
    assert runner.graphs is None and runner.piecewise is None and not runner.kv_caches
    assert all(p.untyped_storage().nbytes() == 0 for p in runner.model.parameters())
    # what the device gave back (nvidia-smi sees it): the cache, the weights and the graphs
    assert held - torch.cuda.memory_reserved() >= 0.9 * (weights + kv)
    llm.wake_up(tags=["weights"])
    assert runner.graphs is None  # no capture until the KV cache is back too
    llm.wake_up(tags=["kv_cache"])
    assert runner.graphs is not None and old_graphs() is None  # freed, captured anew
    after = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    _assert_same_bits(before, after, N_NEW)
    # and once more: a second cycle captures again
    llm.sleep(level=level)
    llm.wake_up()
    again = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    _assert_same_bits(before, again, N_NEW)
    del llm
    torch.cuda.empty_cache()


def _compiled_variants(fn) -> int:
    """Compiled variants of a Triton JIT function in this process (triton 3.x keeps them per
    device in ``device_caches``: (kernel cache, ...))."""
    caches = getattr(fn, "device_caches", None)
    assert caches is not None, "this Triton keeps no device_caches; update the test"
    return sum(len(entry[0]) for entry in caches.values())


def test_start_up_compiles_the_mixed_step_attention_variants(model_dir, monkeypatch):
    """After start-up's warm-up, mixed prefill + decode steps of every decode batch bucket
    compile no new decode-attention variant (each used to compile in front of the running
    requests), and what they generate is what an engine without the warm-up generates."""
    from modelport.layers import triton_attention as ta

    params = _greedy(4)
    # 40 requests arriving in waves: mixed steps with 1..40 running requests
    prompts = [[256] + [(7 * i + j) % 250 for j in range(3 + (i * 5) % 40)] for i in range(40)]
    llm = _llm(model_dir, max_num_batched_tokens=64, max_num_seqs=48)
    before = _compiled_variants(ta._decode_kernel)
    outs = [llm.generate(prompt_token_ids=prompts[:k], sampling_params=params, use_tqdm=False)
            for k in (1, 3, 9, 17, 40)]
    assert _compiled_variants(ta._decode_kernel) == before
    del llm
    torch.cuda.empty_cache()
    monkeypatch.setenv("MODELPORT_WARMUP_STEPS", "0")
    llm = _llm(model_dir, max_num_batched_tokens=64, max_num_seqs=48)
    plain = [llm.generate(prompt_token_ids=prompts[:k], sampling_params=params, use_tqdm=False)
             for k in (1, 3, 9, 17, 40)]
    del llm
    torch.cuda.empty_cache()
    for a, b in zip(outs, plain, strict=True):
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
