"""A tensor-parallel rank builds its quantized layers as its slice and cuts each checkpoint
tensor as it streams in (parallel/tp_quant_load.py): AWQ, GPTQ (4/8-bit, sym/asym,
act-order), FP8 (per-tensor / per-channel scales, online), kept GGUF (Q4_0, Q8_0, and
K-quants whose 256-wide super-blocks a rank's columns cut through) and bitsandbytes NF4
(with and without double quant, a row-parallel slice inside one block, nested blocks a
rank's absmax starts inside), dense layers and MoE experts. Each rank ends with the same packed tensors as loading whole and cutting before
repacking (the old path, still taken where a format cannot cut at load), while holding about
half of every quantized layer."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.kernel_cache import seeded_cache
from helpers.tiny_models import assert_same_greedy, make_tiny_llama_dir, make_tiny_llama_gguf
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.parallel import tp_quant_load
from modelport.parallel.moe_parallel import sharded_at_build
from modelport.parallel.tensor_parallel import shard_model
from modelport.quantization import apply as quant_apply
from modelport.quantization import loading as quant_loading
from modelport.quantization.fp8 import CompressedTensorsFP8Config, FP8Config
from modelport.quantization.gguf_formats import pack as pack_ggml
from modelport.quantization.gguf_types import GGML_TYPES
from modelport.quantization.nf4 import NF4Config, nf4_encode
from modelport.quantization.tools.writer import is_quantizable, write_checkpoint
from test_moe_tensor_parallel_quant import REQUESTED as MOE_REQUESTED
from test_moe_tensor_parallel_quant import _checkpoint as moe_checkpoint
from test_quant_awq_gptq import quantize_folder

# name -> how the checkpoint is made (quantize_folder's method, bits, sym, act_order) or a tag
DENSE = {
    "awq": ("awq", 4, False, False),
    "gptq-4-asym": ("gptq", 4, False, False),
    "gptq-8-sym": ("gptq", 8, True, False),
    "gptq-act-order": ("gptq", 4, False, True),
    "fp8-tensor": "fp8-tensor",
    "fp8-channel": "fp8-channel",
    "fp8-ct-channel": "fp8-ct-channel",  # compressed-tensors: scales [out, 1]
    "fp8-online": "fp8-online",
    "gguf-q4_0": "Q4_0",
    "gguf-q8_0": "Q8_0",
    "gguf-k": "Q4_K",  # hidden 768: o_proj's 384 columns per rank end inside a super-block
    # hidden 256: (blocksize, double quant, nested blocksize); 256: o_proj's 128 columns per
    # rank lie inside one block; nested 100: a rank's absmax codes start inside a nested block
    "nf4": (64, False, 256),
    "nf4-dq": (64, True, 256),
    "nf4-dq-256": (256, True, 100),
}
REQUESTED = {"fp8-online": "fp8", "gguf-q4_0": "gguf", "gguf-q8_0": "gguf", "gguf-k": "gguf"}
MOE = [("mixtral", "gguf-q4_0"), ("qwen2_moe", "awq"), ("qwen2_moe", "gptq-act-order"),
       ("qwen3_moe", "fp8"), ("qwen2_moe", "fp8-online"), ("qwen3_moe", "gguf-q8_0")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seeded_cache(tmp_path_factory.mktemp("tp-sliced-cache"))


@pytest.fixture(autouse=True)
def _cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GGUF configs; the CPU kernels built once (helpers/kernel_cache.py), not in every rank
    monkeypatch.setenv("MODELPORT_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp-sliced")


def _fp8_checkpoint(hf: Path, out: Path, per_channel: bool, ct: bool = False) -> Path:
    qt: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(hf / "model.safetensors")).items():
        if not is_quantizable(name):
            qt[name] = w
            continue
        scale = (w.abs().amax(1, keepdim=True) if per_channel else w.abs().max()) / 448.0
        qt[name] = (w / scale).to(torch.float8_e4m3fn)
        qt[name.removesuffix(".weight") + ".weight_scale"] = (
            scale.reshape(-1, 1) if ct else scale.reshape(-1) if per_channel
            else scale.reshape(())).float()
    config = CompressedTensorsFP8Config() if ct else FP8Config()
    return write_checkpoint(hf, out, qt, config, float_dtype=torch.float32)


@contextmanager
def _k_quant_writer() -> Iterator[None]:
    """gguf-py has no K-quant quantizer: Q4_K from modelport's packer (checked against
    gguf-py's dequantizer in test_quant_gguf.py), Q6_K as random valid blocks."""
    import gguf

    real = gguf.quants.quantize

    def quantize(t: np.ndarray, q: gguf.GGMLQuantizationType) -> np.ndarray:
        if q.name == "Q4_K":
            return pack_ggml(torch.from_numpy(t), int(q)).numpy()
        if q.name == "Q6_K":
            _, per_block, nbytes = GGML_TYPES[int(q)]
            n, k = t.shape
            rng = np.random.default_rng(zlib.crc32(t.tobytes()))
            raw = rng.integers(0, 256, (n, k // per_block, nbytes), dtype=np.uint8)
            d = rng.uniform(0.005, 0.05, (n, k // per_block)).astype(np.float16)
            raw[..., 208:210] = d.view(np.uint8).reshape(n, k // per_block, 2)
            return raw.reshape(n, -1)
        return real(t, q)

    gguf.quants.quantize = quantize
    try:
        yield
    finally:
        gguf.quants.quantize = real


@functools.cache
def _dense(root: Path, case: str) -> Path:
    if case == "gguf-k":  # down_proj in Q6_K (16-wide groups), as Q4_K_M files have
        # o_proj: 768 columns, 3 super-blocks a row, 384 per rank (one block cut through)
        hf = make_tiny_llama_dir(root / "hf768", seed=5, hidden_size=768, intermediate_size=1024)
        with _k_quant_writer():
            return make_tiny_llama_gguf(hf, root / "k.gguf", "Q4_K",
                                        overrides={"ffn_down.weight": "Q6_K"})
    if case.startswith("nf4"):  # wider: double quant's code books (1 KiB) stay whole
        hf = make_tiny_llama_dir(root / "hf256", seed=3, hidden_size=256, intermediate_size=512)
        return _nf4_checkpoint(hf, root / case, *DENSE[case])
    hf = make_tiny_llama_dir(root / "hf", seed=3)  # hidden 64, intermediate 128, 4/2 heads
    how = DENSE[case]
    out = root / case
    out.mkdir()
    if isinstance(how, tuple):
        method, bits, sym, act_order = how
        return quantize_folder(hf, out, method, bits, 32, sym=sym, act_order=act_order)[0]
    if how == "fp8-online":
        return hf
    if how.startswith("fp8"):
        return _fp8_checkpoint(hf, out / "fp8", per_channel=how.endswith("channel"),
                               ct=how == "fp8-ct-channel")
    return make_tiny_llama_gguf(hf, out / f"tiny-{how}.gguf", how)


def _nf4_checkpoint(hf: Path, out: Path, block: int, double_quant: bool, nested: int
                    ) -> Path:
    qt: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(hf / "model.safetensors")).items():
        pieces = nf4_encode(w, block, double_quant, nested) if is_quantizable(name) \
            else {"": w}
        qt.update({f"{name}{'.' + k if k else ''}": v for k, v in pieces.items()})
    return write_checkpoint(hf, out, qt, NF4Config(double_quant=double_quant),
                            float_dtype=torch.float32)


def _held_bytes(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Per quantized layer, the bytes of each checkpoint tensor it holds once loaded."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if getattr(m, "quant_method", None) is None:
            continue
        tensors = dict(m.named_parameters(recurse=False))
        tensors.update({f"raw.{k}": v for k, v in getattr(m, "gguf_raw", {}).items()})
        for shard, parts in getattr(m, "nf4_parts", {}).items():  # NF4 keeps them per shard
            tensors.update({f"nf4.{shard}.{k}": v for k, v in parts.items()})
        out[name] = {k: t.numel() * t.element_size() for k, t in tensors.items() if t.numel()}
    return out


def _rank(path: Path, rank: int, quantization: str | None, at_load: bool
          ) -> tuple[torch.nn.Module, dict[str, dict[str, int]]]:
    """One rank's model as the runner loads it, and what its quantized layers held before
    repacking; ``at_load`` False: the old path (every layer whole, cut before repacking)."""
    held: dict[str, dict[str, int]] = {}
    finish = quant_apply.finish_loading

    def record(model: torch.nn.Module) -> None:
        held.update(_held_bytes(model))
        finish(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_apply, "finish_loading", record)
        if not at_load:
            mp.setattr(tp_quant_load.RankSlices, "prepare", lambda self, layer, method: None)
        src = resolve_model(str(path))
        with sharded_at_build(rank, 2):
            model = load_model(src, load_model_config(src), LoadConfig(quantization=quantization),
                               torch.float32, torch.device("cpu"),
                               transform=functools.partial(shard_model, rank=rank, size=2))
    return model, held


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _check_rank(path: Path, quantization: str | None, min_layers: int) -> None:
    for rank in range(2):
        new, held = _rank(path, rank, quantization, at_load=True)
        old, held_old = _rank(path, rank, quantization, at_load=False)
        # (a) the same packed tensors, bit for bit
        got, want = _state(new), _state(old)
        assert got.keys() == want.keys()
        for k, w in want.items():
            assert got[k].dtype == w.dtype and torch.equal(got[k], w), k
        # (b) the layers built as the rank's slice held about half of each layer's bytes
        sliced = [n for n, m in new.named_modules()
                  if getattr(m, "quant_method", None) is not None
                  and getattr(m, "tp_shard", None) == (rank, 2)]
        assert len(sliced) >= min_layers
        for n in sliced:
            big = max(held_old[n], key=held_old[n].get)  # the codes (qweight / weight / raw)
            frac = 0.5
            cols = getattr(new.get_submodule(n).quant_method, "cols", None)
            if cols is not None:  # a GGUF row slice: the blocks overlapping its columns
                offset, part, kept = cols
                assert kept - part < 2 * 256 and offset < 256
                frac = kept / (2 * part)
            assert held[n][big] == held_old[n][big] * frac, (n, big)
            # replicated parts (GPTQ's g_idx, act-order scales, per-tensor FP8 scales) stay
            # small
            assert sum(held[n].values()) <= (frac + 0.1) * sum(held_old[n].values()), n
        assert sum(map(len, held.values())) and all(held_old[n] for n in held)


@pytest.mark.parametrize("case", list(DENSE))
def test_dense_rank_slices_equal_whole_then_cut(root: Path, case: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if case.startswith("nf4"):  # NF4's own codes and absmax as buffers, compared bit for bit
        monkeypatch.setenv("MODELPORT_NF4_CPU_INT8", "0")
    # 2 layers x (qkv, gate_up, o, down), all cut as they load
    _check_rank(_dense(root, case), REQUESTED.get(case), min_layers=8)


@pytest.mark.parametrize("arch,case", MOE)
def test_moe_rank_slices_equal_whole_then_cut(root: Path, arch: str, case: str) -> None:
    # every expert's gate_up and down of each sparse layer (8 experts), and the dense layers
    _check_rank(moe_checkpoint(root, arch, case), MOE_REQUESTED.get(case), min_layers=16)


def test_layers_a_format_cannot_cut_at_load_still_load_whole(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # o_proj's 32 columns per rank lie inside one GPTQ group of 64: loaded whole, cut after
    hf = make_tiny_llama_dir(tmp_path / "hf", seed=3)
    q, _ = quantize_folder(hf, tmp_path, "gptq", 4, 64)
    for rank in range(2):
        with caplog.at_level("INFO", logger="modelport.parallel.tp_quant_load"):
            new, held = _rank(q, rank, None, at_load=True)
        assert f"rank {rank}: 2 quantized layers (GPTQ)" in caplog.text
        old, _ = _rank(q, rank, None, at_load=False)
        got, want = _state(new), _state(old)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        o_proj = new.model.layers[0].self_attn.o_proj.inner
        assert getattr(o_proj, "tp_shard", None) is None  # not built as a slice
        assert held["model.layers.0.self_attn.o_proj.inner"]["qweight"] == 64 * 64 // 8 * 4
        down = new.model.layers[0].mlp.down_proj.inner  # 64 columns: whole groups
        assert down.tp_shard == (rank, 2)


def test_a_group_split_is_still_refused(tmp_path: Path) -> None:
    hf = make_tiny_llama_dir(tmp_path / "hf", intermediate_size=96)
    q, _ = quantize_folder(hf, tmp_path, "gptq", 4, 32)
    with pytest.raises(ValueError, match=r"splits 96 input columns into 48 per rank, which is "
                                         r"not a multiple of the group size 32"):
        _rank(q, 0, None, at_load=True)
    gguf = make_tiny_llama_gguf(hf, tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(ValueError, match=r"splits 96 input columns into 48 per rank"):
        _rank(gguf, 1, "gguf", at_load=True)


def test_k_quant_tp2_greedy_equals_tp1(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the engine: o_proj cut inside Q4_K super-blocks, down_proj in Q6_K."""
    monkeypatch.setattr(quant_loading, "NARROW_CPU_LM_HEAD", False)
    path = str(_dense(root, "gguf-k"))
    prompts = [[256, 10, 20, 30], [256] + list(range(40, 60))]
    # 5 tokens: the 6th of the second prompt is a near-tie (logprobs 2e-4 apart at TP=1)
    # that the ranks' bf16 partial sums flip, as they do with the old whole-then-cut path
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    kw = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=32,
              quantization="gguf")
    want = LLM(path, **kw).generate(prompt_token_ids=prompts, sampling_params=greedy,
                                    use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=greedy, use_tqdm=False)
        qkv = llm.llm_engine.core.runner.model.model.layers[0].self_attn.qkv_proj  # rank 0's
        assert qkv.tp_shard == (0, 2) and qkv.gguf_types == ("Q4_K",) * 3
    finally:
        llm.llm_engine.core.shutdown()
    assert_same_greedy(got, want)


def test_gguf_tp_check_uses_the_unpacked_group_of_the_down_projections() -> None:
    """A row-parallel cut must leave whole unpacked groups (Q6_K: 16 columns, Q4_K's
    sub-blocks and the 32-wide types: 32), not whole 256-wide super-blocks: a rank keeps the
    blocks its columns overlap (the gguf-k case above cuts through one)."""
    from types import SimpleNamespace

    from modelport.engine.arg_utils import _group_size
    from modelport.quantization.gguf import GGUFDummyConfig, GGUFQuantConfig

    def group(types: dict[str, int]) -> int | None:
        return _group_size(SimpleNamespace(name="gguf", config=GGUFQuantConfig(types)))

    down = "model.layers.{}.mlp.down_proj.weight"
    q4_k, q6_k, q8_0, f32 = 12, 14, 8, 0
    assert group({down.format(0): q6_k, "model.layers.0.self_attn.o_proj.weight": q4_k}) == 16
    assert group({down.format(0): q6_k, down.format(1): q4_k}) == 32
    assert group({"model.layers.0.block_sparse_moe.experts.3.w2.weight": q8_0}) == 32
    assert group({down.format(0): f32}) is None  # float: nothing to keep whole
    assert _group_size(SimpleNamespace(name="gguf", config=GGUFDummyConfig(q6_k))) == 16


def test_a_fused_checkpoint_tensor_is_cut_to_the_rows_shard_model_keeps() -> None:
    """q/k/v stored as one tensor (Phi-3; shard_id None): the rank's rows of each part, the
    rows ``shard_model`` keeps (TPShard.index), also through a packed output dim."""
    from modelport.layers.linear import QKVLinear
    from modelport.quantization.base import output_cut, outputs_aligned

    with torch.device("meta"):
        qkv = QKVLinear(64, 16, 8, 4)  # q 128 rows, k and v 64 each
    for rank in range(2):
        spec = tp_quant_load.whole_spec(qkv, "column", rank, 2)
        t = torch.arange(256 * 3).reshape(256, 3)
        torch.testing.assert_close(output_cut(spec, 0)(t, None), t[spec.index])
        torch.testing.assert_close(output_cut(spec, 0)(t[128:192], "k"),
                                   t[128:192][rank * 32:(rank + 1) * 32])
        assert outputs_aligned(spec, 8)
        packed = torch.arange(3 * 32).reshape(3, 32)  # 8 outputs a word along dim 1
        words = output_cut(spec, 1, 8)(packed, None)
        torch.testing.assert_close(words, packed[:, spec.index[::8] // 8])
        with pytest.raises(ValueError, match="holds 248 outputs along dim 0, expected 256"):
            output_cut(spec, 0)(t[:248], None)
