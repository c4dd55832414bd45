"""CUDA kernels against the reference dequantization (run on the GPU machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

from modelport.quantization.kernels import GroupQuant, make_kernel

pytestmark = pytest.mark.gpu


def _random_gq(n: int, k: int, bits: int, group: int, act_order: bool, seed: int) -> GroupQuant:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    zeros = -scales * torch.randint(0, 1 << bits, (n, k // group), generator=gen).float()
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // group
    return GroupQuant(codes, scales, zeros, group, bits, g_idx)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("wide_k", [0, 128])  # MODELPORT_W_GEMM_WIDE_K: several groups a step
def test_triton_gemm_matches_reference(bits: int, group: int, act_order: bool, wide_k: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport.quantization import triton_gemm
    from modelport.quantization.triton_gemm import TritonKernel, available

    monkeypatch.setattr(triton_gemm, "GEMM_WIDE_K", wide_k)

    assert available(), "Triton must be importable on the GPU machine"
    for i, (n, k, m) in enumerate([(256, 512, 1), (384, 1024, 7), (512, 256, 64), (1000, 768, 300)]):
        gq = _random_gq(n, k, bits, group, act_order, seed=i)
        kern = TritonKernel(gq, torch.device("cuda"))
        assert type(make_kernel(gq, torch.device("cuda"))) is TritonKernel
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to("cuda", dtype)
            ref = x.float() @ gq.dequantize().cuda().t()
            got = kern(x).float()
            tol = 2e-2 * ref.abs().max().item()
            torch.testing.assert_close(got, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_codes_gemm_matches_reference(group: int, act_order: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw-code GEMM (MODELPORT_W4_GEMM=codes) through forward() for 5..255 rows, every
    launch config that fits the group, bf16 and fp16, its variants (the activations' sums
    inside the GEMM; one dot a K step on x copied into pair order): against x @ the
    reference dequantization.
    The codes are exact, so the error is the fp32 sums' and the output's rounding."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk

    monkeypatch.setattr(tg, "W4_GEMM", "codes")
    n, k = 328, 1024
    gq = _random_gq(n, k, 4, group, act_order, seed=group)
    # the kernel stores scale and zero as fp16 (see pack_scales): the reference rounds alike
    ref_w = GroupQuant(gq.codes, gq.scales.half().float(), gq.zeros.half().float(), group, 4,
                       gq.g_idx).dequantize().cuda()
    kern = tg.TritonKernel(gq, torch.device("cuda"))
    kern.gemm_affine = None  # must not be reached
    fitting = [c for c in tk.codes_configs if group % c.kwargs["BLOCK_K"] == 0]
    gen = torch.Generator().manual_seed(group)
    for i, cfg in enumerate(fitting):
        monkeypatch.setattr(tk.gemm_codes, "configs", [cfg])
        tk.gemm_codes.cache.clear()
        m = (5, 16, 37, 64, 130, 255)[i % 6]
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        ref = x.float() @ ref_w.t()
        tol = 8e-3 * ref.abs().max().item()
        got = kern(x)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=0, msg=f"{cfg} m={m}")
        xp = (x[:, kern.perm] if kern.perm is not None else x).contiguous()
        for xsum, pair in ((False, False), (True, True)):
            torch.testing.assert_close(kern.gemm_codes(xp, xsum=xsum, pair=pair).float(), ref,
                                       atol=tol, rtol=0, msg=f"{cfg} m={m} {xsum} {pair}")


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("group", [16, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_dequant_path_matches_reference(bits: int, group: int, act_order: bool) -> None:
    """From DEQUANT_MIN_M rows the weight is expanded once (dequant kernel) and cuBLAS runs:
    the expansion equals the reference dequantization in the stored (group-contiguous)
    order, and forward() there equals both the reference and the dequant-GEMM kernel."""
    from modelport.quantization import triton_gemm as tg

    n, k = 200 + bits, 1024
    gq = _random_gq(n, k, bits, group, act_order, seed=bits + group)
    kern = tg.TritonKernel(gq, torch.device("cuda"))
    stored, _ = gq.contiguous_groups()
    # the kernel stores scale and zero as fp16 (see pack_scales): the reference rounds alike
    stored = GroupQuant(stored.codes, stored.scales.half().float(), stored.zeros.half().float(),
                        group, bits)
    for dtype in (torch.bfloat16, torch.float16):
        w = kern.dequantize(dtype)
        assert w.dtype == dtype and w.shape == (n, k)
        # one rounding to dtype apart at most (fused multiply-add vs multiply then add)
        torch.testing.assert_close(w.float(), stored.dequantize().cuda().to(dtype).float(),
                                   atol=1e-5, rtol=1e-2)
    for m in (tg.DEQUANT_MIN_M, 700):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to("cuda", torch.bfloat16)
        ref = x.float() @ gq.dequantize().cuda().t()
        got = kern(x).float()
        tol = 2e-2 * ref.abs().max().item()
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
        xp = (x[:, kern.perm] if kern.perm is not None else x).contiguous()
        torch.testing.assert_close(got, kern.gemm(xp).float(), atol=tol, rtol=0)


def test_triton_gemm_handles_gguf_q6k_group16() -> None:
    from modelport.quantization.triton_gemm import TritonKernel

    gq = _random_gq(128, 512, 6, 16, False, seed=9)
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ gq.dequantize().cuda().t()
    torch.testing.assert_close(TritonKernel(gq, torch.device("cuda"))(x).float(), ref,
                               atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("m", [1, 16, 64, 200])
def test_fp8_scaled_mm_matches_reference(m: int) -> None:
    from modelport.quantization.fp8 import fp8_scaled_mm, fp8_supported, quantize_fp8_per_channel

    if not fp8_supported(torch.cuda.get_device_capability()):
        pytest.fail("the GPU machine is expected to support FP8 (H100/H200)")
    w = torch.randn(768, 512, device="cuda") * 0.05
    q, s = quantize_fp8_per_channel(w)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * s[:, None]).t() + bias.float()
    got = fp8_scaled_mm(x, q, s, bias).float()
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def _gemv_case(n: int, k: int, bits: int, group: int, act_order: bool, seed: int):  # noqa: ANN202
    from modelport.quantization.triton_gemm import TritonKernel

    gq = _random_gq(n, k, bits, group, act_order, seed)
    return gq, TritonKernel(gq, torch.device("cuda")), gq.dequantize().cuda()


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_gemv_matches_reference(bits: int, group: int, act_order: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-sized batches (1..GEMV_MAX_M rows) take the GEMV kernel, through forward().
    N and K are not multiples of its blocks (masked paths). One config, so the sweep compiles
    once per shape; test_triton_gemv_every_config covers the autotune candidates."""
    from modelport.quantization import triton_kernels as tk
    from modelport.quantization.triton_gemm import GEMV_MAX_M

    monkeypatch.setattr(tk.gemv, "configs", [tk.gemv.configs[0]])
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    for i, k in enumerate((1280, 4096)):
        n = int(torch.randint(1, 700, (1,), generator=gen))
        gq, kern, w = _gemv_case(n, k, bits, group, act_order, seed=i)
        kern.gemm = None  # these batches must never reach the GEMM
        for m in range(1, GEMV_MAX_M + 1):
            dtype = torch.bfloat16 if m % 2 else torch.float16
            x = torch.randn(m, k, generator=gen).to("cuda", dtype)
            ref = x.float() @ w.t()
            got = kern(x)
            assert got.dtype == dtype and got.shape == (m, n)
            torch.testing.assert_close(got.float(), ref, atol=2e-2 * ref.abs().max().item(),
                                       rtol=0, msg=f"n={n} k={k} m={m} {dtype}")


