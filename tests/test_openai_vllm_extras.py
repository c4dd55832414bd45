"""vLLM's extra request fields, served or refused, never silently ignored: a tiny model served
as `modelport serve --model ./tiny --max-model-len 64`.

- vLLM's guided decoding fields constrain the output (xgrammar); the unsupported ones
  (guided_whitespace_pattern) are 400s naming the field;
- truncate_prompt_tokens keeps the last k prompt tokens before the length checks;
- prompt_logprobs returns vLLM's per-prompt-token candidates, checked against transformers;
- continue_final_message leaves the last assistant message open for the model to continue;
- stream_options.continuous_usage_stats puts the running usage in every chunk;
- vLLM's score / rerank / classify paths are vLLM's 400s, unknown paths OpenAI-shaped 404s, and
  /v1/embeddings and /pooling answer vLLM's 400 (a generative server);
- `modelport --version` prints the version.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import torch

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving, start_server, stop_server
from helpers.tiny_models import hf_reference_logits, make_tiny_llama_dir

MAX_MODEL_LEN = 64
CONTINUED = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "The answer is"},
]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("extras") / "tiny")


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("extrassrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", "./tiny",
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "8MiB"]  # fmt: skip
    with serving(argv, log, timeout=180, cwd=model_dir.parent) as url:
        yield url





def _tokens(base: str, **body) -> list[int]:
    return _ok(_post(base, "/tokenize", body))["tokens"]


def _events(base: str, path: str, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


# ---------------------------------------------------------------- guided decoding


GUIDED = {
    "guided_json": {"type": "object"},
    "guided_regex": "[0-9]+",
    "guided_choice": ["yes", "no"],
    "guided_grammar": 'root ::= "a"',
    "structured_outputs": {"choice": ["yes", "no"]},
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", sorted(GUIDED))
def test_guided_decoding_fields_are_served(base, path, field) -> None:
    pytest.importorskip("xgrammar")
    body = {"messages": CONTINUED[:1]} if "chat" in path else {"prompt": "hello"}
    out = _ok(_post(base, path, {**body, "max_tokens": 5, field: GUIDED[field],
                                 "guided_decoding_backend": "xgrammar"}))
    text = out["choices"][0]["message"]["content"] if "chat" in path else out["choices"][0]["text"]
    if field in ("guided_choice", "structured_outputs"):
        assert text in ("yes", "no")
    elif field == "guided_grammar":
        assert text == "a"
    elif field == "guided_regex":
        assert re.fullmatch("[0-9]+", text), text
    # null is the same as leaving it out
    _ok(_post(base, path, {**body, "max_tokens": 1, field: None}))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", ["guided_whitespace_pattern"])
def test_unsupported_guided_fields_are_refused(base, path, field) -> None:
    body = {"messages": CONTINUED[:1]} if "chat" in path else {"prompt": "hello"}
    err = _error(_post(base, path, {**body, "max_tokens": 2, field: " "}))
    assert err["param"] == field and err["type"] == "invalid_request_error"
    assert f"{field} is not supported" in err["message"]
    _ok(_post(base, path, {**body, "max_tokens": 1, field: None}))


# ---------------------------------------------------------------- truncate_prompt_tokens


def test_truncate_prompt_tokens_keeps_the_last_k_before_the_length_check(base) -> None:
    prompt = "abcdefghij" * 10  # 100 byte tokens: over max_model_len
    ids = _tokens(base, prompt=prompt)
    assert len(ids) == 100
    err = _error(_post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 2}))
    assert err["code"] == "context_length_exceeded"

    body = {"max_tokens": 3, **GREEDY}
    cut = _ok(_post(base, "/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 10,
                                              "echo": True, **body}))  # fmt: skip
    assert cut["usage"]["prompt_tokens"] == 10
    # the model saw exactly the last 10 tokens: same answer as sending them, and echo says so
    tail = _ok(_post(base, "/v1/completions", {"prompt": ids[-10:], **body}))
    text = cut["choices"][0]["text"]
    assert text == prompt[-10:] + tail["choices"][0]["text"]
    # token-id prompts are cut too; -1 keeps max_model_len tokens (a short prompt: all)
    r = _ok(_post(base, "/v1/completions", {"prompt": ids, "truncate_prompt_tokens": 7, **body}))
    assert r["usage"]["prompt_tokens"] == 7
    r = _ok(_post(base, "/v1/completions", {"prompt": ids[:5], "truncate_prompt_tokens": -1,
                                            **body}))  # fmt: skip
    assert r["usage"]["prompt_tokens"] == 5


def test_truncate_prompt_tokens_on_chat(base) -> None:
    messages = [{"role": "user", "content": "tell me " * 20}]
    assert len(_tokens(base, messages=messages)) > MAX_MODEL_LEN
    err = _error(_post(base, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}))
    assert err["code"] == "context_length_exceeded"
    r = _ok(_post(base, "/v1/chat/completions",
                  {"messages": messages, "max_tokens": 2, "truncate_prompt_tokens": 12}))  # fmt: skip
    assert r["usage"]["prompt_tokens"] == 12


@pytest.mark.parametrize("k", [0, -2, MAX_MODEL_LEN + 1])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_truncate_prompt_tokens_out_of_range_is_a_400(base, path, k) -> None:
    body = {"messages": CONTINUED[:1]} if "chat" in path else {"prompt": "hello"}
    err = _error(_post(base, path, {**body, "max_tokens": 1, "truncate_prompt_tokens": k}))
    assert err["param"] == "truncate_prompt_tokens"


# ---------------------------------------------------------------- prompt_logprobs


def test_completion_prompt_logprobs_match_transformers(base, model_dir) -> None:
    ids = _tokens(base, prompt="hello world")
    body = {"prompt": "hello world", "max_tokens": 1, "prompt_logprobs": 2, "n": 2, **GREEDY}
    r = _ok(_post(base, "/v1/completions", body))
    assert r["usage"]["prompt_tokens"] == len(ids)
    ref = torch.log_softmax(hf_reference_logits(model_dir, ids), dim=-1)
    for choice in r["choices"]:
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(ids) and plp[0] is None
        for j in range(1, len(ids)):
            row = ref[j - 1]  # what position j-1 predicts for token j
            entries = {int(t): v for t, v in plp[j].items()}
            top2 = row.topk(2).indices.tolist()
            assert set(entries) == {ids[j], *top2}
            for tid, e in entries.items():
                assert set(e) == {"logprob", "rank", "decoded_token"}
                assert e["logprob"] == pytest.approx(row[tid].item(), abs=1e-3)
                assert e["rank"] == int((row > row[tid]).sum()) + 1
                if tid < 128:  # one ASCII byte per token
                    assert e["decoded_token"] == chr(tid)
    # not asked: null, and echo's logprobs are what they were
    r = _ok(_post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 1, "echo": True,
                                            "logprobs": 1, **GREEDY}))  # fmt: skip
    assert r["choices"][0]["prompt_logprobs"] is None
    assert r["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert len(r["choices"][0]["logprobs"]["tokens"]) == 6


def test_prompt_logprobs_with_echo_and_a_larger_k(base) -> None:
    # the engine computes max(logprobs, prompt_logprobs) candidates; each answer gets its own k
    body = {"prompt": "hello", "max_tokens": 1, "echo": True, "logprobs": 3, **GREEDY}
    echo_only = _ok(_post(base, "/v1/completions", body))["choices"][0]
    choice = _ok(_post(base, "/v1/completions", {**body, "prompt_logprobs": 0}))["choices"][0]
    ids = _tokens(base, prompt="hello")
    got = [list(map(int, p)) if p else None for p in choice["prompt_logprobs"]]
    assert got == [None, *[[t] for t in ids[1:]]]
    assert choice["logprobs"] == echo_only["logprobs"]
    for j in range(1, len(ids)):
        assert choice["prompt_logprobs"][j][str(ids[j])]["logprob"] == pytest.approx(
            choice["logprobs"]["token_logprobs"][j]
        )


def test_chat_prompt_logprobs_and_refusals(base) -> None:
    body = {"messages": CONTINUED[:1], "max_tokens": 1, "prompt_logprobs": 1}
    r = _ok(_post(base, "/v1/chat/completions", body))
    plp = r["prompt_logprobs"]
    assert len(plp) == r["usage"]["prompt_tokens"] and plp[0] is None
    assert all(1 <= len(p) <= 2 for p in plp[1:])
    assert "prompt_logprobs" not in r["choices"][0]
    for path, req in (("/v1/chat/completions", body), ("/v1/completions", {"prompt": "x"})):
        for k in (1, -1):  # vLLM: a count that returns something cannot stream, in its words
            err = _error(_post(base, path, {**req, "prompt_logprobs": k, "stream": True}))
            assert err["param"] == "prompt_logprobs"
            assert err["message"] == "`prompt_logprobs` are not available when `stream=True`."
        # prompt_logprobs 0 streams (vLLM accepts it), and no chunk carries prompt logprobs
        events = _events(base, path, {**req, "prompt_logprobs": 0, "max_tokens": 1})
        assert events and all("prompt_logprobs" not in e and
                              all("prompt_logprobs" not in c for c in e["choices"])
                              for e in events)
        err = _error(_post(base, path, {**req, "prompt_logprobs": 21}))
        assert err["param"] == "prompt_logprobs"


# ---------------------------------------------------------------- continue_final_message


def test_continue_final_message_leaves_the_assistant_message_open(base) -> None:
    closed = _tokens(base, messages=CONTINUED, add_generation_prompt=False)
    ids = _tokens(base, messages=CONTINUED, add_generation_prompt=False,
                  continue_final_message=True)  # fmt: skip
    text = httpx.post(f"{base}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith("assistant\nThe answer is")
    assert ids == closed[: len(ids)] and len(closed) > len(ids)

    body = {"messages": CONTINUED, "add_generation_prompt": False,
            "continue_final_message": True, "max_tokens": 4, **GREEDY}  # fmt: skip
    chat = _ok(_post(base, "/v1/chat/completions", body))
    assert chat["usage"]["prompt_tokens"] == len(ids)
    # the model continues exactly that prompt
    plain = _ok(_post(base, "/v1/completions", {"prompt": ids, "max_tokens": 4, **GREEDY}))
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        (
            {
                "continue_final_message": True,
                "add_generation_prompt": False,
                "messages": CONTINUED[:1],
            },
            "messages",
        ),  # fmt: skip
    ],
)
def test_continue_final_message_refusals(base, extra, param) -> None:
    body = {"messages": CONTINUED, "max_tokens": 1, **extra}
    assert _error(_post(base, "/v1/chat/completions", body))["param"] == param
    tok = {k: v for k, v in body.items() if k != "max_tokens"}
    assert _error(_post(base, "/tokenize", tok))["param"] == param


# ---------------------------------------------------------------- continuous usage


def test_completion_stream_continuous_usage(base) -> None:
    n_prompt = len(_tokens(base, prompt="hello"))
    body = {"prompt": "hello", "max_tokens": 4, **GREEDY}
    events = _events(base, "/v1/completions",
                     {**body, "stream_options": {"continuous_usage_stats": True}})  # fmt: skip
    running = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert running == sorted(set(running)) and running[0] >= 1 and running[-1] == 4
    for e in events:
        u = e["usage"]
        assert u["prompt_tokens"] == n_prompt
        assert u["total_tokens"] == n_prompt + u["completion_tokens"]
        assert all("prompt_logprobs" not in c for c in e["choices"])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    # include_usage false turns both off; without continuous usage, only the last chunk has it
    off = _events(base, "/v1/completions", {**body, "stream_options": {
        "continuous_usage_stats": True, "include_usage": False}})  # fmt: skip
    assert all("usage" not in e for e in off)
    final_only = _events(base, "/v1/completions",
                         {**body, "stream_options": {"include_usage": True}})  # fmt: skip
    assert all("usage" not in e for e in final_only[:-1])
    assert final_only[-1]["usage"]["completion_tokens"] == 4


def test_chat_stream_continuous_usage(base) -> None:
    n_prompt = len(_tokens(base, messages=CONTINUED[:1]))
    body = {"messages": CONTINUED[:1], "max_tokens": 3, "n": 2, **GREEDY,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    events = _events(base, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 0,
                                  "total_tokens": n_prompt}  # fmt: skip
    running = [e["usage"]["completion_tokens"] for e in events]
    assert running == sorted(running) and running[-1] == 6
    assert all(e["usage"]["prompt_tokens"] == n_prompt for e in events)
    assert events[-1]["choices"] == []


# ---------------------------------------------------------------- context length, logit_bias, logprobs


def test_context_length_errors_in_vllms_words(base) -> None:
    long_ids = [97] * (MAX_MODEL_LEN + 6)
    for extra in ({"max_tokens": 2}, {}):
        err = _error(_post(base, "/v1/completions", {"prompt": long_ids, **extra}))
        assert err["message"] == (
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your "
            f"request has {MAX_MODEL_LEN + 6} input tokens. Please reduce the length of the "
            "input messages.")
        assert err["code"] == "context_length_exceeded"
    err = _error(_post(base, "/v1/completions", {"prompt": [97] * 10, "max_tokens": 60}))
    assert err["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: 60. This model's maximum "
        f"context length is {MAX_MODEL_LEN} tokens and your request has 10 input tokens "
        f"(60 > {MAX_MODEL_LEN} - 10).")
    assert err["param"] == "max_tokens"
    messages = [{"role": "user", "content": "hi"}]
    err = _error(_post(base, "/v1/chat/completions",
                       {"messages": messages, "max_completion_tokens": 100}))
    assert err["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 100.")


def test_logit_bias_is_served(base) -> None:
    body = {"prompt": "hello", "max_tokens": 4, **GREEDY}
    r = _ok(_post(base, "/v1/completions", {**body, "logit_bias": {"65": 100}}))
    assert r["choices"][0]["text"] == "AAAA"
    messages = [{"role": "user", "content": "hi"}]
    r = _ok(_post(base, "/v1/chat/completions",
                  {"messages": messages, "max_tokens": 3, **GREEDY, "logit_bias": {"66": 250}}))
    assert r["choices"][0]["message"]["content"] == "BBB"  # clamped to 100, still decisive
    err = _error(_post(base, "/v1/completions", {**body, "logit_bias": {"999999": 1}}))
    assert "out-of-vocab" in err["message"] and err["param"] == "logit_bias"
    err = _error(_post(base, "/v1/completions", {**body, "allowed_token_ids": [999999]}))
    assert "out-of-vocab" in err["message"] and err["param"] == "allowed_token_ids"
    err = _error(_post(base, "/v1/completions", {**body, "logit_bias": {"a": 1}}))
    assert err["param"] == "logit_bias"


def test_logprobs_above_max_logprobs_are_vllms_400(base) -> None:
    err = _error(_post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 1,
                                                 "logprobs": 21}))  # fmt: skip
    assert err["message"] == "Requested sample logprobs of 21, which is greater than max allowed: 20"
    assert err["param"] == "logprobs"
    err = _error(_post(base, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": True,
        "top_logprobs": 25}))  # fmt: skip
    assert "greater than max allowed: 20" in err["message"]
    assert err["param"] == "top_logprobs"
    r = _ok(_post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 1, "logprobs": 20}))
    assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == 1


def test_minus_one_logprobs_need_max_logprobs_minus_one(base, model_dir) -> None:
    """vLLM: -1 asks for the whole vocabulary; under the default --max-logprobs 20 that is
    vLLM's 400 naming the vocabulary's size; under --max-logprobs -1 every token comes back."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **GREEDY}
    err = _error(_post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 1,
                                                 "logprobs": -1}))  # fmt: skip
    assert err["message"] == (f"Requested sample logprobs of {vocab}, which is greater than "
                              "max allowed: 20")
    assert err["param"] == "logprobs"
    err = _error(_post(base, "/v1/chat/completions", {**chat, "logprobs": True,
                                                      "top_logprobs": -1}))  # fmt: skip
    assert err["param"] == "top_logprobs" and f"logprobs of {vocab}" in err["message"]
    err = _error(_post(base, "/v1/chat/completions", {**chat, "top_logprobs": -1}))
    assert err["param"] == "top_logprobs"  # as vLLM: top_logprobs needs logprobs true
    err = _error(_post(base, "/v1/completions", {"prompt": "hello", "prompt_logprobs": -1}))
    assert err["message"].startswith(f"Requested prompt logprobs of {vocab}")
    for bad in ({"logprobs": -2}, {"prompt_logprobs": -2}):
        assert _error(_post(base, "/v1/completions", {"prompt": "hello", **bad}))

    log = model_dir.parent / "every.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", "./tiny", "--max-model-len",
            str(MAX_MODEL_LEN), "--kv-cache-memory", "8MiB", "--max-logprobs", "-1"]  # fmt: skip
    proc, every = start_server(argv, log, timeout=180, cwd=model_dir.parent)
    try:
        r = _ok(_post(every, "/v1/chat/completions", {**chat, "logprobs": True,
                                                      "top_logprobs": -1}))  # fmt: skip
        content = r["choices"][0]["logprobs"]["content"]
        assert [len(t["top_logprobs"]) for t in content] == [vocab, vocab]
        r = _ok(_post(every, "/v1/completions", {"prompt": "hello", "max_tokens": 1,
                                                 "logprobs": -1, "prompt_logprobs": -1,
                                                 **GREEDY}))  # fmt: skip
        choice = r["choices"][0]
        # keyed by text, as OpenAI's shape is: tokens of one text (bytes >= 0x80) coincide
        texts = {t["token"] for t in content[0]["top_logprobs"]}
        assert set(choice["logprobs"]["top_logprobs"][0]) == texts
        assert choice["prompt_logprobs"][0] is None
        assert all(len(p) == vocab for p in choice["prompt_logprobs"][1:])
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- 404s, --version


