"""Bad input on the OpenAI server: each malformed request gets OpenAI's error JSON with the
status vLLM gives, never a 500 or a silent answer, and the server keeps serving.

One server (the embedded default model, max_model_len 64) for the module; the cases are the
ones no other module checks (see test_bad_input.py for KServe and TorchServe).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from helpers.openai_http import error, ok, post
from helpers.server_proc import serving


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("bad_input_openai") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "64",
            "--max-num-seqs", "4"]  # fmt: skip
    with serving(argv, log) as url:
        yield url


HI = [{"role": "user", "content": "Hi"}]


def _chat(**kw) -> dict:
    return {"messages": HI, "max_tokens": 1, **kw}


def _comp(**kw) -> dict:
    return {"prompt": "Hi", "max_tokens": 1, **kw}


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"

# name: (path, JSON body or raw bytes, status, param, words in the message)
CASES = {
    "body a JSON array": (CHAT, b"[1, 2]", 400, None, "valid dictionary"),
    "body not UTF-8": (CHAT, b"\xff\xfe", 400, None, "not valid JSON"),
    "messages a string": (CHAT, {"messages": "Hi"}, 400, "messages", "valid list"),
    "messages empty": (CHAT, {"messages": []}, 400, "messages", "at least 1 item"),
    "role unknown": (
        CHAT, {"messages": [{"role": "bogus", "content": "x"}]}, 400, "messages", "'user'",
    ),
    "content a number": (
        CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages", "valid string",
    ),
    "content part unknown": (
        CHAT, {"messages": [{"role": "user", "content": [{"type": "bogus"}]}]}, 400,
        "messages", "",
    ),
    "max_tokens negative": (CHAT, _chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    "max_tokens a fraction": (CHAT, _chat(max_tokens=1.5), 400, "max_tokens", "integer"),
    "max_tokens huge": (CHAT, _chat(max_tokens=10**30), 400, "max_tokens", "maximum context length"),
    "temperature NaN": (
        CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400,
        "temperature", "",
    ),
    "top_p Infinity": (
        COMP, b'{"prompt": "Hi", "top_p": Infinity}', 400, "top_p", "",
    ),
    "temperature negative": (CHAT, _chat(temperature=-1), 400, "temperature", "greater than or equal to 0"),
    "n 0": (CHAT, _chat(n=0), 400, "n", "greater than or equal to 1"),
    "n huge": (COMP, _comp(n=10**9), 400, "n", "less than or equal to 128"),
    "top_logprobs over the limit": (
        CHAT, _chat(logprobs=True, top_logprobs=100), 400, "top_logprobs", "max allowed: 20",
    ),
    "top_logprobs without logprobs": (
        CHAT, _chat(top_logprobs=3), 400, "top_logprobs", "requires logprobs",
    ),
    "completion logprobs over the limit": (COMP, _comp(logprobs=100), 400, "logprobs", "20"),
    "stop of numbers": (CHAT, _chat(stop=[1, 2]), 400, "stop", "valid string"),
    "stop_token_ids negative": (CHAT, _chat(stop_token_ids=[-1]), 400, "stop_token_ids", "greater than or equal to 0"),
    "response_format a string": (
        CHAT, _chat(response_format="json"), 400, "response_format", "dictionary",
    ),
    "response_format type unknown": (
        CHAT, _chat(response_format={"type": "bogus"}), 400, "response_format", "'json_object'",
    ),
    "json_schema without schema": (
        CHAT, _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
        "response_format", "needs json_schema.schema",
    ),
    "tools a string": (CHAT, _chat(tools="x"), 400, "tools", "valid list"),
    "tool without function": (CHAT, _chat(tools=[{"type": "function"}]), 400, "tools", "function"),
    "tool_choice object without its function": (
        CHAT, _chat(tool_choice={"type": "function"}), 400, "tool_choice",
        "tool_choice.function: Field required",
    ),
    "tool_choice unknown word": (
        CHAT, _chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="x"),
        400, "tool_choice", "'auto'",
    ),
    "seed over 64 bits": (CHAT, _chat(seed=2**70), 400, "seed", ""),
    "logit_bias key not a token id": (CHAT, _chat(logit_bias={"x": 1}), 400, "logit_bias", "'x'"),
    # NaN passed min(100, max(-100, NaN)) as a bias of -100: the token was silently banned
    "logit_bias NaN": (
        CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, '
        b'"logit_bias": {"5": NaN}}', 400, "logit_bias", "finite",
    ),
    "logit_bias Infinity": (
        COMP, b'{"prompt": "Hi", "max_tokens": 1, "logit_bias": {"5": -Infinity}}', 400,
        "logit_bias", "finite",
    ),
    "stream_options without stream": (
        CHAT, _chat(stream_options={"include_usage": True}), 400, "stream_options", "stream",
    ),
    "prompt too long": (COMP, _comp(prompt="Hi " * 200), 400, "prompt", "maximum context length"),
    "prompt ids too long": (
        COMP, _comp(prompt=list(range(1, 100))), 400, "prompt", "maximum context length",
    ),
    "empty prompt": (COMP, _comp(prompt=""), 400, "prompt", "prompt is empty"),
    "empty prompt list": (COMP, _comp(prompt=[]), 400, "prompt", "empty list"),
    "prompt token out of vocab": (COMP, _comp(prompt=[10**9]), 400, "prompt", "out of range"),
    # a prompt that fits none of str | [str] | [int] | [[int]]: the member it came closest to
    "prompt token negative": (
        COMP, _comp(prompt=[-1]), 400, "prompt", "prompt.0: Input should be greater than or equal to 0",
    ),
    "one prompt of several empty": (
        COMP, _comp(prompt=[[1, 2], []]), 400, "prompt", "prompt.1: List should have at least 1 item",
    ),
    "prompt ids with a string": (
        COMP, _comp(prompt=[1, "a"]), 400, "prompt", "prompt.1: Input should be a valid integer",
    ),
    "prompt a number": (COMP, _comp(prompt=5), 400, "prompt", "valid string"),
    "one prompt of several out of vocab": (
        COMP, _comp(prompt=[[1, 2], [10**9]]), 400, "prompt", "out of range",
    ),
    "max_tokens past the context": (COMP, _comp(max_tokens=100), 400, "max_tokens", "too large"),
    "unknown model (chat)": (CHAT, _chat(model="nope"), 404, "model", "`nope` does not exist"),
    "unknown model (completions)": (COMP, _comp(model="nope"), 404, "model", "does not exist"),
    "model a number": (COMP, _comp(model=5), 400, "model", "valid string"),
    # a request's own template was silently replaced by the model's (vLLM refuses it unless
    # --trust-request-chat-template)
    "request chat_template": (
        CHAT, _chat(chat_template="{{ messages[0].content }}"), 400, "chat_template",
        "Refused request with untrusted chat template",
    ),
    # prompt_embeds were ignored and the answer was for `prompt` alone
    "prompt_embeds": (COMP, _comp(prompt_embeds="aGVsbG8="), 400, "prompt_embeds", "not supported"),
    "tokenize prompt a list": ("/tokenize", {"prompt": ["a"]}, 400, "prompt", "valid string"),
    "tokenize both prompt and messages": (
        "/tokenize", {"prompt": "a", "messages": HI}, 400, "prompt", "exactly one",
    ),
    "tokenize unknown model": ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model", "nope"),
    "tokenize chat_template": (
        "/tokenize", {"messages": HI, "chat_template": "{{ 1 }}"}, 400, "chat_template",
        "untrusted chat template",
    ),
    "detokenize out of vocab": ("/detokenize", {"tokens": [2**70]}, 400, "tokens", "must be <"),
    "detokenize negative": ("/detokenize", {"tokens": [-1]}, 400, "tokens", "greater than or equal to 0"),
    "detokenize nested": ("/detokenize", {"tokens": [[1]]}, 400, "tokens", "valid integer"),
    "embeddings on a generative model": (
        "/v1/embeddings", {"input": "hi"}, 400, None, "does not support Embeddings API",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_is_an_openai_error(base, case) -> None:
    path, body, status, param, words = CASES[case]
    if isinstance(body, bytes):
        r = httpx.post(f"{base}{path}", content=body, timeout=60,
                       headers={"content-type": "application/json"})
    else:
        r = post(base, path, body, timeout=60)
    err = error(r, status)
    # pydantic's errors name the field's path (messages.0.content): its first part
    assert (err["param"] or "").split(".")[0] == (param or ""), err
    assert not any(c in (err["param"] or "") for c in "[]"), err  # no union member names
    assert words in err["message"], err
    assert "Traceback" not in err["message"] and "internal" not in err["message"], err


def test_concurrent_requests_with_one_request_id_are_answered_once_each(base) -> None:
    """vLLM's request_id field: a second request under an id still running is refused (no
    answer is mixed up with another's), and the id serves again once it is free."""
    body = _comp(prompt="Count:", max_tokens=8, ignore_eos=True, request_id="same")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{base}{COMP}", json=body) for _ in range(3)))

    responses = asyncio.run(burst())
    done = [r for r in responses if r.status_code == 200]
    assert done, [r.text for r in responses]
    for r in done:
        assert r.json()["id"] == "same" and r.json()["usage"]["completion_tokens"] == 8
    for r in responses:
        if r.status_code != 200:
            assert "is already in use" in error(r, 400)["message"]
    assert ok(post(base, COMP, body))["usage"]["completion_tokens"] == 8


def test_still_serves_after_bad_input(base) -> None:
    """Last in the module: every malformed request above left the server serving."""
    doc = ok(post(base, CHAT, _chat(max_tokens=2, temperature=0)))
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert doc["usage"]["completion_tokens"] >= 1
    doc = ok(post(base, COMP, _comp(max_tokens=2, logit_bias={"5": 100}, temperature=0)))
    assert doc["usage"]["completion_tokens"] == 2
    assert ok(post(base, "/tokenize", {"messages": HI}))["count"] > 0
