"""GGUF Q8_0 on CPU with the file's per-block scales (quantization/kernels.CpuQ8Kernel, C in
layers/csrc/cpu_decode.c ``mp_q8_matmul`` on float32 x, MODELPORT_Q8_CPU=blocks_f32, and
``mp_q8_matmul_i8`` on x quantized per block to int8, =blocks): the kernels against
independent references (codes x block scale, float64 matmul; x's per-block quantization
written here in torch), the routing, and a tiny Q8_0 model's logits against
``quantization="none"`` (the exactly dequantized weights), through the C step and the engine.
The int8 kernel's AVX2 and scalar paths are built here from the same source (compiler flags)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modelport.quantization.loading as quant_loading
from helpers.tiny_models import TINY_PROMPT as PROMPT
from helpers.tiny_models import (
    load_cpu,
    make_tiny_llama_dir,
    make_tiny_llama_gguf,
    run_one_sequence,
)
from modelport.layers import cpu_kernels
from modelport.quantization.kernels import (
    CPU_Q8_MAX_M,
    CpuInt8Kernel,
    CpuQ8Kernel,
    GroupQuant,
    make_kernel,
    q8_0_codes,
)


@pytest.fixture(autouse=True)
def _blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # the exact float32-x kernel (=blocks_f32); the int8-x one (=blocks, the default) has its
    # own tests below
    monkeypatch.setenv("MODELPORT_Q8_CPU", "blocks_f32")


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernels.load_library()
    assert lib is not None, "the C library must build on the test machine"
    return lib


def _q8_group_quant(n: int, k: int, seed: int) -> GroupQuant:
    """A Q8_0 weight as gguf_formats.unpack gives it: codes q + 128, scale d (an fp16
    value), zero -128 d, blocks of 32."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-4).half().float()
    d[0, 0] = 0.0  # an all-zero block
    return GroupQuant(codes, d, -128 * d, 32, 8)


