"""The offline API's prompt forms as vLLM takes them: strings, token ids, TextPrompt and
TokensPrompt dicts; truncate_prompt_tokens; get_tokenizer() as the HF tokenizer."""

from __future__ import annotations

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams

TEXT = "héllo wörld"
KV_MEM = 8 << 20


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = make_tiny_llama_dir(tmp_path_factory.mktemp("llama") / "m")
    return LLM(str(d), kv_cache_memory=KV_MEM, block_size=8)


def greedy(n: int = 5, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def gen(llm: LLM, prompts, params: SamplingParams | None = None):
    return llm.generate(prompts, params or greedy(), use_tqdm=False)


def test_dict_prompts_generate_as_the_plain_forms(llm) -> None:
    ids = llm.get_tokenizer().encode(TEXT)
    outs = gen(llm, [{"prompt": TEXT}, {"prompt_token_ids": ids}, TEXT, ids,
                     {"prompt_token_ids": ids, "prompt": "as typed"}])  # fmt: skip
    assert [(o.prompt, o.prompt_token_ids) for o in outs] == [
        (TEXT, ids), (None, ids), (TEXT, ids), (None, ids), ("as typed", ids),
    ]  # fmt: skip
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


def test_one_dict_is_one_prompt(llm) -> None:
    tok = llm.get_tokenizer()
    (text_out,) = gen(llm, {"prompt": "The capital of France is"})
    assert text_out.prompt == "The capital of France is"
    assert text_out.prompt_token_ids == tok.encode("The capital of France is")
    (ids_out,) = gen(llm, {"prompt_token_ids": [256, 10, 20]})
    assert ids_out.prompt is None and ids_out.prompt_token_ids == [256, 10, 20]
    assert ids_out.outputs[0].token_ids == gen(llm, [[256, 10, 20]])[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "prompt,match",
    [
        ({"prompt": "x", "multi_modal_data": {"image": "cat.png"}}, "'multi_modal_data'"),
        ({"prompt_token_ids": [1], "mm_processor_kwargs": {"a": 1}}, "'mm_processor_kwargs'"),
        ({"prompt_embeds": [[0.0]]}, "'prompt_embeds'"),
        ({"prompt": "x", "cache_salt": "s"}, "'cache_salt'"),
        ({"encoder_prompt": "x", "decoder_prompt": "y"}, "encoder-decoder"),
        ({"text": "x"}, "unknown prompt key 'text'"),
        ({}, "needs 'prompt'"),
        ({"prompt": None}, "needs 'prompt'"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompt_token_ids": "abc"}, "'prompt_token_ids' must be a list of token ids"),
        (3.5, "prompt must be a string, a list of token ids, or a dict"),
    ],
)
def test_bad_prompts_are_a_clear_error(llm, prompt, match) -> None:
    with pytest.raises(ValueError, match=match):
        gen(llm, ["fine", prompt])  # the good one before it is not left queued
    assert not llm.llm_engine.has_unfinished_requests()


def test_none_valued_keys_count_as_absent(llm) -> None:
    (out,) = gen(llm, {"prompt": "x", "multi_modal_data": None, "cache_salt": None})
    assert out.prompt == "x"


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm) -> None:
    long = [256, *range(40, 77)]
    (out,) = llm.generate(
        prompt_token_ids=[long], sampling_params=greedy(truncate_prompt_tokens=7), use_tqdm=False
    )
    assert out.prompt_token_ids == long[-7:]
    assert out.outputs[0].token_ids == gen(llm, [long[-7:]])[0].outputs[0].token_ids
    ids = llm.get_tokenizer().encode(TEXT)
    (text_out,) = gen(llm, TEXT, greedy(truncate_prompt_tokens=3))
    assert (text_out.prompt, text_out.prompt_token_ids) == (TEXT, ids[-3:])
    (short,) = gen(llm, TEXT, greedy(truncate_prompt_tokens=-1))  # -1: max_model_len
    assert short.prompt_token_ids == ids
    chat = llm.chat(
        [{"role": "user", "content": "hi"}], greedy(truncate_prompt_tokens=4), use_tqdm=False
    )[0]
    assert llm.get_tokenizer().decode(chat.prompt_token_ids) == "assistant\n"[-4:]
    with pytest.raises(ValueError, match="greater than max_model_len"):
        gen(llm, TEXT, greedy(truncate_prompt_tokens=513))


def test_get_tokenizer_behaves_as_the_hf_tokenizer(llm) -> None:
    tok = llm.get_tokenizer()
    assert tok.eos_token_id == 257 and tok.eos_token == "<|eos|>" and tok.pad_token_id == 258
    assert tok(TEXT)["input_ids"] == tok.encode(TEXT) == list(TEXT.encode())
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    (out,) = gen(llm, {"prompt_token_ids": ids})  # the usual vLLM chat-by-hand recipe
    chat = llm.chat(messages, greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == chat.prompt_token_ids
    assert out.outputs[0].token_ids == chat.outputs[0].token_ids
