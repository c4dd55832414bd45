"""Phi-3 (fused qkv / gate_up, partial rotary, LongRoPE, sliding window), Granite
(multipliers) and OLMo 2 (post-norm, whole-projection q/k norms) against HF transformers on
tiny random models."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.tiny_models import _byte_level_tokenizer, hf_reference_logits, run_one_sequence
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.layers.rotary import RotaryEmbedding
from modelport.loader import load_model, load_model_config, resolve_model

ORIG = 32  # original_max_position_embeddings of the LongRoPE models (max_position: 256)
LONGROPE = ("phi3_longrope", "phi3_partial")
WINDOW = 6  # sliding_window of "phi3_sliding": every prompt here is longer
BASE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
            bos_token_id=256, eos_token_id=257, pad_token_id=258, initializer_range=0.05,
            rms_norm_eps=1e-5)


def _longrope(n: int = 8) -> dict[str, Any]:
    """A fresh dict each time (HF's config classes fill in the dict they are given)."""
    return {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [1.0 + 0.7 * i for i in range(n)]}


def _configs() -> dict[str, Any]:
    from transformers import GraniteConfig, Olmo2Config, Phi3Config

    return {
        "phi3": Phi3Config(**BASE),
        # Phi-3.5-mini style: LongRoPE over the whole head
        "phi3_longrope": Phi3Config(**BASE, original_max_position_embeddings=ORIG,
                                    rope_scaling=_longrope()),
        # Phi-4-mini style: 3/4 of each head rotated, LongRoPE, tied embeddings
        "phi3_partial": Phi3Config(**{**BASE, "num_hidden_layers": 3},
                                   original_max_position_embeddings=ORIG,
                                   partial_rotary_factor=0.75, tie_word_embeddings=True,
                                   rope_scaling=_longrope(6)),
        # Phi-3-mini-4k style: a sliding window (there 2047 of 4096 positions)
        "phi3_sliding": Phi3Config(**BASE, sliding_window=WINDOW),
        "granite": GraniteConfig(**BASE, embedding_multiplier=12.0, residual_multiplier=0.22,
                                 attention_multiplier=0.03, logits_scaling=8.0,
                                 tie_word_embeddings=True),  # as Granite 3.x
        "olmo2": Olmo2Config(**BASE),
    }


def _save(cfg: Any, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones: random, so a missed norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    _byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("more")
    return {name: _save(cfg, root / name) for name, cfg in _configs().items()}


def _ours(d: Path, max_model_len: int | None = None) -> torch.nn.Module:
    """Our model; max_model_len as the engine would set it (None: max_position_embeddings,
    so LongRoPE models take the long factors)."""
    src = resolve_model(str(d))
    config = dataclasses.replace(load_model_config(src), max_model_len=max_model_len)
    return load_model(src, config, LoadConfig(), torch.float32, torch.device("cpu"))


def _ids(n: int, seed: int = 0) -> list[int]:
    return [(7 * i + 3 + 11 * seed) % 256 for i in range(n)]


@pytest.mark.parametrize("name", list(_configs()))
@pytest.mark.parametrize("n", [ORIG - 12, ORIG, ORIG + 18])
def test_logits_match_hf(dirs: dict[str, Path], name: str, n: int) -> None:
    """fp32 logits of one prefill. LongRoPE: prompts up to ORIG with max_model_len = ORIG
    (short factors, which HF uses up to ORIG tokens), the longer one with the default
    max_model_len 256 (long factors, which HF uses past ORIG tokens)."""
    ids = _ids(n)
    got = run_one_sequence(_ours(dirs[name], max_model_len=ORIG if n <= ORIG else None), ids)
    torch.testing.assert_close(got, hf_reference_logits(dirs[name], ids), atol=2e-5, rtol=1e-5)


def _with_rope(dirs: dict[str, Path], tmp_path: Path, name: str, **changes: Any) -> Path:
    cfg = json.loads((dirs[name] / "config.json").read_text())
    return _write_variant(dirs, tmp_path, name,
                          rope_parameters={**cfg["rope_parameters"], **changes})


@pytest.mark.parametrize("name", LONGROPE)
def test_longrope_long_factors_for_every_prompt_past_the_original_length(
        dirs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        name: str) -> None:
    """max_model_len > ORIG: the long factors rotate a short prompt too (as vLLM; HF would
    use the short ones), with one warning; the logits are HF's for a config whose short
    factors are the long ones. max_model_len <= ORIG: the short factors, no warning."""
    d, ids = dirs[name], _ids(ORIG - 12)
    with caplog.at_level(logging.WARNING, logger="modelport.layers.longrope"):
        long_model = _ours(d)
    warned = [r.getMessage() for r in caplog.records if "LongRoPE" in r.getMessage()]
    assert len(warned) == 1
    assert "max_model_len 256 > original_max_position_embeddings 32" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelport.layers.longrope"):
        short_model = _ours(d, max_model_len=ORIG)
    assert not [r for r in caplog.records if "LongRoPE" in r.getMessage()]
    got_long, got_short = run_one_sequence(long_model, ids), run_one_sequence(short_model, ids)
    assert (got_long - got_short).abs().max() > 1e-3
    torch.testing.assert_close(got_short, hf_reference_logits(d, ids), atol=2e-5, rtol=1e-5)
    cfg = json.loads((d / "config.json").read_text())
    as_long = _with_rope(dirs, tmp_path, name,
                         short_factor=cfg["rope_parameters"]["long_factor"])
    torch.testing.assert_close(got_long, hf_reference_logits(as_long, ids), atol=2e-5,
                               rtol=1e-5)


def test_longrope_table_is_one_plain_rotary_table(dirs: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One [max_position, rotary_dim] table of the chosen factors, scaled by the attention
    factor, in a plain RotaryEmbedding: the decode kernel's built-in rotary (which reads the
    table by raw position) and the fused-op swaps (exact class) take it."""
    from types import SimpleNamespace

    from modelport.layers import triton_attention

    rot = _ours(dirs["phi3_longrope"]).model.layers[0].self_attn.rotary_emb
    assert type(rot) is RotaryEmbedding and rot.cos_sin_cache.shape == (256, 16)
    factor = (1 + torch.tensor(256 / ORIG).log().item()
              / torch.tensor(float(ORIG)).log().item()) ** 0.5
    assert rot.cos_sin_cache[0, 0].item() == pytest.approx(factor)
    monkeypatch.setattr(triton_attention, "ROPE_IN_DECODE", True)
    meta = SimpleNamespace(max_query_len=1)  # a decode-only step
    assert triton_attention.rope_fits(torch.zeros(3, 4, 16), torch.zeros(2, 1, 8, 2, 16), meta,
                                      rot)


def _hf_greedy(d: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=258)
    return out[0, len(prompt):].tolist()


KW = dict(kv_cache_memory=4 << 20, block_size=8, max_num_batched_tokens=128, seed=0)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


SHORT_PROMPTS = [_ids(ORIG - 20, 1), _ids(ORIG - 12, 3)]  # + 10 tokens: at most ORIG
LONG_PROMPTS = [_ids(ORIG + 6, 2), _ids(ORIG + 1, 4)]  # longer than ORIG from the start


def _greedy_cases() -> list[tuple[str, int | None, list[list[int]]]]:
    """(model, max_model_len, prompts): a LongRoPE model with max_model_len = ORIG (short
    factors) on prompts whose sequences stay within ORIG, and with the default 256 (long
    factors) on prompts longer than ORIG, which is where HF uses those factors too."""
    cases = []
    for name in ("phi3_longrope", "phi3_partial", "phi3_sliding", "granite", "olmo2"):
        if name in LONGROPE:
            cases += [(name, ORIG, SHORT_PROMPTS), (name, None, LONG_PROMPTS)]
        else:
            cases.append((name, None, SHORT_PROMPTS + LONG_PROMPTS))
    return cases


@pytest.mark.parametrize("name, max_model_len, prompts", _greedy_cases())
def test_llm_greedy_equals_hf_generate_and_batching(dirs: dict[str, Path], name: str,
                                                    max_model_len: int | None,
                                                    prompts: list[list[int]]) -> None:
    """10 greedy tokens through LLM equal HF generate (with its KV cache); generated together
    or one at a time (then from prefix-cached blocks: prefix caching stays on), the tokens
    are the same."""
    d = dirs[name]
    want = [_hf_greedy(d, p, 10) for p in prompts]
    kw = {**KW, "max_model_len": max_model_len} if max_model_len else KW
    llm = LLM(str(d), **kw)
    batched = [o.outputs[0].token_ids for o in
               llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]
    alone = llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY, use_tqdm=False)
    alone += [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY,
                           use_tqdm=False)[0] for p in prompts[1:]]
    assert [list(t) for t in batched] == want
    assert [o.outputs[0].token_ids for o in alone] == batched
    assert all(o.num_cached_tokens >= 8 for o in alone)  # full 8-token blocks were reused
    if name == "phi3_longrope" and max_model_len is None:
        # chunked prefill (16-token budget) with a step in flight: the same tokens
        llm = LLM(str(d), **{**KW, "async_scheduling": True, "max_num_batched_tokens": 16,
                             "enable_prefix_caching": False})
        got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in got] == want


def test_phi3_sliding_window_reaches_every_layer(dirs: dict[str, Path], tmp_path: Path) -> None:
    """HF's Phi-3 windows every layer (a query at p sees keys > p - window); the window
    changes the logits; a window covering every position (Phi-3-mini-128k: 262144) is full
    attention."""
    model = _ours(dirs["phi3_sliding"])
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [WINDOW] * 2
    ids = _ids(20)
    full = _write_variant(dirs, tmp_path, "phi3_sliding", sliding_window=262144)
    unwindowed = _ours(full)
    assert [layer.self_attn.attn.sliding_window for layer in unwindowed.model.layers] == [None] * 2
    got, plain = run_one_sequence(model, ids), run_one_sequence(unwindowed, ids)
    torch.testing.assert_close(got[:WINDOW], plain[:WINDOW])  # same until the window slides
    assert (got[WINDOW:] - plain[WINDOW:]).abs().max() > 1e-3


def test_granite_logits_scaling_and_multipliers_are_used(dirs: dict[str, Path]) -> None:
    model = _ours(dirs["granite"])
    assert model.model.layers[0].self_attn.attn.scale == 0.03
    assert model.model.layers[0].residual_multiplier == 0.22
    hidden = torch.randn(3, 64)
    plain = torch.nn.functional.linear(hidden, model.lm_head.weight)
    torch.testing.assert_close(model.compute_logits(hidden), plain / 8.0)
    # the greedy shortcut of the CPU head must not skip the division's rounding
    assert model.lm_head.greedy(hidden) is None


def test_fused_decode_swap_leaves_the_new_layers_alone(dirs: dict[str, Path]) -> None:
    from modelport.layers.fused_decode import fuse_decode_layers

    for name in ("phi3_longrope", "granite", "olmo2"):
        model = _ours(dirs[name]).to(torch.bfloat16)
        assert fuse_decode_layers(model) == 0


def test_phi3_loads_fused_tensors_as_stored(dirs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    ckpt = load_file(str(dirs["phi3"] / "model.safetensors"))
    model = _ours(dirs["phi3"])
    attn = model.model.layers[1].self_attn
    assert torch.equal(attn.qkv_proj.weight, ckpt["model.layers.1.self_attn.qkv_proj.weight"])
    assert torch.equal(model.model.layers[1].mlp.gate_up_proj.weight,
                       ckpt["model.layers.1.mlp.gate_up_proj.weight"])


def test_phi3_tensor_parallel_splits_fused_qkv(dirs: dict[str, Path]) -> None:
    """q (4 heads) and k / v (2 heads each) of the fused tensor split by their own ranges."""
    from modelport.parallel.tensor_parallel import shard_model

    full = _ours(dirs["phi3_partial"])
    ref = full.model.layers[0].self_attn.qkv_proj
    x = torch.randn(5, 64)
    q, k, v = ref.split(ref(x))
    parts = []
    for rank in range(2):
        m = _ours(dirs["phi3_partial"])
        shard_model(m, rank, 2)
        p = m.model.layers[0].self_attn.qkv_proj
        parts.append(p.split(p(x)))
    for i, want in enumerate((q, k, v)):
        torch.testing.assert_close(torch.cat([p[i] for p in parts], -1), want)


def test_phi3_tp2_greedy_equals_tp1(dirs: dict[str, Path]) -> None:
    d = dirs["phi3_partial"]
    prompts = [_ids(ORIG - 4, 1), _ids(ORIG + 6, 2)]
    want = LLM(str(d), **KW).generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                      use_tqdm=False)
    llm = LLM(str(d), tensor_parallel_size=2, **KW)
    try:
        got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        llm.llm_engine.core.shutdown()


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")  # q/k/v/o, qkv (Phi-3), gate/up/down, gate_up


def _fp8_reference(src: Path, out: Path, per_tensor: bool) -> tuple[Path, Path | None]:
    """A float folder with each projection rounded to E4M3 as the FP8 path stores it (per
    output row, or per tensor), and for per_tensor an FP8 checkpoint of the same bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from modelport.quantization.fp8 import FP8Config
    from modelport.quantization.tools.writer import write_checkpoint

    tensors = load_file(str(src / "model.safetensors"))
    ref, quant = {}, {}
    for name, w in tensors.items():
        if not _is_linear(name):
            ref[name] = quant[name] = w
            continue
        amax = w.abs().max() if per_tensor else w.abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        ref[name] = q.float() * scale
        quant[name], quant[name + "_scale"] = q, scale.reshape(-1)
    shutil.copytree(src, out / "ref")
    save_file(ref, str(out / "ref" / "model.safetensors"))
    if not per_tensor:
        return out / "ref", None
    return out / "ref", write_checkpoint(src, out / "q", quant, FP8Config(),
                                         float_dtype=torch.float32)


@pytest.mark.parametrize("name", ["phi3_partial", "granite", "olmo2"])
def test_online_fp8_on_cpu_is_exact(dirs: dict[str, Path], tmp_path: Path, name: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """quantization="fp8" reaches every projection (the fused Phi-3 ones too): with the FP8
    bytes kept (MODELPORT_FP8_CPU_INT8=0), the logits are those of the E4M3-rounded weights."""
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")
    ref_dir, _ = _fp8_reference(dirs[name], tmp_path, per_tensor=False)
    src = resolve_model(str(dirs[name]))
    q = load_model(src, load_model_config(src), LoadConfig(quantization="fp8"), torch.float32,
                   torch.device("cpu"))
    for layer in q.model.layers:
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                  layer.mlp.down_proj):
            assert m.fp8_weight.dtype == torch.float8_e4m3fn
    ids = _ids(40)
    torch.testing.assert_close(run_one_sequence(q, ids), run_one_sequence(_ours(ref_dir), ids),
                               atol=1e-4, rtol=1e-4)


def test_phi3_fp8_checkpoint_loads_fused_tensors_by_name(dirs: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-quantized Phi-3 checkpoint stores qkv_proj / gate_up_proj as one FP8 tensor with
    one scale each: loaded by name, no split needed."""
    monkeypatch.setenv("MODELPORT_FP8_CPU_INT8", "0")
    ref_dir, qdir = _fp8_reference(dirs["phi3_partial"], tmp_path, per_tensor=True)
    assert qdir is not None
    ids = _ids(40)
    got = run_one_sequence(_ours(qdir), ids)
    torch.testing.assert_close(got, run_one_sequence(_ours(ref_dir), ids), atol=1e-4, rtol=1e-4)


def _write_variant(dirs: dict[str, Path], tmp_path: Path, name: str, **changes: Any) -> Path:
    import shutil

    d = tmp_path / name
    shutil.copytree(dirs[name], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name, changes, message", [
    ("phi3", {"sliding_window": 0}, "sliding_window must be a positive integer or null, got 0"),
    ("granite", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("phi3_longrope", {"rope_parameters": {**_longrope(), "rope_type": "longrope",
                                           "short_factor": [1.0] * 3}},
     r"rope_scaling.short_factor must be a list of 8 numbers"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                  "partial_rotary_factor": 0.1}},
     "partial_rotary_factor=0.1 is not supported"),
    ("phi3", {"rope_parameters": {"rope_type": "proportional", "factor": 2.0,
                                  "rope_theta": 1e4}},
     "unsupported rope scaling type 'proportional'"),
    # Phi-3's old name for longrope (HF reads it so), here without its factors
    ("phi3", {"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}},
     r"rope_scaling.short_factor must be a list of 8 numbers .* got None"),
])
def test_unsupported_options_are_refused_at_load(dirs: dict[str, Path], tmp_path: Path,
                                                 name: str, changes: dict, message: str) -> None:
    d = _write_variant(dirs, tmp_path, name, **changes)
    with pytest.raises(ValueError, match=message):
        _ours(d)


def test_olmo2_tensor_parallel_is_refused(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="OLMo 2 .* does not support tensor_parallel_size > 1"):
        LLM(str(dirs["olmo2"]), tensor_parallel_size=2, **KW)


def test_llm_keeps_prefix_caching_and_passes_max_model_len_for_longrope(
        dirs: dict[str, Path]) -> None:
    """The LongRoPE factors are fixed per engine, so prefix caching stays on; the model is
    built with the engine's max_model_len (which picks the factors)."""
    cfg = LLM(str(dirs["phi3_longrope"]), **KW).llm_engine.config
    assert cfg.cache_config.enable_prefix_caching
    assert cfg.model_config.max_model_len == 256
    short = LLM(str(dirs["phi3_longrope"]), max_model_len=ORIG, **KW).llm_engine.config
    assert short.cache_config.enable_prefix_caching
    assert short.model_config.max_model_len == ORIG


def _hf_greedy_cuda_bf16(d: Path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF's bf16 greedy tokens and, for each, the gap between its top two logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=258, output_scores=True, return_dict_in_generate=True)
    gaps = [float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


@pytest.mark.gpu
@pytest.mark.parametrize("name, max_model_len, prompts", _greedy_cases())
def test_cuda_bf16_greedy_matches_hf(dirs: dict[str, Path], name: str,
                                     max_model_len: int | None,
                                     prompts: list[list[int]]) -> None:
    """On CUDA (Triton attention with its decode-step rotary, fused small ops, GEMV decode,
    CUDA graphs) in bf16: the first tokens equal HF's bf16 generate, batched equals one at
    a time."""
    d = dirs[name]
    llm = LLM(str(d), device="cuda", dtype="bfloat16", kv_cache_memory=1 << 30,
              max_num_batched_tokens=128, block_size=16, seed=0,
              **({"max_model_len": max_model_len} if max_model_len else {}))
    batched = [o.outputs[0].token_ids for o in
               llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY,
                          use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    compared = 0
    for p, got in zip(prompts, alone):
        want, gaps = _hf_greedy_cuda_bf16(d, p, 6)
        # compared up to HF's first near-tie: two bf16 implementations may break a tie of a
        # random tiny model's flat logits either way (a real error differs from the start)
        n = next((i for i, gap in enumerate(gaps) if gap < 0.02), len(want))
        assert list(got[:n]) == want[:n], (name, p[:4], gaps)
        compared += n
    assert compared >= 2, (name, "too few tokens before a near-tie to compare")


def test_phi3_su_is_longrope(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Old Phi-3 configs name LongRoPE "su" (HF reads it as longrope): the same table and
    logits."""
    d = _with_rope(dirs, tmp_path, "phi3_longrope", rope_type="su", type="su")
    ids = _ids(ORIG + 8)
    table = _ours(d).model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert torch.equal(table, _ours(dirs["phi3_longrope"]).model.layers[0].self_attn
                       .rotary_emb.cos_sin_cache)
    torch.testing.assert_close(run_one_sequence(_ours(d), ids),
                               run_one_sequence(_ours(dirs["phi3_longrope"]), ids))


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_phi3_awq_gptq_checkpoints_load_fused_tensors_by_name(
        dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        method: str) -> None:
    """4-bit AWQ / GPTQ Phi-3 checkpoints keep qkv_proj / gate_up_proj fused (qweight,
    qzeros, scales of the whole projection): our loader takes them by name; the logits equal
    those of the reference dequantization (the format's reference kernel)."""
    from safetensors.torch import load_file, save_file

    from modelport.quantization import kernels
    from modelport.quantization.awq import AWQConfig, pack_awq
    from modelport.quantization.gptq import GPTQConfig, pack_gptq
    from modelport.quantization.tools.rtn import rtn_quantize
    from modelport.quantization.tools.writer import write_checkpoint
    from test_quant_awq_gptq import ref_dequant_awq, ref_dequant_gptq

    src = dirs["phi3_partial"]
    quant, ref = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not _is_linear(name):
            quant[name] = ref[name] = w
            continue
        codes, zeros, scales = rtn_quantize(w, 4, 32, False)
        if method == "awq":
            packed = pack_awq(codes, zeros, scales)
            deq = ref_dequant_awq(packed["qweight"], packed["qzeros"], packed["scales"], 32)
        else:
            packed = pack_gptq(codes, zeros, scales, 4)
            deq = ref_dequant_gptq(packed["qweight"], packed["qzeros"], packed["scales"],
                                   packed["g_idx"], 4)
        quant.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
        ref[name] = torch.from_numpy(deq)
    cfg = AWQConfig(bits=4, group_size=32) if method == "awq" else GPTQConfig(bits=4,
                                                                               group_size=32)
    qdir = write_checkpoint(src, tmp_path / "q", quant, cfg, float_dtype=torch.float32)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "ref" / "model.safetensors"))
    monkeypatch.setattr(kernels, "cpu_int4_fits", lambda gq: False)
    monkeypatch.setattr(kernels, "cpu_int8_fits", lambda gq: False)
    ids = _ids(40)
    torch.testing.assert_close(run_one_sequence(_ours(qdir), ids),
                               run_one_sequence(_ours(tmp_path / "ref"), ids),
                               atol=2e-4, rtol=1e-4)
