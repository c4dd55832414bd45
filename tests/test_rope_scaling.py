"""YaRN and dynamic-NTK rope scaling (layers/rotary.py) against HF transformers 5.

The tables first (inverse frequencies, attention factor, cos/sin), then tiny random Llama and
Qwen3 checkpoints through the whole engine with a tiny original length (32), so prompts run
well past it, then the config paths (rope_parameters, old rope_scaling, hf_overrides, the
CLI), the planner, and configs that cannot be built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.tiny_models import (
    TINY_VOCAB,
    _save,
    hf_reference_logits,
    make_tiny_llama_dir,
)
from modelport import LLM, SamplingParams
from modelport.config import ModelConfig
from modelport.entrypoints import vllm_compat
from modelport.layers.rotary import (
    ROPE_TYPES,
    RopeSettings,
    RotaryEmbedding,
    compute_inv_freq,
    default_max_model_len,
    max_model_len_limit,
    rope_attention_factor,
    rope_settings,
)

ORIG = 32  # the tiny "pretraining" length
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0}
PROMPT = [256] + [(7 * i + 3) % 256 for i in range(59)]  # 60 tokens: past ORIG
KW: dict[str, Any] = {"kv_cache_memory": 8 << 20, "block_size": 8,
                      "max_num_batched_tokens": 32}  # prompts go in chunks
HD = 16  # head_dim of the tiny models


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------
def _hf_config(scaling: dict, max_pos: int, theta: float = 10000.0, **extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=64 // HD, num_key_value_heads=2,
                       intermediate_size=32, max_position_embeddings=max_pos, rope_theta=theta,
                       rope_scaling=dict(scaling), **extra)


def _ours(hf_cfg, max_model_len: int | None = None) -> ModelConfig:
    d = {**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return dataclasses.replace(ModelConfig.from_hf_dict(d), max_model_len=max_model_len)


def _hf_cos_sin(hf_cfg, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos and sin (first half: the other repeats it) for positions 0..n-1 in one
    forward (dynamic NTK: scaled for a sequence of n tokens)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cos, sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1), torch.arange(n)[None])
    return cos[0, :, : HD // 2], sin[0, :, : HD // 2]


def _assert_table(rot: RotaryEmbedding, hf_cfg, n: int) -> None:
    cos, sin = _hf_cos_sin(hf_cfg, n)
    table = rot.cos_sin_cache
    assert table.shape[0] == n
    assert torch.equal(table[:, : HD // 2], cos) and torch.equal(table[:, HD // 2 :], sin)


YARN_CASES = [
    ("qwen", YARN, {}),
    ("no-truncate", {**YARN, "truncate": False}, {}),  # gpt-oss
    ("betas", {**YARN, "factor": 8.0, "beta_fast": 16, "beta_slow": 2}, {}),
    ("mscale", {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, {}),  # DeepSeek style
    ("mscale-only", {**YARN, "mscale": 0.707}, {}),  # needs both: the default factor
    ("attention-factor", {**YARN, "attention_factor": 0.8}, {"theta": 1e6}),
    ("integers", {**YARN, "factor": 4}, {"theta": 1000000}),
    ("backwards-betas", {**YARN, "beta_fast": 1, "beta_slow": 32}, {}),  # HF: a warning
    # no factor: max_position_embeddings / original (a top-level original wins, as in HF)
    ("derived", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
     {"max_pos": 128}),
    ("derived-top-level", {"rope_type": "yarn", "factor": None},
     {"max_pos": 128, "original_max_position_embeddings": 16}),
]


@pytest.mark.parametrize("name, scaling, kw", YARN_CASES, ids=[c[0] for c in YARN_CASES])
def test_yarn_table_equals_transformers(name: str, scaling: dict, kw: dict, caplog) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = dict(kw)
    max_pos = kw.pop("max_pos", ORIG)
    hf_cfg = _hf_config(scaling, max_pos, theta=kw.pop("theta", 10000.0), **kw)
    inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, None)
    settings = rope_settings(_ours(hf_cfg, max_model_len=128))
    assert settings.scaling["rope_type"] == "yarn"
    assert torch.equal(compute_inv_freq(HD, settings), inv_freq)
    assert rope_attention_factor(settings) == attention
    if name != "attention-factor":
        assert attention != 1.0  # the case exercises the factor
    with caplog.at_level(logging.WARNING, logger="modelport.layers.rotary"):
        rot = RotaryEmbedding(HD, settings)
    assert ("runs backwards" in caplog.text) == (name == "backwards-betas")
    _assert_table(rot, hf_cfg, 128)


@pytest.mark.parametrize("max_pos, max_model_len, theta, factor", [
    (ORIG, None, 10000.0, 4.0),  # the engine's default: the plain frequencies
    (ORIG, ORIG, 10000.0, 4.0),
    (ORIG, 20, 10000.0, 4.0),
    (ORIG, 70, 10000.0, 4.0),  # longer: scaled for 70 tokens, as HF for a 70-token sequence
    (30, 97, 1e6, 2.5),
    (ORIG, 128, 10000.0, 4.0),  # max_pos * factor: vLLM's fixed base
])
def test_dynamic_table_equals_transformers_at_the_engines_length(
        max_pos: int, max_model_len: int | None, theta: float, factor: float, caplog) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = _hf_config({"rope_type": "dynamic", "factor": factor}, max_pos, theta=theta)
    settings = rope_settings(_ours(hf_cfg, max_model_len))
    n = max(max_pos, max_model_len or 0)
    longer = n > max_pos
    # HF: its initial frequencies, or the ones it recomputes for an n-token sequence
    seq = torch.tensor(n) if longer else None
    inv_freq, attention = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, None, seq_len=seq)
    assert torch.equal(compute_inv_freq(HD, settings), inv_freq)
    assert rope_attention_factor(settings) == attention == 1.0
    with caplog.at_level(logging.WARNING, logger="modelport.layers.rotary"):
        rot = RotaryEmbedding(HD, settings)
    assert rot.cos_sin_cache.shape[0] == n
    assert (f"max_model_len <= {max_pos} to match HF exactly" in caplog.text) == longer
    _assert_table(rot, hf_cfg, n)
    if longer:  # vLLM's base (for max_pos * factor) only at that length
        assert not torch.equal(compute_inv_freq(HD, dataclasses.replace(
            settings, max_model_len=max_pos)), inv_freq)


def test_rope_types_name_the_new_ones() -> None:
    assert {"yarn", "dynamic"} <= set(ROPE_TYPES)
    settings = rope_settings(_ours(_hf_config({"rope_type": "linear", "factor": 2.0}, ORIG)))
    bad = dataclasses.replace(settings, scaling={"rope_type": "proportional"})
    with pytest.raises(ValueError, match="supported: default, linear, llama3, freq_factors, "
                                         "yarn, dynamic"):
        compute_inv_freq(HD, bad)


# ---------------------------------------------------------------------------------------
# the engine against HF
# ---------------------------------------------------------------------------------------
def _qwen3_dir(path: Path, scaling: dict, max_pos: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HD,
                      intermediate_size=128, max_position_embeddings=max_pos, rope_theta=1e6,
                      rope_scaling=dict(scaling), rms_norm_eps=1e-6, bos_token_id=256,
                      eos_token_id=257, pad_token_id=258, initializer_range=0.05,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k norms away from 1: the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return _save(model, Path(path), with_tokenizer=True)


def _make(family: str, path: Path, scaling: dict, max_pos: int = ORIG) -> Path:
    if family == "qwen3":
        return _qwen3_dir(path, scaling, max_pos)
    return make_tiny_llama_dir(path, rope_scaling=dict(scaling), max_position_embeddings=max_pos)


def _hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """HF's greedy tokens, each from a fresh forward over the whole sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 local_files_only=True).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _run(llm: LLM, prompt: list[int], n: int):  # noqa: ANN202 - a CompletionOutput
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1,
                        prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp, use_tqdm=False)[0]
    return out


