"""The offline `LLM` where a vLLM user would notice a difference, on a tiny random Llama
(max_model_len 64):

- a prompt plus max_tokens past max_model_len generates up to max_model_len and finishes with
  "length" (vLLM V1); a prompt that leaves no room is vLLM's "decoder prompt" ValueError;
- SamplingParams.logit_bias (also under speculative decoding, where greedy output is unchanged);
- max_logprobs bounds logprobs / prompt_logprobs with vLLM's message; -1 asks for the whole
  vocabulary, allowed where max_logprobs is -1 (no cap); seed=None is allowed;
- data_parallel_size, the pooling APIs on a generative model and a beam_search without BeamSearchParams are clear
  errors, not TypeErrors or AttributeErrors; trust_remote_code / disable_log_stats are accepted;
- get_metrics() reports vLLM's series, speculative decoding's acceptance counts included.
"""

from __future__ import annotations

import argparse
import math

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.metrics import Counter, Vector

MAX_MODEL_LEN = 64
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
REPEATING = "abcabcabcabc abcabc abcabc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("parity") / "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def spec_llm(model_dir):
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20,
               speculative_config=NGRAM)


def _gen(llm: LLM, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def test_max_tokens_past_max_model_len_is_capped_as_vllm(llm) -> None:
    out = _gen(llm, [256] * 10, max_tokens=500, temperature=0, ignore_eos=True)
    assert len(out.outputs[0].token_ids) == MAX_MODEL_LEN - 10
    assert out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"The decoder prompt \(length 70\) is longer than the "
                                         r"maximum model length of 64"):
        _gen(llm, [256] * 70, max_tokens=2)
    with pytest.raises(ValueError, match=r"\(length 64\) plus the number of requested output "
                                         r"tokens \(at least 1\)"):
        _gen(llm, [256] * 64, max_tokens=1)


def test_logit_bias_moves_the_sampled_tokens(llm) -> None:
    plain = _gen(llm, "hello", max_tokens=6, temperature=0, ignore_eos=True).outputs[0]
    forced = _gen(llm, "hello", max_tokens=6, temperature=0, ignore_eos=True,
                  logit_bias={65: 100.0}).outputs[0]
    assert forced.token_ids == [65] * 6 and forced.text == "A" * 6
    banned = _gen(llm, "hello", max_tokens=6, temperature=0, ignore_eos=True,
                  logit_bias={plain.token_ids[0]: -100}).outputs[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    sampled = _gen(llm, "hello", max_tokens=6, temperature=1.0, seed=3, ignore_eos=True,
                   logit_bias={66: 100.0}).outputs[0]
    assert sampled.token_ids == [66] * 6
    with pytest.raises(ValueError, match=r"out-of-vocab token ids\. Vocabulary size: 259"):
        _gen(llm, "hello", logit_bias={100_000: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1.0})


def test_logit_bias_under_speculative_decoding_keeps_greedy_output(llm, spec_llm) -> None:
    kw = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "logit_bias": {98: 4.0}}
    assert (_gen(spec_llm, REPEATING, **kw).outputs[0].token_ids
            == _gen(llm, REPEATING, **kw).outputs[0].token_ids)


def test_speculative_acceptance_metrics_as_vllm(llm, spec_llm) -> None:
    greedy = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    assert (_gen(spec_llm, REPEATING, **greedy).outputs[0].token_ids
            == _gen(llm, REPEATING, **greedy).outputs[0].token_ids)
    got = {m.name: m for m in spec_llm.get_metrics()}
    drafts = got["vllm:spec_decode_num_drafts"]
    tokens = got["vllm:spec_decode_num_draft_tokens"]
    accepted = got["vllm:spec_decode_num_accepted_tokens"]
    per_pos = got["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(drafts, Counter) and isinstance(per_pos, Vector)
    assert drafts.value > 0 and tokens.value >= drafts.value >= per_pos.values[0]
    assert len(per_pos.values) == NGRAM["num_speculative_tokens"]
    assert sum(per_pos.values) == accepted.value > 0
    assert per_pos.values == sorted(per_pos.values, reverse=True)
    assert got["vllm:generation_tokens"].value >= 24
    # without speculative decoding there are no spec series (as vLLM)
    assert not [m for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")]


def test_max_logprobs_bounds_requests_with_vllms_message(llm, model_dir) -> None:
    with pytest.raises(ValueError, match="Requested sample logprobs of 21, which is greater "
                                         "than max allowed: 20"):
        _gen(llm, "hello", logprobs=21, max_tokens=1)
    with pytest.raises(ValueError, match="Requested prompt logprobs of 25"):
        _gen(llm, "hello", prompt_logprobs=25, max_tokens=1)
    wide = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20,
               max_logprobs=30, seed=None, trust_remote_code=True, disable_log_stats=False)
    out = _gen(wide, "hello", logprobs=25, max_tokens=2).outputs[0]
    assert all(25 <= len(pos) <= 26 for pos in out.logprobs)


def test_minus_one_logprobs_are_the_whole_vocabulary(llm, model_dir) -> None:
    n_vocab = llm.llm_engine.config.model_config.vocab_size
    # the default max_logprobs (20) caps them, with vLLM's message naming the vocabulary's size
    with pytest.raises(ValueError, match=f"Requested sample logprobs of {n_vocab}, which is "
                                         "greater than max allowed: 20"):
        _gen(llm, "hello", logprobs=-1, max_tokens=1)
    with pytest.raises(ValueError, match=f"Requested prompt logprobs of {n_vocab}"):
        _gen(llm, "hello", prompt_logprobs=-1, max_tokens=1)
    with pytest.raises(ValueError, match="max_logprobs must be non-negative or -1, got -2"):
        LLM(str(model_dir), max_logprobs=-2)
    every = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20,
                max_logprobs=-1)
    out = _gen(every, "hello", logprobs=-1, prompt_logprobs=-1, max_tokens=2, temperature=0)
    assert [len(pos) for pos in out.outputs[0].logprobs] == [n_vocab, n_vocab]
    assert out.prompt_logprobs[0] is None
    assert all(len(pos) == n_vocab for pos in out.prompt_logprobs[1:])
    for pos in out.outputs[0].logprobs:
        assert sorted(lp.rank for lp in pos.values()) == list(range(1, n_vocab + 1))
        assert sum(math.exp(lp.logprob) for lp in pos.values()) == pytest.approx(1, abs=1e-3)


