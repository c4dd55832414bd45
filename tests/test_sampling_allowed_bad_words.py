"""vLLM's SamplingParams.allowed_token_ids and bad_words, on a tiny random Llama (byte-level
tokenizer: token id == byte value) offline, under n-gram speculative decoding and over HTTP.

- allowed_token_ids: only those ids are sampled, greedy or seeded; an empty list or an
  out-of-vocab id is vLLM's ValueError (a 400 on the server), a negative id or a non-list
  a ValueError from SamplingParams;
- bad_words: each word is tokenized as is and after a space (kept when it is as many tokens
  and starts with another token, as vLLM); a one-token word is never generated, a longer
  word's last token is banned right after the tokens before it were generated;
- speculative decoding gives the plain engine's greedy tokens with both, and keeps both
  when sampling.
"""

from __future__ import annotations

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.engine.messages import dict_to_params, params_to_dict
from modelport.frontend.processor import tokenize_bad_words

MAX_MODEL_LEN = 64
KV_MEM = 8 << 20
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
LETTERS = list(range(ord("a"), ord("z") + 1))  # the tiny tokenizer's ids of a..z
REPEATING = "abcabcabcabc abcabc abcabc"
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 24}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("allowbad") / "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_MEM)


@pytest.fixture(scope="module")
def spec_llm(model_dir):
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_MEM,
               speculative_config=NGRAM)