def _assert_logprobs(out, ref: torch.Tensor) -> None:
    """Our prompt logprobs and sampled tokens' logprobs against HF's log-softmax rows of
    the whole sequence (prompt + output)."""
    prompt, toks = out.prompt_token_ids, out.outputs[0].token_ids
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 1e-4
    for j, tok in enumerate(toks):
        row = ref[len(prompt) - 1 + j]
        assert abs(out.outputs[0].logprobs[j][tok].logprob - float(row[tok])) < 1e-4
        assert tok == int(row.argmax())  # greedy by HF's logits of the same rotation


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_yarn_engine_matches_hf_past_the_original_length(tmp_path: Path, family: str) -> None:
    # Qwen2.5 style: max_position_embeddings is the original length; yarn reaches 4x
    d = _make(family, tmp_path / "m", YARN)
    llm = LLM(str(d), **KW)
    assert llm.llm_engine.config.scheduler_config.max_model_len == ORIG * 4  # vLLM's default
    out = _run(llm, PROMPT, 6)
    assert out.outputs[0].token_ids == _hf_greedy(d, PROMPT, 6)
    _assert_logprobs(out, hf_reference_logits(d, PROMPT + out.outputs[0].token_ids)
                     .log_softmax(-1))
    with pytest.raises(ValueError, match=r"max_model_len \(129\) is larger than the 128 "
                                         "positions the model's rope scaling reaches"):
        LLM(str(d), max_model_len=129, **KW)


