"""vLLM flags once refused at start-up, now served (entrypoints/vllm_compat.py, EngineArgs):
--chat-template-content-format (and LLM.chat's argument), --disable-sliding-window, and the
partial-prefill flags (--max-num-partial-prefills, --max-long-partial-prefills,
--long-prefill-token-threshold). Fast, on CPU, with tiny random models."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from helpers.tiny_models import (
    _byte_level_tokenizer,
    greedy_token_ids,
    make_tiny_llama_dir,
    make_tiny_mistral_dir,
)
from modelport import LLM, SamplingParams
from modelport.config import ModelConfig, SchedulerConfig
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.kv_cache_manager import KVCacheManager
from modelport.engine.request import Request
from modelport.engine.scheduler import Scheduler
from modelport.frontend.tokenizer import Tokenizer, detect_content_format

# a template that reads each message's content as a list of parts (as multimodal ones do)
PARTS = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}"
         "[{{ p['text'] }}]{% endfor %}</{{ m['role'] }}>{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")
# the same through a variable, and one that reads it as a string
PARTS_ALIAS = ("{% for m in messages %}{% set c = m.content %}{% for p in c %}"
               "[{{ p.text }}]{% endfor %}{% endfor %}")
STRING = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
          "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


# -- --chat-template-content-format ---------------------------------------------------------
def test_auto_detects_a_template_that_loops_over_content() -> None:
    assert detect_content_format(PARTS) == "openai"
    assert detect_content_format(PARTS_ALIAS) == "openai"
    assert detect_content_format(STRING) == "string"
    assert detect_content_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "string"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(_byte_level_tokenizer())
    t.chat_template = PARTS
    return t


def test_tokenizer_renders_parts_for_openai_and_auto(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "text", "text": "there"}]}]
    want = "<system>[be brief]</system><user>[hi][there]</user><assistant>"
    assert tok.apply_chat_template(msgs) == want  # auto: the template loops over parts
    assert tok.apply_chat_template(msgs, chat_template_content_format="openai") == want
    # string: the text joined first; the loop then walks its characters (no 'text' there)
    got = tok.apply_chat_template(msgs, chat_template_content_format="string")
    assert got.startswith("<system>[][][]") and "be brief" not in got
    # a string template with openai content shows the list: the format is what is given
    assert tok.apply_chat_template(msgs, chat_template=STRING) == (
        "<system>be brief</system><user>hi\nthere</user><assistant>")
    with pytest.raises(ValueError, match="chat_template_content_format"):
        tok.apply_chat_template(msgs, chat_template_content_format="parts")


def test_server_renders_a_requests_parts_and_continues_the_last_one(tok: Tokenizer) -> None:
    from modelport.entrypoints.openai.protocol import ChatMessage
    from modelport.entrypoints.openai.serving_chat import render_chat_text

    engine = types.SimpleNamespace(tokenizer=tok)
    msgs = [ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                              {"type": "text", "text": "b"}]),
            ChatMessage(role="assistant", content="c")]
    for fmt in ("auto", "openai"):
        tok.chat_template_content_format = fmt
        assert render_chat_text(engine, msgs[:1]) == "<user>[a][b]</user><assistant>"
        assert render_chat_text(engine, msgs, add_generation_prompt=False,
                                continue_final_message=True) == (
            "<user>[a][b]</user><assistant>[c")
    tok.chat_template_content_format = "string"  # the server's parts joined, as before
    assert render_chat_text(engine, msgs[:1], chat_template=STRING) == "<user>ab</user><assistant>"
    tok.chat_template_content_format = "auto"
    assert render_chat_text(engine, msgs[:1], chat_template=STRING) == "<user>ab</user><assistant>"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("llama") / "m")


def test_llm_chat_content_format(llama: Path) -> None:
    llm = LLM(str(llama), kv_cache_memory=1 << 20, dtype="float32")
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.chat(msgs, sp, use_tqdm=False, chat_template=PARTS,
                   chat_template_content_format="openai")
    ids = llm.get_tokenizer().encode("<user>[hello]</user><assistant>", add_special_tokens=False)
    assert out[0].prompt_token_ids == ids
    ref = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    auto = llm.chat(msgs, sp, use_tqdm=False, chat_template=PARTS)
    assert auto[0].prompt_token_ids == out[0].prompt_token_ids


# -- --disable-sliding-window --------------------------------------------------------------
WINDOW = 12


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mistral_dir(tmp_path_factory.mktemp("mistral") / "m", WINDOW)


_greedy = greedy_token_ids


def test_disable_sliding_window_caps_the_length_and_attends_fully(mistral: Path, caplog) -> None:
    from modelport.layers.attention import Attention

    kw = dict(block_size=4, kv_cache_memory=1 << 20, dtype="float32")
    with caplog.at_level("INFO", logger="modelport.engine.arg_utils"):
        off = LLM(str(mistral), disable_sliding_window=True, **kw)
    assert "capped to the 12-token sliding window" in caplog.text
    cfg = off.llm_engine.config
    assert cfg.scheduler_config.max_model_len == WINDOW
    assert cfg.model_config.max_model_len == WINDOW
    assert cfg.model_config.hf_config["sliding_window"] is None
    core = off.llm_engine.core
    assert core.kv.sliding_window is None
    assert {m.sliding_window for m in core.runner.model.modules()
            if isinstance(m, Attention)} == {None}
    prompts = [[(7 * i + 3 * j) % 250 for j in range(4 + i)] for i in range(3)]
    got = _greedy(off, prompts, 6)
    del off
    # the same weights as a full-attention model (no window in its config), same length
    full = LLM(str(mistral), hf_overrides={"sliding_window": None}, max_model_len=WINDOW, **kw)
    assert full.llm_engine.core.kv.sliding_window is None
    assert _greedy(full, prompts, 6) == got
    del full
    with pytest.raises(ValueError, match="sliding window"):
        LLM(str(mistral), disable_sliding_window=True, max_model_len=64, **kw)


def test_disable_sliding_window_turns_the_draft_models_window_off_too(
        mistral: Path, tmp_path: Path, caplog) -> None:
    """A speculative draft model follows --disable-sliding-window as the target does (vLLM
    gives its draft config the target's setting): no layer of it slides, and its window caps
    max_model_len too (a draft proposes at every length here)."""
    from modelport.layers.attention import Attention

    draft = make_tiny_mistral_dir(tmp_path / "draft", 8)
    kw = dict(block_size=4, kv_cache_memory=1 << 20, dtype="float32")
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}

    def draft_windows(llm: LLM) -> set:
        model = llm.llm_engine.core.runner.draft_model
        return {m.sliding_window for m in model.modules() if isinstance(m, Attention)}

    kept = LLM(str(mistral), speculative_config=spec, **kw)
    assert draft_windows(kept) == {8}  # without the flag: the draft's own window
    del kept
    with caplog.at_level("INFO", logger="modelport.engine.arg_utils"):
        off = LLM(str(mistral), disable_sliding_window=True, speculative_config=spec, **kw)
    assert "capped to the draft model's 8-token sliding window (was 12)" in caplog.text
    assert off.llm_engine.config.scheduler_config.max_model_len == 8
    assert off.llm_engine.core.runner.draft_config.hf_config["sliding_window"] is None
    assert draft_windows(off) == {None}
    prompts = [[(5 * i + 3 * j) % 250 for j in range(4)] for i in range(3)]
    got = _greedy(off, prompts, 4)
    del off
    plain = LLM(str(mistral), disable_sliding_window=True, max_model_len=8, **kw)
    assert _greedy(plain, prompts, 4) == got  # speculation keeps the greedy output
    del plain
    with pytest.raises(ValueError, match="larger than the draft model's sliding window"):
        LLM(str(mistral), disable_sliding_window=True, max_model_len=10,
            speculative_config=spec, **kw)


def test_which_configs_have_a_window_to_disable() -> None:
    from modelport.models.sliding import model_window, without_sliding_window

    base = dict(architectures=["Qwen2ForCausalLM"], vocab_size=64, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    assert model_window(ModelConfig.from_hf_dict({**base, "sliding_window": 128})) == 128
    qwen_off = {**base, "sliding_window": 128, "use_sliding_window": False}
    assert model_window(ModelConfig.from_hf_dict(qwen_off)) is None
    all_full = {**base, "sliding_window": 128, "layer_types": ["full_attention"] * 2}
    assert model_window(ModelConfig.from_hf_dict(all_full)) is None
    assert model_window(ModelConfig.from_hf_dict({**base, "sliding_window": 4096})) is None
    gemma = {**base, "sliding_window": 64, "use_sliding_window": True,
             "layer_types": ["sliding_attention", "full_attention"]}
    c = without_sliding_window(ModelConfig.from_hf_dict(gemma))
    assert c.hf_config["sliding_window"] is None and c.hf_config["use_sliding_window"] is False
    assert model_window(c) is None


def test_a_model_without_a_window_keeps_its_length(llama: Path) -> None:
    ea = EngineArgs(model=str(llama), disable_sliding_window=True, kv_cache_memory=1 << 20)
    assert ea.create_engine_config().scheduler_config.max_model_len == 512


# -- partial prefills ----------------------------------------------------------------------
def _sched(threshold: int, budget: int = 64) -> Scheduler:
    kv = KVCacheManager(64, 4, True)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                     max_model_len=128,
                                     long_prefill_token_threshold=threshold), kv)


def _req(rid: str, n: int, base: int) -> Request:
    return Request(rid, [base + i for i in range(n)], SamplingParams(max_tokens=4))


def test_long_prefill_threshold_lets_prompts_prefill_side_by_side() -> None:
    plain = _sched(0, budget=32)
    for rid, base in (("a", 0), ("b", 100), ("c", 200)):
        plain.add_request(_req(rid, 30, base))
    assert [(x.request_id, x.num_tokens) for x in plain.schedule().scheduled] == [
        ("a", 30), ("b", 2)]
    capped = _sched(10, budget=32)
    for rid, base in (("a", 0), ("b", 100), ("c", 200)):
        capped.add_request(_req(rid, 30, base))
    out = capped.schedule()
    assert [(x.request_id, x.num_tokens) for x in out.scheduled] == [
        ("a", 10), ("b", 10), ("c", 10)]
    capped.update(out, {})
    assert [(x.request_id, x.start, x.num_tokens) for x in capped.schedule().scheduled] == [
        ("a", 10, 10), ("b", 10, 10), ("c", 10, 10)]


def test_partial_prefill_flags_resolve_as_vllm_v1(llama: Path) -> None:
    def threshold(**kw: int) -> int:
        ea = EngineArgs(model=str(llama), kv_cache_memory=1 << 20, max_model_len=500, **kw)
        return ea.create_engine_config().scheduler_config.long_prefill_token_threshold

    assert threshold() == 0
    assert threshold(max_num_partial_prefills=4) == 20  # 4 % of max_model_len
    assert threshold(max_num_partial_prefills=4, long_prefill_token_threshold=32) == 32
    assert threshold(long_prefill_token_threshold=32) == 32
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        threshold(max_num_partial_prefills=2, max_long_partial_prefills=3)
    with pytest.raises(ValueError, match="max_num_partial_prefills"):
        threshold(max_num_partial_prefills=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        threshold(long_prefill_token_threshold=501)


def test_chunked_by_the_threshold_the_tokens_stay_the_same(llama: Path) -> None:
    prompts = [[(5 * i + 11 * j) % 250 for j in range(20 + 9 * i)] for i in range(3)]
    kw = dict(kv_cache_memory=1 << 20, dtype="float32", block_size=4)
    want = _greedy(LLM(str(llama), **kw), prompts, 5)
    got = _greedy(LLM(str(llama), long_prefill_token_threshold=7, **kw), prompts, 5)
    assert got == want