def test_unsupported_vllm_apis_are_clear_errors(llm, model_dir) -> None:
    with pytest.raises(ValueError, match="data_parallel_size=2"):
        LLM(str(model_dir), data_parallel_size=2)
    # vLLM's words: embeddings need runner="pooling" (tests/test_embeddings.py)
    with pytest.raises(ValueError, match=r"LLM\.encode\(\) is only supported for pooling models"):
        llm.encode(["hello"])
    with pytest.raises(ValueError, match=r"Embedding API is not supported by this model\. Try "
                                         r"converting the model using `--convert embed`"):
        llm.embed(["hello"])
    # classify / score need a pooling model (tests/test_classify_score.py): vLLM's words
    with pytest.raises(ValueError, match=r"Classification API is not supported by this model"):
        llm.classify(["hello"])
    with pytest.raises(ValueError, match=r"Score API is not supported by this model"):
        llm.score("a", "b")
    with pytest.raises(ValueError, match=r"LLM\.reward\(\) is only supported for reward"):
        llm.reward(["hello"])
    with pytest.raises(ValueError, match=r"LLM\.beam_search\(\) takes a BeamSearchParams"):
        llm.beam_search(["hello"], None)  # implemented: tests/test_beam_search.py


def test_server_metrics_count_drafts_and_acceptance_by_position() -> None:
    from modelport.engine.messages import SchedulerStats
    from modelport.entrypoints.openai.metrics import ServerMetrics

    m = ServerMetrics("tiny", prefix="vllm")
    m.observe_stats(SchedulerStats(spec_num_drafts=2, spec_num_draft_tokens=6,
                                   spec_num_accepted_tokens=3, spec_num_accepted_per_pos=[2, 1, 0]))
    m.observe_stats(SchedulerStats(spec_num_drafts=3, spec_num_draft_tokens=9,
                                   spec_num_accepted_tokens=5, spec_num_accepted_per_pos=[3, 2, 0]))
    text = m.render().decode()
    assert 'vllm:spec_decode_num_drafts_total{engine="0",model_name="tiny"} 3.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="tiny"} 5.0' in text
    for pos, value in ((0, 3.0), (1, 2.0)):
        assert (f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",'
                f'model_name="tiny",position="{pos}"}} {value}') in text


def test_kv_cache_memory_bytes_is_vllms_name_for_the_kv_budget(model_dir) -> None:
    from modelport.config import kv_cache_bytes_per_token
    from modelport.engine.arg_utils import EngineArgs

    llm = LLM(str(model_dir), max_model_len=64, kv_cache_memory_bytes=2 << 20)
    per_block = 16 * kv_cache_bytes_per_token(llm.llm_engine.config.model_config, 4)
    assert llm.llm_engine.core.kv.num_blocks == (2 << 20) // per_block
    with pytest.raises(TypeError, match="not both"):
        LLM(str(model_dir), kv_cache_memory=1 << 20, kv_cache_memory_bytes=1 << 20)
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--kv-cache-memory-bytes", "3MiB"]).kv_cache_memory == 3 << 20
    assert parser.parse_args(["--kv-cache-memory", "3MiB"]).kv_cache_memory == 3 << 20


def test_request_metrics_are_all_set_when_finished(llm) -> None:
    """vLLM's RequestMetrics: arrival <= first scheduled <= first token <= last token <=
    finished, each set on the final output (finished_time was left None)."""
    m = _gen(llm, "hello", max_tokens=4, temperature=0, ignore_eos=True).metrics
    stamps = [m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
              m.finished_time]
    assert all(t is not None for t in stamps), m
    assert stamps == sorted(stamps)