def test_linear_engine_reaches_max_position_times_factor(tmp_path: Path) -> None:
    # linear scaling rotates each position alike at any length: max_model_len defaults to
    # and may reach max_position_embeddings x factor (vLLM's default and limit)
    d = _make("llama", tmp_path / "m", {"rope_type": "linear", "factor": 2.0})
    llm = LLM(str(d), **KW)
    assert llm.llm_engine.config.scheduler_config.max_model_len == ORIG * 2
    assert len(PROMPT) > ORIG
    out = _run(llm, PROMPT, 3)
    assert out.outputs[0].token_ids == _hf_greedy(d, PROMPT, 3)
    _assert_logprobs(out, hf_reference_logits(d, PROMPT + out.outputs[0].token_ids)
                     .log_softmax(-1))
    with pytest.raises(ValueError, match=r"max_model_len \(65\) is larger than the 64 "
                                         "positions the model's rope scaling reaches"):
        LLM(str(d), max_model_len=65, **KW)


def test_gemma3_linear_scaling_keeps_max_position_embeddings() -> None:
    # an older-style Gemma 3 config: its 131,072 positions already count the linear factor 8
    # (vLLM skips the factor for Gemma 3 too); a Llama with the same rope dict reaches 8x
    d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
         "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 128, "max_position_embeddings": 131072,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6}
    gemma = ModelConfig.from_hf_dict(d)
    llama = ModelConfig.from_hf_dict({**d, "architectures": ["LlamaForCausalLM"],
                                      "model_type": "llama"})
    assert max_model_len_limit(gemma) == default_max_model_len(gemma) == 131072
    assert max_model_len_limit(llama) == default_max_model_len(llama) == 8 * 131072


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dynamic_engine_matches_hf(tmp_path: Path, family: str, caplog) -> None:
    d = _make(family, tmp_path / "m", DYNAMIC)
    # the default max_model_len (max_position_embeddings): the plain frequencies, HF's at
    # every length the engine runs, generated tokens included
    llm = LLM(str(d), **KW)
    assert llm.llm_engine.config.scheduler_config.max_model_len == ORIG
    prompt = PROMPT[:24]
    out = _run(llm, prompt, 8)
    assert out.outputs[0].token_ids == _hf_greedy(d, prompt, 8)
    _assert_logprobs(out, hf_reference_logits(d, prompt + out.outputs[0].token_ids)
                     .log_softmax(-1))
    del llm
    # a longer engine: every position rotated with HF's base for max_model_len tokens, so a
    # sequence of exactly that length is HF's (HF rescales per forward: its greedy loop
    # would pick each token under a slightly different base)
    with caplog.at_level(logging.WARNING, logger="modelport.layers.rotary"):
        llm = LLM(str(d), max_model_len=64, **KW)
    assert "max_model_len 64 > max_position_embeddings 32" in caplog.text
    assert llm.llm_engine.config.cache_config.enable_prefix_caching  # one rotation a position
    out = _run(llm, PROMPT, 4)
    assert len(PROMPT) + 4 == 64
    _assert_logprobs(out, hf_reference_logits(d, PROMPT + out.outputs[0].token_ids)
                     .log_softmax(-1))
    del llm
    with pytest.raises(ValueError, match=r"larger than the 128 positions"):
        LLM(str(d), max_model_len=129, **KW)