def _reference(codes_u8: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Independent of the kernel: each weight as (code - 128) * its block's scale, float64."""
    n, k = codes_u8.shape
    w = (codes_u8.double() - 128) * d.double().repeat_interleave(32, dim=1)
    return x.double() @ w.T


def _call(lib, x: torch.Tensor, q: torch.Tensor, d16: torch.Tensor, threads: int) -> torch.Tensor:
    m, k = x.shape
    y = torch.empty(m, q.shape[0], dtype=x.dtype)
    f32 = int(x.dtype == torch.float32)
    lib.mp_q8_matmul(m, q.shape[0], k, x.data_ptr(), f32, q.data_ptr(), d16.data_ptr(),
                     y.data_ptr(), f32, threads, 50)
    return y


@pytest.mark.parametrize("n,k", [(37, 32), (129, 96), (1023, 576), (301, 1536)])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 40])
def test_q8_matmul_matches_the_reference(lib, n: int, k: int, m: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    gq = _q8_group_quant(n, k, seed=n * 7 + m)
    q, d16 = q8_0_codes(gq)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = _reference(gq.codes, gq.scales, x)
    # float32 accumulation of exactly formed weights: error ~ K * 2^-24 of sum |w x|
    bound = (x.double().abs() @ gq.dequantize().double().abs().T) * (k * 2.0**-24) + 1e-30
    for threads in (1, 2, 3):
        got = _call(lib, x, q, d16, threads)
        assert ((got.double() - ref).abs() <= bound).all()
        if threads == 1:
            one = got
        else:  # a row's sum does not depend on how rows are split over threads
            torch.testing.assert_close(got, one, atol=0, rtol=0)
    # bf16 in and out (the C step between bf16 matmuls): the input widened exactly, the
    # output rounded once
    xb = x.bfloat16()
    got = _call(lib, xb, q, d16, 2)
    ref_b = _reference(gq.codes, gq.scales, xb.float())
    assert ((got.double() - ref_b).abs() <= ref_b.abs() * 2.0**-8 + bound).all()
    # the module: its C kernel up to CPU_Q8_MAX_M rows; above, the weight expanded to bf16
    # (each exact weight rounded once) for a bf16 matmul, or with MODELPORT_Q8_LARGE=f32 to
    # float32 (exact)
    kern = make_kernel(gq, torch.device("cpu"))
    assert type(kern) is CpuQ8Kernel
    got = kern(x)
    assert got.dtype == torch.float32
    if m <= CPU_Q8_MAX_M:
        assert ((got.double() - ref).abs() <= bound).all()
    else:
        w16 = gq.dequantize().bfloat16()
        torch.testing.assert_close(kern.matmul(xb), F.linear(xb, w16), atol=0, rtol=0)
        monkeypatch.setenv("MODELPORT_Q8_LARGE", "f32")
        got = make_kernel(gq, torch.device("cpu"))(x)
        assert ((got.double() - ref).abs() <= bound * 4).all()  # torch's own fp32 sum


def test_q8_0_goes_to_the_block_kernel_and_beats_the_row_requantization(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gq = _q8_group_quant(64, 256, seed=1)
    x = torch.randn(3, 256)
    ref = _reference(gq.codes, gq.scales, x)
    new = make_kernel(gq, torch.device("cpu"))
    assert type(new) is CpuQ8Kernel
    assert new.qweight.dtype == torch.int8 and new.scales.dtype == torch.float16
    torch.testing.assert_close(new.expanded(), gq.dequantize(), atol=0, rtol=0)  # exact
    monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")  # the previous path, for A/B
    old = make_kernel(gq, torch.device("cpu"))
    assert type(old) is CpuInt8Kernel
    err_new = (new(x).double() - ref).abs().max().item()
    err_old = (old(x).double() - ref).abs().max().item()
    assert err_new * 1000 < err_old, (err_new, err_old)
    monkeypatch.setenv("MODELPORT_Q8_CPU", "blocks")
    # no C compiler here: the row kernel, as before
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "load_library", lambda: None)
        assert type(make_kernel(gq, torch.device("cpu"))) is CpuInt8Kernel
    # not Q8_0: an asymmetric zero (Q5_1-like), a scale that is no fp16 value, other groups
    asym = GroupQuant(gq.codes, gq.scales, -100 * gq.scales, 32, 8)
    odd = GroupQuant(gq.codes, gq.scales + 1e-7, -128 * (gq.scales + 1e-7), 32, 8)
    wide = GroupQuant(gq.codes, gq.scales[:, ::2].contiguous(),
                      -128 * gq.scales[:, ::2].contiguous(), 64, 8)
    for other in (asym, odd, wide):
        assert q8_0_codes(other) is None
        assert type(make_kernel(other, torch.device("cpu"))) is CpuInt8Kernel


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("q8b")
    hf = make_tiny_llama_dir(root / "hf", seed=11)
    return make_tiny_llama_gguf(hf, root / "tiny-Q8_0.gguf", "Q8_0")


def _linear_kernels(model: torch.nn.Module) -> set[type]:
    return {type(m.qkernel) for m in model.modules() if hasattr(m, "qkernel")}


def test_tiny_q8_0_model_matches_its_dequantized_weights(
        tiny_q8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits through the C step against quantization="none": prompts of up to
    CPU_Q8_MAX_M tokens run the C kernel itself (exact up to float32 sums); longer ones the
    bf16 expansion (closer than the row requantization before), or with
    MODELPORT_Q8_LARGE=f32 the float32 one (exact)."""
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)  # linear layers alone
    long = (PROMPT * 4)[: CPU_Q8_MAX_M + 9]
    exact = load_cpu(tiny_q8, "none")
    ref = run_one_sequence(exact, long)
    scale = ref.abs().max().item()
    model = load_cpu(tiny_q8, "gguf")
    assert _linear_kernels(model) == {CpuQ8Kernel}
    for n in (1, 2, 5, CPU_Q8_MAX_M):
        got = run_one_sequence(model, long[:n])
        torch.testing.assert_close(got, ref[:n], atol=2e-6 * scale, rtol=0)
    plan = model.model.__dict__["_cpu_decode_plan"]
    assert plan is not False and plan.kinds == ["q8_0"] and plan.dtype == torch.float32
    err_bf16 = (run_one_sequence(model, long) - ref).abs().max().item()
    monkeypatch.setenv("MODELPORT_Q8_LARGE", "f32")
    err_f32 = (run_one_sequence(load_cpu(tiny_q8, "gguf"), long) - ref).abs().max().item()
    assert err_f32 < 2e-6 * scale, err_f32 / scale
    monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")
    old = load_cpu(tiny_q8, "gguf")
    assert _linear_kernels(old) == {CpuInt8Kernel}
    err_old = (run_one_sequence(old, long[:CPU_Q8_MAX_M]) - ref[:CPU_Q8_MAX_M]).abs().max().item()
    assert err_old > 1e-3 * scale  # what the C kernel removes: > 500x its error
    assert err_bf16 < (run_one_sequence(old, long) - ref).abs().max().item()


def test_engine_greedy_logprobs_equal_the_dequantized_engine(
        tiny_q8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelport import LLM, SamplingParams

    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)  # linear layers alone
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    prompts = [PROMPT[:6], PROMPT[:3]]
    outs = {}
    for q in ("none", "gguf"):
        llm = LLM(str(tiny_q8), quantization=q, kv_cache_memory=8 << 20, max_model_len=128)
        outs[q] = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    for a, b in zip(outs["none"], outs["gguf"]):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        assert list(ta) == list(tb)
        for tok, la, lb in zip(ta, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-4


def test_q8_matmul_in_a_forked_child_starts_its_own_workers(lib) -> None:
    """The OpenMP team's (or the pool's) workers are threads of the process that started
    them: a child forked after they ran (an engine's worker process) starts a pool of its
    own instead of waiting forever for the parent's (libgomp's team in a forked child never
    returns, so the child takes the pthread pool)."""
    import os
    import signal

    gq = _q8_group_quant(512, 256, seed=3)
    q, d16 = q8_0_codes(gq)
    x = torch.randn(2, 256)
    want = _call(lib, x, q, d16, 2)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # the child: killed by the alarm if it hangs
        code = 1
        try:
            signal.alarm(30)
            got = _call(lib, x, q, d16, 2)
            code = 0 if torch.equal(got, want) and not lib.mp_q8_uses_openmp() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# ---- x quantized per block to int8, int8 x int8 dot products (mp_q8_matmul_i8, =blocks) ----


def _quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of the kernel: x's codes [M, K] and scales [M, K / 32] as mp_q8_matmul_i8
    defines them (scale max|x| / 127 a block, code round-half-even(x * (1 / scale)))."""
    m, k = x.shape
    v = x.float().view(m, k // 32, 32)
    d = v.abs().amax(-1) / 127
    inv = torch.where(d > 0, torch.ones_like(d) / d, torch.zeros_like(d))
    return torch.round(v * inv[..., None]).clamp(-127, 127).view(m, k).to(torch.int8), d


def _reference_i8(codes_u8: torch.Tensor, d: torch.Tensor, x: torch.Tensor):
    """(the same math in float64: sum over blocks of int dot x weight scale x x's scale, a
    bound on float32 rounding of it)."""
    n, k = codes_u8.shape
    xq, xd = _quantize_x(x)
    q = codes_u8.double().view(n, k // 32, 32) - 128
    dots = torch.einsum("mbk,nbk->mnb", xq.double().view(-1, k // 32, 32), q)
    scale = d.double()[None] * xd.double()[:, None]
    # the kernel sums partial dot products (lanes of 4 codes) in float32, so the bound
    # takes sum |code x q| a block, not |its dot product|
    mags = torch.einsum("mbk,nbk->mnb", xq.double().abs().view(-1, k // 32, 32), q.abs())
    return (dots * scale).sum(-1), (mags * scale).sum(-1) * ((k // 32 + 24) * 2.0**-24) + 1e-30


_ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def i8_lib(request: pytest.FixtureRequest, lib, tmp_path_factory: pytest.TempPathFactory):
    """The library as built for this CPU, and built again for AVX2 alone and for no vector
    extension (the int8 kernel's other paths)."""
    import ctypes
    import subprocess

    if request.param == "native":
        return lib
    out = tmp_path_factory.mktemp("q8i") / f"lib_{request.param}.so"
    r = subprocess.run(["cc", *_ISA_FLAGS[request.param], "-O3", "-fPIC", "-shared",
                        "-fopenmp-simd", "-ffp-contract=off", "-pthread", "-o", str(out),
                        str(cpu_kernels._SRC), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-400:]
    other = ctypes.CDLL(str(out))
    for name, args in cpu_kernels._SIGNATURES.items():
        fn = getattr(other, name)
        fn.argtypes = args
        fn.restype = cpu_kernels._RETURNS.get(name)
    assert other.mp_q8_i8_isa() == {"avx2": 1, "scalar": 0}[request.param]
    return other


def _call_i8(lib, x: torch.Tensor, q: torch.Tensor, d16: torch.Tensor, threads: int):
    m, k = x.shape
    packed = torch.empty_like(q)
    lib.mp_q8_i8_pack(q.shape[0], k, q.data_ptr(), packed.data_ptr())
    y = torch.empty(m, q.shape[0], dtype=x.dtype)
    f32 = int(x.dtype == torch.float32)
    lib.mp_q8_matmul_i8(m, q.shape[0], k, x.data_ptr(), f32, packed.data_ptr(),
                        d16.data_ptr(), y.data_ptr(), f32, threads, 50)
    return y


# K: under one group of 512, groups with an even and an odd number of tail blocks
@pytest.mark.parametrize("n,k", [(37, 32), (129, 96), (1023, 576), (200, 1056), (301, 1536)])
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_q8_matmul_i8_matches_the_reference(i8_lib, n: int, k: int, m: int) -> None:
    gq = _q8_group_quant(n, k, seed=n * 5 + m)
    q, d16 = q8_0_codes(gq)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 1))
    x[0, :32] = 0.0  # an all-zero block of x
    # the quantization itself: the same codes and scales, bit for bit
    kp = (k + 63) // 64 * 64
    xq, xd = torch.empty(m, kp, dtype=torch.int8), torch.empty(m, kp // 32)
    i8_lib.mp_q8_quantize_x(m, k, x.data_ptr(), 1, xq.data_ptr(), xd.data_ptr())
    want_q, want_d = _quantize_x(x)
    assert torch.equal(xq[:, :k], want_q) and torch.equal(xd[:, : k // 32], want_d)
    ref, bound = _reference_i8(gq.codes, gq.scales, x)
    for threads in (1, 2):
        got = _call_i8(i8_lib, x, q, d16, threads)
        assert ((got.double() - ref).abs() <= bound).all()
    # against the exact weights and float x: only x's rounding, at most half a step of
    # each block (scale / 2 an element) times |w|
    exact = _reference(gq.codes, gq.scales, x)
    half_step = (x.abs().view(m, -1, 32).amax(-1) / 254).repeat_interleave(32, dim=1)
    worst = half_step.double() @ gq.dequantize().double().abs().T
    assert ((got.double() - exact).abs() <= worst + bound).all()
    # typically far below the worst case: ~0.5 % of the output's scale
    assert (got.double() - exact).abs().max() <= 0.02 * exact.abs().max() + 1e-30
    # bf16 in and out: widened exactly, quantized, the output rounded once
    xb = x.bfloat16()
    ref_b, bound_b = _reference_i8(gq.codes, gq.scales, xb.float())
    got = _call_i8(i8_lib, xb, q, d16, 2)
    assert ((got.double() - ref_b).abs() <= ref_b.abs() * 2.0**-8 + bound_b).all()


def test_q8_i8_kernel_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """=blocks builds CpuQ8Kernel on the int8 kernel: its weight (packed for VNNI) still
    expands to the exact weight, up to CPU_Q8I_MAX_M rows the C kernel, above the bf16
    expansion."""
    from modelport.quantization.kernels import CPU_Q8I_MAX_M

    monkeypatch.setenv("MODELPORT_Q8_CPU", "blocks")
    gq = _q8_group_quant(96, 1056, seed=4)
    kern = make_kernel(gq, torch.device("cpu"))
    assert type(kern) is CpuQ8Kernel and kern.act_i8
    torch.testing.assert_close(kern.expanded(), gq.dequantize(), atol=0, rtol=0)
    for m in (1, CPU_Q8I_MAX_M, CPU_Q8I_MAX_M + 3):
        x = torch.randn(m, 1056)
        got = kern(x)
        if m <= CPU_Q8I_MAX_M:
            ref, bound = _reference_i8(gq.codes, gq.scales, x)
            assert ((got.double() - ref).abs() <= bound).all()
        else:
            xb = x.bfloat16()
            w16 = gq.dequantize().bfloat16()
            torch.testing.assert_close(kern.matmul(xb), F.linear(xb, w16), atol=0, rtol=0)


def test_tiny_q8_0_model_on_the_i8_kernel(tiny_q8: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits through the C step with x quantized per block: close to the exact weights'
    (x's 8-bit rounding only), closer than the row requantization."""
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)  # linear layers alone
    monkeypatch.setenv("MODELPORT_Q8_CPU", "blocks")
    n = CPU_Q8_MAX_M
    ref = run_one_sequence(load_cpu(tiny_q8, "none"), PROMPT[:n])
    model = load_cpu(tiny_q8, "gguf")
    kernels = [m.qkernel for m in model.modules() if hasattr(m, "qkernel")]
    assert kernels and all(type(k) is CpuQ8Kernel and k.act_i8 for k in kernels)
    err = (run_one_sequence(model, PROMPT[:n]) - ref).abs().max().item()
    monkeypatch.setenv("MODELPORT_Q8_CPU", "rows")
    old = (run_one_sequence(load_cpu(tiny_q8, "gguf"), PROMPT[:n]) - ref).abs().max().item()
    assert err < old, (err, old)


def test_q8_matmuls_split_rows_over_torchs_openmp_team(lib) -> None:
    """Built with -fopenmp, the Q8_0 matmuls run on the OpenMP team of torch's own ops (one
    libgomp in the process, torch's) and start no threads of their own: a second pool's
    worker shared a core with torch's spinning ones and slowed the decode step after each LM
    head ~2x on 2 cores (bench/README.md, session 32)."""
    import os

    assert lib.mp_q8_uses_openmp() == 1, "cc builds the library with -fopenmp here"
    gomp = {ln.split()[-1] for ln in open("/proc/self/maps") if "libgomp" in ln}
    assert len(gomp) == 1 and Path(next(iter(gomp))).parent == Path(torch.__file__).parent / "lib"
    gq = _q8_group_quant(512, 576, seed=11)
    q, d16 = q8_0_codes(gq)
    x = torch.randn(2, 576)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(1 << 20).exp_()  # torch's team of two, started
        threads = len(os.listdir("/proc/self/task"))
        ref, bound = _reference_i8(gq.codes, gq.scales, x)
        for _ in range(3):
            got = _call_i8(lib, x, q, d16, 2)
            assert ((got.double() - ref).abs() <= bound).all()
            _call(lib, x, q, d16, 2)
        assert len(os.listdir("/proc/self/task")) == threads
    finally:
        torch.set_num_threads(before_threads)


def test_q8_0_block_kernel_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, MODELPORT_Q8_CPU means =blocks (the int8-x block kernel); =rows goes back to
    the row requantization, as does an unknown value; the planner reads the same switch."""
    from modelport.quantization.gguf_types import cpu_q8_mode

    gq = _q8_group_quant(64, 256, seed=3)
    monkeypatch.delenv("MODELPORT_Q8_CPU", raising=False)
    k = make_kernel(gq, torch.device("cpu"))
    assert type(k) is CpuQ8Kernel and k.act_i8 and cpu_q8_mode() == "blocks"
    monkeypatch.setenv("MODELPORT_Q8_CPU", "blocks")
    k = make_kernel(gq, torch.device("cpu"))
    assert type(k) is CpuQ8Kernel and k.act_i8
    for how in ("rows", "no-such-kernel"):
        monkeypatch.setenv("MODELPORT_Q8_CPU", how)
        assert type(make_kernel(gq, torch.device("cpu"))) is CpuInt8Kernel
        assert cpu_q8_mode() is None