@pytest.mark.parametrize("shape", [(4096, 4096), (100, 1280)])
def test_triton_gemv_every_config(shape: tuple[int, int]) -> None:
    """Each autotune candidate on its own (the tuner would only ever run the fastest)."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk

    n, k = shape
    gq, kern, w = _gemv_case(n, k, 4, 128, False, seed=3)
    for m in range(1, tg.GEMV_MAX_M + 1):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        for cfg in tk.gemv_prune(tk.gemv.configs, {}, BLOCK_M=m, K=k, BITS=4):
            y = torch.empty((m, n), device="cuda", dtype=x.dtype)
            grid = (tg.triton_cdiv(n, cfg.kwargs["BLOCK_N"]), cfg.kwargs["SPLIT"])
            ws, cnt = tg.gemv_workspace(x.device, n)
            tk.gemv.fn[grid](x, kern.qweight, kern.sz, y, ws, cnt, n, x.stride(0), y.stride(0),
                             tg.MAG_2048, tg.MAG_128, K=k, GROUP=128, BITS=4, V=kern.v,
                             BLOCK_M=m, num_warps=cfg.num_warps, **cfg.kwargs)
            torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(),
                                       rtol=0, msg=f"{cfg} m={m}")


def _capture(kern: torch.nn.Module, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """kern(x) captured in a CUDA graph on a side stream (after one warm-up call there);
    returns the graph and its output tensor."""
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kern(x)
        with torch.cuda.graph(graph, stream=s):
            y = kern(x)
    torch.cuda.current_stream().wait_stream(s)
    return graph, y


def test_triton_gemv_in_cuda_graph() -> None:
    """One launch per call, nothing allocated but the output: capturable and replayable."""
    gq, kern, w = _gemv_case(512, 2048, 4, 128, False, seed=5)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    kern(x)  # autotune outside the graph
    graph, y = _capture(kern, x)
    x.copy_(torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.float() @ w.t()
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_triton_gemv_split_k_replays_in_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split-K GEMV (the last K slice adds the partial sums and resets its counter):
    forced as the only config, captured once, replayed with new inputs: each replay equals
    the reference and leaves every arrival counter at zero."""
    from modelport.quantization import triton_gemm as tg
    from modelport.quantization import triton_kernels as tk

    split = [c for c in tk.gemv.configs if c.kwargs["SPLIT"] > 1]
    assert split, "the autotune list keeps a split-K candidate"
    monkeypatch.setattr(tk.gemv, "configs", split[:1])
    gq, kern, w = _gemv_case(384, 4096, 4, 128, False, seed=7)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    kern(x)  # compile outside the graph
    graph, y = _capture(kern, x)
    _, cnt = tg.gemv_workspace(x.device, 384)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        ref = x.float() @ w.t()
        torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
        assert int(cnt.abs().sum()) == 0


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_encode_on_cuda_matches_cpu(double_quant: bool) -> None:
    """The dummy NF4 loader packs on the weight's own device (an 8B run packs on the GPU)."""
    from modelport.quantization.nf4 import nf4_encode

    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    on_cpu = nf4_encode(w, 64, double_quant)
    on_gpu = nf4_encode(w.cuda(), 64, double_quant)
    assert on_cpu.keys() == on_gpu.keys()
    assert torch.equal(on_cpu[""], on_gpu[""].cpu())  # the packed 4-bit codes
    for k, v in on_cpu.items():
        g = on_gpu[k].cpu()
        if v.is_floating_point():
            assert torch.allclose(v, g, rtol=1e-5, atol=0), k
        elif k == "absmax":  # double quant's 8-bit codes of absmax - mean: the mean may differ
            assert (v.int() - g.int()).abs().max() <= 1  # in its last bit between devices


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,qb,m", [(40, 256, 64, 1), (4096, 4096, 64, 1), (96, 14336, 64, 3),
                                      (33, 384, 128, 4), (16, 128, 32, 2), (70, 448, 64, 9),
                                      (4096, 4096, 64, 64), (100, 1024, 128, 130),
                                      (40, 256, 64, 300)])