def test_chat_continues_the_final_message_and_refuses_non_text_parts(llm) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    out = llm.chat(conv, greedy, add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]  # fmt: skip
    closed = llm.chat(conv, greedy, add_generation_prompt=False, use_tqdm=False)[0]
    assert out.prompt.endswith("abc")  # left open for the model to go on writing
    assert closed.prompt.startswith(out.prompt) and len(closed.prompt) > len(out.prompt)
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conv, greedy, continue_final_message=True, use_tqdm=False)
    with pytest.raises(ValueError, match="final message to be the assistant's"):
        llm.chat(conv[:1], greedy, add_generation_prompt=False, continue_final_message=True,
                 use_tqdm=False)  # fmt: skip
    image = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(ValueError, match="content part of type 'image_url'"):
        llm.chat(image, greedy, use_tqdm=False)
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert llm.chat(text_parts, greedy, use_tqdm=False)[0].prompt == llm.chat(
        [{"role": "user", "content": "hi"}], greedy, use_tqdm=False)[0].prompt


def test_vllm_helpers_reset_prefix_cache_inputs_and_params(llm) -> None:
    """LLM.reset_prefix_cache (a repeated prompt no longer hits), llm_engine.get_tokenizer /
    model_config, modelport.inputs' TokensPrompt / TextPrompt, SamplingParams.clone /
    from_optional."""
    from modelport.inputs import TextPrompt, TokensPrompt

    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompt = TokensPrompt(prompt_token_ids=[60 + i for i in range(40)])

    def hits() -> float:
        return next(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")

    llm.generate(prompt, greedy, use_tqdm=False)
    before = hits()
    llm.generate(prompt, greedy, use_tqdm=False)
    assert hits() > before  # the second run found the prompt's blocks cached
    assert llm.reset_prefix_cache() is True
    before = hits()
    llm.generate(prompt, greedy, use_tqdm=False)
    assert hits() == before  # nothing cached any more
    text = llm.generate(TextPrompt(prompt="hello"), greedy, use_tqdm=False)[0]
    assert text.prompt == "hello"
    assert llm.llm_engine.get_tokenizer() is llm.get_tokenizer()
    assert llm.llm_engine.model_config.vocab_size == llm.get_tokenizer().vocab_size
    p = SamplingParams(stop=["x"], temperature=0.5)
    q = p.clone()
    q.stop.append("y")
    assert p.stop == ["x"] and q.stop == ["x", "y"] and q.temperature == 0.5
    assert SamplingParams.from_optional(temperature=None, top_p=0.5) == SamplingParams(top_p=0.5)


def test_detokenize_false_gives_token_ids_only(llm) -> None:
    """vLLM's SamplingParams(detokenize=False): the same tokens, no text, logprobs without
    decoded tokens; stop strings need the text, so they are refused with it."""
    kw = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 1}
    text = _gen(llm, "hello", **kw).outputs[0]
    ids = _gen(llm, "hello", detokenize=False, **kw).outputs[0]
    assert ids.token_ids == text.token_ids and text.text and ids.text == ""
    assert [list(d) for d in ids.logprobs] == [list(d) for d in text.logprobs]
    assert all(lp.decoded_token is None for d in ids.logprobs for lp in d.values())
    with pytest.raises(ValueError, match="stop strings are only supported when detokenize"):
        SamplingParams(detokenize=False, stop=["x"])


def test_output_kind_shapes_what_engine_steps_return(llm) -> None:
    from modelport.sampling_params import RequestOutputKind as Kind

    engine = llm.llm_engine
    base = dict(temperature=0, max_tokens=6, ignore_eos=True)
    final = _gen(llm, "the sky", **base)
    full_ids = list(final.outputs[0].token_ids)
    seen: dict[str, list] = {}
    for kind in Kind:
        engine.add_request(kind.name, "the sky", SamplingParams(**base, output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    cumulative, delta, only = seen["CUMULATIVE"], seen["DELTA"], seen["FINAL_ONLY"]
    # CUMULATIVE (vLLM's default): every step the text so far, growing to the whole
    assert len(cumulative) > 1 and cumulative[-1].finished
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(lengths) and list(cumulative[-1].outputs[0].token_ids) == full_ids
    assert cumulative[-1].outputs[0].text == final.outputs[0].text
    # DELTA: only what is new; the pieces add up to the whole
    assert len(delta) > 1
    assert [t for o in delta for t in o.outputs[0].token_ids] == full_ids
    assert "".join(o.outputs[0].text for o in delta) == final.outputs[0].text
    # FINAL_ONLY: one output, when finished
    assert len(only) == 1 and only[0].finished and list(only[0].outputs[0].token_ids) == full_ids
    # LLM.generate returns finished outputs whatever the params ask (as vLLM's)
    out = _gen(llm, "the sky", **base, output_kind=Kind.DELTA)
    assert out.finished and list(out.outputs[0].token_ids) == full_ids
    assert SamplingParams(output_kind=1).output_kind is Kind.DELTA
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=7)


def test_per_request_logits_processors_are_refused_as_vllm_v1() -> None:
    with pytest.raises(ValueError, match="per-request logits_processors are not supported"):
        SamplingParams(logits_processors=[lambda ids, logits: logits])
    assert SamplingParams(logits_processors=[]).logits_processors == []