def test_gemma3_yarn_on_its_global_layers_matches_hf(tmp_path: Path) -> None:
    """Gemma 3 builds its tables from per-layer-type rope_parameters (models/gemma.py): yarn
    on the full-attention layers, the local base on the sliding ones."""
    import transformers as tf

    rope = {"full_attention": {**YARN, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    cfg = tf.Gemma3TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=HD,
                              num_hidden_layers=4, sliding_window=16, sliding_window_pattern=2,
                              query_pre_attn_scalar=12, max_position_embeddings=128,
                              rope_parameters=rope, rms_norm_eps=1e-6, bos_token_id=256,
                              eos_token_id=257, pad_token_id=258, initializer_range=0.1)
    torch.manual_seed(1)
    d = _save(tf.AutoModelForCausalLM.from_config(cfg).eval(), tmp_path / "m", True)
    out = _run(LLM(str(d), **KW), PROMPT, 4)
    _assert_logprobs(out, hf_reference_logits(d, PROMPT + out.outputs[0].token_ids)
                     .log_softmax(-1))


# ---------------------------------------------------------------------------------------
# config paths
# ---------------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, change) -> Path:  # noqa: ANN001 - a dict -> None callable
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _old_style(kind_key: str):  # noqa: ANN202
    def change(cfg: dict) -> None:
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params.pop("rope_type")
        cfg["rope_scaling"] = {kind_key: "yarn", **params}
    return change


def _plain(cfg: dict) -> None:
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.fixture(scope="module")
def yarn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make("llama", tmp_path_factory.mktemp("yarn") / "m", YARN)


@pytest.fixture(scope="module")
def yarn_ref(yarn_dir: Path) -> torch.Tensor:
    return hf_reference_logits(yarn_dir, PROMPT).log_softmax(-1)


@pytest.mark.parametrize("path", ["rope_parameters", "rope_scaling.type",
                                  "rope_scaling.rope_type", "hf_overrides"])
def test_yarn_reaches_the_model_through_every_config_path(
        yarn_dir: Path, yarn_ref: torch.Tensor, tmp_path: Path, path: str) -> None:
    assert "rope_parameters" in json.loads((yarn_dir / "config.json").read_text())
    kw = dict(KW)
    if path == "rope_parameters":  # what transformers 5 writes
        d = yarn_dir
    elif path.startswith("rope_scaling"):  # rope_theta + rope_scaling, "type" or "rope_type"
        d = _rewrite(yarn_dir, tmp_path / "m", _old_style(path.split(".")[1]))
        assert "rope_parameters" not in json.loads((d / "config.json").read_text())
    else:  # a plain config and vLLM's hf_overrides
        d = _rewrite(yarn_dir, tmp_path / "m", _plain)
        kw["hf_overrides"] = {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": ORIG}}
    llm = LLM(str(d), **kw)
    assert llm.llm_engine.config.scheduler_config.max_model_len == 128
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp, use_tqdm=False)[0]
    for i in range(1, len(PROMPT)):
        assert abs(out.prompt_logprobs[i][PROMPT[i]].logprob - float(yarn_ref[i - 1, PROMPT[i]])
                   ) < 1e-4


def test_cli_rope_flags_give_yarn_and_dynamic(yarn_dir: Path, tmp_path: Path) -> None:
    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.cli_serve import take_model_tag
    from modelport.entrypoints.openai.api_server import engine_args_from

    def serve(line: str):  # noqa: ANN202 - `modelport serve LINE`, checked as the server does
        args = build_parser().parse_args(["serve", *shlex.split(line)])
        take_model_tag(args)
        vllm_compat.check(args)
        return args

    plain = _rewrite(yarn_dir, tmp_path / "m", _plain)
    args = serve(f"{plain} --rope-theta 500000 --rope-scaling '{json.dumps(YARN)}' "
                 "--device cpu")
    cfg = engine_args_from(args).create_engine_config()
    s = rope_settings(cfg.model_config)
    assert s.theta == 5e5 and s.scaling == YARN
    assert cfg.scheduler_config.max_model_len == 128
    args = serve(f"{plain} --rope-scaling '{json.dumps(DYNAMIC)}' --max-model-len 100 "
                 "--device cpu")
    cfg = engine_args_from(args).create_engine_config()
    s = rope_settings(cfg.model_config)
    assert s.scaling == DYNAMIC and s.max_model_len == 100 and s.table_positions == 100
    args = serve(f"{plain} --hf-overrides '{json.dumps({'rope_scaling': DYNAMIC})}' "
                 "--max-model-len 129 --device cpu")
    with pytest.raises(ValueError, match="larger than the 128 positions"):
        engine_args_from(args).create_engine_config()


def test_planner_takes_yarn_and_dynamic(yarn_dir: Path, tmp_path: Path) -> None:
    from modelport.engine.arg_utils import EngineArgs
    from modelport.planner.errors import PlanError
    from modelport.planner.hardware import resolve_device
    from modelport.planner.model_source import resolve_model as planner_resolve
    from modelport.planner.plan import PlanRequest, make_plan

    cpu = resolve_device("cpu", memory_gib=8.0)
    dynamic = _rewrite(yarn_dir, tmp_path / "d", lambda c: c.update(
        rope_parameters={"rope_theta": 10000.0, **DYNAMIC}))
    for d, default in ((yarn_dir, 128), (dynamic, ORIG)):
        src = planner_resolve(str(d))
        plan = make_plan(PlanRequest(src, cpu, kv_cache_memory=8 << 20))
        engine = EngineArgs(model=str(d), device="cpu", kv_cache_memory=8 << 20
                            ).create_engine_config()
        assert plan.max_model_len == engine.scheduler_config.max_model_len == default
        assert make_plan(PlanRequest(src, cpu, kv_cache_memory=8 << 20,
                                     max_model_len=128)).max_model_len == 128
        with pytest.raises(PlanError, match="--max-model-len: 129 is larger than the 128"):
            PlanRequest(src, cpu, max_model_len=129)
    # the rotary table covers the engine's length past max_position_embeddings: as held
    llm = LLM(str(yarn_dir), **KW)
    model = llm.llm_engine.core.runner.model
    held = {b.data_ptr(): b.numel() * b.element_size() for name, b in model.named_buffers(
        remove_duplicate=False) if name.endswith("cos_sin_cache")}
    plan = make_plan(PlanRequest(planner_resolve(str(yarn_dir)), cpu, kv_cache_memory=8 << 20))
    assert sum(held.values()) == plan.budget.buffer_bytes == 128 * HD * 4


# ---------------------------------------------------------------------------------------
# configs that cannot be built
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "yarn"}, r"rope yarn needs 'factor' \(or an original_max_position_"
                            r"embeddings below max_position_embeddings"),
    ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": ORIG},
     "rope yarn needs 'factor'"),  # nothing to derive it from: the same length
    ({**YARN, "factor": "4"}, "rope yarn factor must be a number, got '4'"),
    ({**YARN, "factor": 0}, "rope yarn factor must be > 0"),
    ({**YARN, "beta_fast": -32}, "rope yarn beta_fast must be > 0"),  # HF: a math error
    ({**YARN, "beta_slow": "1"}, "rope yarn beta_slow must be a number"),
    ({**YARN, "original_max_position_embeddings": -4},
     "original_max_position_embeddings must be a positive integer"),
    ({**YARN, "mscale": "x", "mscale_all_dim": 1}, "rope yarn mscale must be a number"),
    ({**YARN, "attention_factor": [1]}, "rope yarn attention_factor must be a number"),
    ({"rope_type": "dynamic"}, r"rope dynamic \(NTK\) scaling needs 'factor'"),
    ({"rope_type": "dynamic", "factor": -2.0}, "rope dynamic factor must be > 0"),
])
def test_bad_yarn_or_dynamic_config_is_a_clear_error_at_load(
        yarn_dir: Path, tmp_path: Path, rope: dict, match: str) -> None:
    d = _rewrite(yarn_dir, tmp_path / "m", lambda c: c.update(
        rope_parameters={"rope_theta": 10000.0, **rope}))
    with pytest.raises(ValueError, match=match):
        LLM(str(d), **KW)


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", [YARN, {"rope_type": "linear", "factor": 4.0}],
                         ids=["yarn", "linear"])  # factor 4: reach 128 > the 60 + 8 tokens