@pytest.mark.parametrize("words_split", [False, True])
def test_nf4_triton_matches_reference(dtype: torch.dtype, n: int, k: int, qb: int, m: int,
                                      words_split: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """NF4 kept at 4 bits: the GEMV (<= 4 rows), the in-register GEMM (< 256 rows) and the
    dequant + cuBLAS paths against the reference w = table[code] * absmax; words_split: the
    GEMV reading int32 words and the split-K GEMM (the defaults), else the byte GEMV and the
    unsplit GEMM (MODELPORT_NF4_GEMV=bytes, MODELPORT_NF4_GEMM_SPLIT=0)."""
    from modelport.quantization import triton_nf4 as tn
    from modelport.quantization.nf4 import NF4_CODE

    monkeypatch.setattr(tn, "GEMV_WORDS", words_split)
    monkeypatch.setattr(tn, "GEMM_SPLIT", words_split)

    g = torch.Generator().manual_seed(n + k + m)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    am = torch.rand(n, k // qb, generator=g) + 0.05
    table = torch.tensor(NF4_CODE)
    w = table[codes.long()] * am.repeat_interleave(qb, dim=1)
    x = torch.randn(m, k, generator=g).to(dtype)
    packed, am_d, t_d = tn.pack_rows(codes).cuda(), am.cuda(), table.cuda()
    y = tn.linear(x.cuda(), packed, am_d, t_d, None)
    ref = x.float() @ w.t()
    assert y.dtype == dtype and y.shape == (m, n)
    err = ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-2, err
    assert torch.equal(tn.dequantize(packed, am_d, t_d, dtype).cpu(), w.to(dtype))
    flat = torch.zeros(m * k + 1, dtype=dtype, device="cuda")  # odd storage offset: the GEMV
    x_odd = flat[1:].view(m, k).copy_(x.cuda())  # reads x as int32 words (it copies first)
    y_odd = tn.linear(x_odd, packed, am_d, t_d, None)
    if words_split and tn.GEMV_MAX_M < m < tn.DEQUANT_MIN_M:  # split-K: atomic fp32 sums
        torch.testing.assert_close(y_odd, y, atol=2e-3 * y.float().abs().max().item(), rtol=0)
    elif m < tn.DEQUANT_MIN_M:  # our kernels: the same bits
        assert torch.equal(y_odd, y)
    else:  # cuBLAS picks another algorithm for a misaligned operand (H200, 2026-12-05)
        torch.testing.assert_close(y_odd, y, atol=1e-2 * y.float().abs().max().item(), rtol=0)


@pytest.fixture(scope="module")
def nf4_model_dir(tmp_path_factory):
    from helpers.tiny_models import make_tiny_llama_dir

    return make_tiny_llama_dir(tmp_path_factory.mktemp("nf4") / "m", hidden_size=256,
                               num_heads=4, num_kv_heads=1, intermediate_size=512, num_layers=2)


def _nf4_generate(model_dir, monkeypatch, triton: bool):  # noqa: ANN001, ANN202
    from modelport import LLM, SamplingParams

    monkeypatch.setenv("MODELPORT_NF4_TRITON", "1" if triton else "0")
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization="bitsandbytes",
              load_format="dummy", max_model_len=256, block_size=16, gpu_memory_utilization=0.3)
    qkv = llm.llm_engine.core.runner.model.model.layers[0].self_attn.qkv_proj
    assert hasattr(qkv, "nf4_packed") == triton and hasattr(qkv, "nf4_codes") != triton
    prompts = [[1] + [(5 * i + j) % 250 for i in range(9)] for j in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                               use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    return outs


def test_nf4_engine_on_triton_kernels_matches_reference_path(nf4_model_dir, monkeypatch) -> None:
    """Batch-3 decode steps run the NF4 GEMV (CUDA graphs), the 30-row prefill its GEMM: the
    first greedy tokens and their logprobs agree with the per-call dequantization (bf16: the
    reference rounds table and absmax to bf16 before multiplying, the kernels do not)."""
    ref = _nf4_generate(nf4_model_dir, monkeypatch, False)
    got = _nf4_generate(nf4_model_dir, monkeypatch, True)
    for a, b in zip(ref, got):
        assert a.token_ids[:3] == b.token_ids[:3]
        for tok, da, db in list(zip(a.token_ids, a.logprobs, b.logprobs))[:3]:
            assert abs(da[tok].logprob - db[tok].logprob) < 0.05


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q2_K", "Q3_K"])
def test_gguf_pack_on_cuda_matches_cpu(name: str) -> None:
    """Dummy GGUF weights are packed on the layer's device (the 8B benchmark packs on the GPU)."""
    from modelport.quantization.gguf_formats import PACK_TYPES, pack

    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)) * 0.02
    assert torch.equal(pack(w, PACK_TYPES[name]), pack(w.cuda(), PACK_TYPES[name]).cpu())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_kept_on_cuda_runs_the_triton_kernels(tmp_path, monkeypatch, qtype: str) -> None:
    """A GGUF file with --quantization gguf on CUDA: every linear layer on the Triton W4/W8
    kernels, logits close to the same file loaded as floats (--quantization none)."""
    from helpers.tiny_models import TINY_PROMPT, make_tiny_llama_dir, make_tiny_llama_gguf
    from modelport import LLM, SamplingParams
    from modelport.quantization.triton_gemm import TritonKernel

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    hf = make_tiny_llama_dir(tmp_path / "hf", hidden_size=256, intermediate_size=512)
    path = make_tiny_llama_gguf(hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    outs = {}
    for q in ("none", "gguf"):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", quantization=q, max_model_len=256,
                  block_size=16, gpu_memory_utilization=0.3)
        model = llm.llm_engine.core.runner.model
        kernels = [type(m.qkernel) for m in model.modules() if hasattr(m, "qkernel")]
        assert (set(kernels) == {TritonKernel} and len(kernels) == 8) if q == "gguf" else not kernels
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
        outs[q] = llm.generate(prompt_token_ids=[TINY_PROMPT], sampling_params=params,
                               use_tqdm=False)[0].outputs[0]
        del llm
        torch.cuda.empty_cache()
    a, b = outs["none"], outs["gguf"]
    assert a.token_ids[:2] == b.token_ids[:2]
    tok = a.token_ids[0]
    assert abs(a.logprobs[0][tok].logprob - b.logprobs[0][tok].logprob) < 0.05