def _out(llm: LLM, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def _has_pair(ids: list[int], pair: list[int]) -> bool:
    return any(ids[i : i + 2] == pair for i in range(len(ids) - 1))


# ---------------------------------------------------------------- SamplingParams


def test_sampling_params_validation() -> None:
    p = SamplingParams(allowed_token_ids=(3, 1), bad_words=("x",))
    assert p.allowed_token_ids == [3, 1] and p.bad_words == ["x"]
    for bad in ([-1], [1.5], [True], "abc", 5, {1: 2}):
        with pytest.raises(ValueError, match="allowed_token_ids must be None or a list of token"):
            SamplingParams(allowed_token_ids=bad)
    for bad in ("word", ["ok", 3], [None], 7):
        with pytest.raises(ValueError, match="bad_words must be None or a list of strings"):
            SamplingParams(bad_words=bad)


def test_fields_cross_to_the_engine_core() -> None:
    p = SamplingParams(allowed_token_ids=[1, 2], bad_words=["ab"])
    p._bad_words_token_ids = [[97, 98]]
    q = dict_to_params(params_to_dict(p))
    assert q.allowed_token_ids == [1, 2] and q.bad_words_token_ids == [[97, 98]]
    assert q.has_multi_token_bad_words and not SamplingParams().has_multi_token_bad_words


class _WordTokenizer:
    """Whole words as one token each, a leading space making another token (as BPE does)."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        out = []
        for i, word in enumerate(text.split(" ")):
            if word:
                out.append(self.vocab[(" " if i else "") + word])
        return out


def test_bad_words_tokenized_as_vllm() -> None:
    tok = _WordTokenizer({"Paris": 1, " Paris": 2, "big": 3, " big": 4, "city": 5, " city": 6})
    # as is and after a space (leading whitespace of the word dropped first)
    assert tokenize_bad_words(["Paris", "  big city"], tok, 10) == [[1], [2], [3, 6], [4, 6]]
    # the byte-level tokenizer: " ab" is 3 tokens, "ab" 2, so only "ab" counts
    from helpers.tiny_models import tiny_tokenizer

    assert tokenize_bad_words(["ab", "c"], tiny_tokenizer(), 259) == [[97, 98], [99]]
    with pytest.raises(ValueError, match="at least one token"):
        tokenize_bad_words(["  "], tok, 10)
    with pytest.raises(ValueError, match=r"vocabulary size is 3.*\[5, 6\]"):
        tokenize_bad_words(["city"], tok, 3)


# ---------------------------------------------------------------- allowed_token_ids


def test_allowed_token_ids_greedy_and_seeded(llm) -> None:
    plain = _out(llm, "hello", **GREEDY)
    assert not set(plain.token_ids) <= set(LETTERS)
    only = _out(llm, "hello", allowed_token_ids=LETTERS, **GREEDY)
    assert set(only.token_ids) <= set(LETTERS) and len(only.token_ids) == 24
    assert only.text.isalpha() and only.token_ids != plain.token_ids
    # one allowed id: the only possible token, whatever the logits
    assert _out(llm, "hello", allowed_token_ids=[66], **GREEDY).text == "B" * 24
    kw = {"temperature": 1.0, "seed": 7, "ignore_eos": True, "max_tokens": 24}
    sampled = _out(llm, "hello", allowed_token_ids=[120, 121, 122], **kw)
    assert set(sampled.token_ids) <= {120, 121, 122} and len(set(sampled.token_ids)) > 1
    assert _out(llm, "hello", allowed_token_ids=[120, 121, 122], **kw).token_ids == \
        sampled.token_ids  # seeded: reproducible


def test_allowed_token_ids_out_of_vocab_or_empty(llm) -> None:
    with pytest.raises(ValueError, match="allowed_token_ids contains out-of-vocab token id"):
        _out(llm, "hello", allowed_token_ids=[5, 259])
    with pytest.raises(ValueError, match="allowed_token_ids is not None and empty"):
        _out(llm, "hello", allowed_token_ids=[])


# ---------------------------------------------------------------- bad_words


def test_one_token_bad_word_is_never_generated(llm) -> None:
    plain = _out(llm, "hello", **GREEDY)
    assert 65 in plain.token_ids  # greedy writes "A" here
    banned = _out(llm, "hello", bad_words=["A"], **GREEDY)
    assert 65 not in banned.token_ids and "A" not in banned.text
    assert banned.token_ids[: plain.token_ids.index(65)] == \
        plain.token_ids[: plain.token_ids.index(65)]


def test_multi_token_bad_word_bans_its_last_token_after_the_rest(llm) -> None:
    letters = _out(llm, "hello", allowed_token_ids=LETTERS, **GREEDY)
    word = letters.text[:2]
    assert _has_pair(letters.token_ids, list(word.encode()))
    out = _out(llm, "hello", allowed_token_ids=LETTERS, bad_words=[word], **GREEDY)
    assert word not in out.text and set(out.token_ids) <= set(LETTERS)
    # the first token alone is not banned: only the second, right after it
    assert out.text[0] == word[0] and out.text[1] != word[1]
    # the same on the repeating prompt, whose greedy output is one letter again and again
    rep = _out(llm, REPEATING, allowed_token_ids=LETTERS, **GREEDY)
    double = rep.text[:2]
    assert double[0] == double[1]
    out = _out(llm, REPEATING, allowed_token_ids=LETTERS, bad_words=[double], **GREEDY)
    assert double not in out.text and double[0] in out.text


def test_multi_token_bad_word_with_async_scheduling(model_dir, llm) -> None:
    kw = {"allowed_token_ids": LETTERS, "bad_words": ["ud", "rr"], **GREEDY}
    overlapped = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_MEM,
                     async_scheduling=True)
    got = overlapped.generate(["hello", REPEATING], SamplingParams(**kw), use_tqdm=False)
    want = llm.generate(["hello", REPEATING], SamplingParams(**kw), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


# ---------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("prompt", ["hello", REPEATING])
def test_speculative_decoding_gives_the_plain_greedy_tokens(llm, spec_llm, prompt) -> None:
    first_two = _out(llm, prompt, allowed_token_ids=LETTERS, **GREEDY).text[:2]
    for kw in ({"allowed_token_ids": LETTERS},
               {"allowed_token_ids": LETTERS, "bad_words": [first_two]},
               {"bad_words": ["A", "\x06A"]}):
        want = _out(llm, prompt, **kw, **GREEDY)
        got = _out(spec_llm, prompt, **kw, **GREEDY)
        assert got.token_ids == want.token_ids, kw
        assert set(got.token_ids) <= set(kw.get("allowed_token_ids", got.token_ids))
    accepted = {m.name: m for m in spec_llm.get_metrics()}["vllm:spec_decode_num_accepted_tokens"]
    assert accepted.value > 0  # the drafts were checked, and some kept


def test_speculative_sampling_keeps_the_constraints(spec_llm) -> None:
    kw = {"temperature": 1.0, "seed": 3, "ignore_eos": True, "max_tokens": 24}
    out = _out(spec_llm, REPEATING, allowed_token_ids=[97, 98, 99], bad_words=["ab", "cc"], **kw)
    assert set(out.token_ids) <= {97, 98, 99} and len(out.token_ids) == 24
    assert "ab" not in out.text and "cc" not in out.text


# ---------------------------------------------------------------- the OpenAI server


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("allowbadsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", "./tiny",
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "8MiB"]  # fmt: skip
    with serving(argv, log, timeout=180, cwd=model_dir.parent) as url:
        yield url


def test_server_completions_and_chat(base, llm) -> None:
    body = {"prompt": "hello", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "allowed_token_ids": LETTERS}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == _out(llm, "hello", allowed_token_ids=LETTERS, **GREEDY).text
    r = httpx.post(f"{base}/v1/completions", json={**body, "bad_words": [text[:2]]}, timeout=60)
    assert r.status_code == 200, r.text
    assert text[:2] not in r.json()["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "allowed_token_ids": [66], "bad_words": ["Q"]}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "B" * 8


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("extra", "words"), [
    ({"allowed_token_ids": [-1]}, "allowed_token_ids must be"),
    ({"allowed_token_ids": [100000]}, "out-of-vocab"),
    ({"allowed_token_ids": []}, "empty"),
    ({"allowed_token_ids": ["x"]}, "allowed_token_ids"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [" "]}, "at least one token"),
])
def test_server_bad_values_are_400(base, path, extra, words) -> None:
    body = ({"prompt": "hello"} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(f"{base}{path}", json={**body, "max_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