def test_cuda_bf16_greedy_past_the_original_length_matches_hf(tmp_path: Path,
                                                              scaling: dict) -> None:
    """On CUDA (the Triton decode kernel's rotary reads the scaled table, CUDA graphs) in
    bf16, past max_position_embeddings: the first tokens equal HF's bf16 generate."""
    from test_models_more import _hf_greedy_cuda_bf16

    d = _make("llama", tmp_path / "m", scaling)
    llm = LLM(str(d), device="cuda", dtype="bfloat16", kv_cache_memory=1 << 30, block_size=16,
              seed=0)
    compared = 0
    for shift in range(4):  # prompts past the original length; a random tiny model's flat
        prompt = [256] + [(7 * i + 3 + shift) % 256 for i in range(59)]  # logits tie often
        got = _run(llm, prompt, 8).outputs[0].token_ids
        want, gaps = _hf_greedy_cuda_bf16(d, prompt, 8)
        n = next((i for i, gap in enumerate(gaps) if gap < 0.02), len(want))  # to a near-tie
        assert list(got[:n]) == want[:n], (shift, gaps)
        compared += n
    assert compared >= 4, "too few tokens before a near-tie to compare"


@pytest.mark.parametrize("scaling", [YARN, DYNAMIC, {"rope_type": "linear", "factor": 2.0}],
                         ids=["yarn", "dynamic", "linear"])
def test_tables_build_under_another_default_device(scaling: dict) -> None:
    """Models are built under `with torch.device(...)` (CUDA on a GPU): the tables are
    computed on the CPU all the same, and equal the ones built without it (a yarn ramp made
    on the default device failed on CUDA: cuda and cpu tensors in one op)."""
    settings = RopeSettings(10000.0, scaling, ORIG, 2 * ORIG)
    with torch.device("meta"):
        freqs = compute_inv_freq(HD, settings)
        on_meta = RotaryEmbedding(HD, settings)
    assert freqs.device.type == "cpu"
    assert torch.equal(freqs, compute_inv_freq(HD, settings))
    assert on_meta.cos_sin_cache.device.type == "meta"  # the buffer goes where asked
    assert on_meta.cos_sin_cache.shape == RotaryEmbedding(HD, settings).cos_sin_cache.shape