@pytest.mark.parametrize(
    "path,api", [("/score", "Score"), ("/v1/score", "Score"), ("/rerank", "Score"),
                 ("/v1/rerank", "Score"), ("/v2/rerank", "Score"), ("/classify", "Classification")],
)  # fmt: skip
def test_pooling_apis_on_a_generative_server_are_vllms_400(base, path, api) -> None:
    """Served with --runner pooling (tests/test_classify_score.py); here vLLM's words."""
    body = {"input": "hello", "model": "tiny", "text_1": "a", "text_2": "b", "query": "q",
            "documents": ["d"]}
    err = _error(_post(base, path, body), 400)
    assert err["message"] == f"The model does not support {api} API"


@pytest.mark.parametrize("path,api", [("/v1/embeddings", "Embeddings"), ("/pooling", "Pooling")])
def test_embeddings_on_a_generative_server_are_vllms_400(base, path, api) -> None:
    """Served only with --runner pooling (tests/test_embeddings.py); here vLLM's words."""
    err = _error(_post(base, path, {"input": "hello", "model": "tiny"}), 400)
    assert err["message"] == f"The model does not support {api} API"


def test_unknown_paths_are_openai_404s(base) -> None:
    for method, path in (("POST", "/foo"), ("GET", "/v1/nothing"), ("GET", "/a/b")):
        err = _error(httpx.request(method, f"{base}{path}"), 404)
        assert err["message"] == f"Invalid URL ({method} {path})"


def test_version_flag_prints_the_version() -> None:
    console = Path(sys.executable).with_name("modelport")
    for cmd in ([sys.executable, "-m", "modelport", "--version"], [str(console), "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == version("modelport")
