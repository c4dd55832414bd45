"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API, as vLLM and
llama.cpp's server serve it) on the embedded default model, behind --api-key: served through
the chat path, so a greedy answer is the chat completion's; usage counts the prompt as
/tokenize renders it; stop reasons (end_turn, max_tokens, stop_sequence, tool_use); system
as a string or text blocks; streamed events in Anthropic's order that reassemble to the same
text; tool_use blocks and tool_result turns; prefill; errors in Anthropic's shape and status;
the anthropic SDK's create / stream / count_tokens.
"""

from __future__ import annotations

import json

import httpx
import pytest

from helpers.server_proc import serving

KEY = "sk-anthropic-test"
AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("xgrammar")  # tool_choice tool / any constrain to the schema
    log = tmp_path_factory.mktemp("anthropicsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "512",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--api-key", KEY]
    with serving(argv, log) as url:
        yield url


@pytest.fixture(scope="module")
def model(base) -> str:
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return r.json()["data"][0]["id"]


def _post(base: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=AUTH if headers is None else headers,
                      timeout=180)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _message(base: str, body: dict) -> dict:
    msg = _ok(_post(base, "/v1/messages", body))
    assert msg["id"].startswith("msg_") and msg["type"] == "message"
    assert msg["role"] == "assistant"
    return msg


def _text(msg: dict) -> str:
    (block,) = msg["content"]
    assert block["type"] == "text"
    return block["text"]


def _events(base: str, body: dict) -> list[tuple[str, dict]]:
    out = []
    with httpx.stream("POST", f"{base}/v1/messages", json={**body, "stream": True},
                      headers=AUTH, timeout=180) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                out.append((name, data))
    return out


def _error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    return body["error"]["message"]


def test_text_answer_and_its_usage(base, model) -> None:
    body = {"model": model, "max_tokens": 40, "temperature": 0, "messages": QUESTION}
    msg = _message(base, body)
    assert "Paris" in _text(msg)
    assert msg["model"] == model
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    # the prompt as /tokenize renders the same conversation; the answer is the chat's
    prompt = _ok(httpx.post(f"{base}/tokenize", json={"messages": QUESTION}, headers=AUTH))
    chat = _ok(_post(base, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 40,
                                                    "temperature": 0}))
    assert msg["usage"] == {"input_tokens": prompt["count"],
                            "output_tokens": chat["usage"]["completion_tokens"]}
    assert _text(msg) == chat["choices"][0]["message"]["content"]
    counted = _ok(_post(base, "/v1/messages/count_tokens", {"model": model,
                                                            "messages": QUESTION}))
    assert counted == {"input_tokens": prompt["count"]}


def test_max_tokens_and_stop_sequences(base, model) -> None:
    body = {"model": model, "temperature": 0, "messages": QUESTION}
    cut = _message(base, {**body, "max_tokens": 3})
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 3
    full = _text(_message(base, {**body, "max_tokens": 40}))
    stopped = _message(base, {**body, "max_tokens": 40, "stop_sequences": ["Paris", "Zzz"]})
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "Paris"
    assert _text(stopped) == full[:full.index("Paris")]  # the sequence is not in the text


def test_system_as_a_string_and_as_blocks(base, model) -> None:
    body = {"model": model, "max_tokens": 24, "temperature": 0, "messages": QUESTION}
    as_string = _message(base, {**body, "system": "You are a pirate. Answer as one."})
    as_blocks = _message(base, {**body, "system": [
        {"type": "text", "text": "You are a pirate."}, {"type": "text", "text": " Answer as one."}]})
    plain = _message(base, body)
    assert as_string["content"] == as_blocks["content"]
    assert as_string["usage"] == as_blocks["usage"]
    assert as_string["usage"]["input_tokens"] != plain["usage"]["input_tokens"]
    chat = _ok(_post(base, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You are a pirate. Answer as one."},
                     *QUESTION], "max_tokens": 24, "temperature": 0}))
    assert _text(as_string) == chat["choices"][0]["message"]["content"]


def test_stream_events_reassemble_to_the_answer(base, model) -> None:
    body = {"model": model, "max_tokens": 40, "temperature": 0, "messages": QUESTION}
    msg = _message(base, body)
    events = _events(base, body)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": msg["usage"]["input_tokens"], "output_tokens": 0}
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == _text(msg)
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"] == msg["usage"]

    stopped = _events(base, {**body, "stop_sequences": ["Paris"]})
    assert stopped[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "Paris"}


def test_forced_tool_gives_a_tool_use_block(base, model) -> None:
    body = {"model": model, "max_tokens": 60, "temperature": 0, "messages": ASK,
            "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    msg = _message(base, body)
    (block,) = msg["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert isinstance(block["id"], str) and block["id"]
    assert isinstance(block["input"], dict) and isinstance(block["input"]["city"], str)
    assert msg["stop_reason"] == "tool_use"

    events = _events(base, {**body, "tool_choice": {"type": "any"}})
    starts = [d for n, d in events if n == "content_block_start"]
    assert starts and all(s["content_block"]["type"] == "tool_use" for s in starts)
    assert starts[0]["content_block"]["input"] == {}
    pieces = [d["delta"]["partial_json"] for n, d in events
              if n == "content_block_delta" and d["index"] == 0]
    args = json.loads("".join(pieces))
    assert starts[0]["content_block"]["name"] == "get_weather" and set(args) == {"city"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_result_turn_is_served(base, model) -> None:
    turns = [*ASK,
             {"role": "assistant", "content": [
                 {"type": "text", "text": "Let me check."},
                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                  "input": {"city": "Paris"}}]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": "toolu_1",
                  "content": [{"type": "text", "text": "18 degrees and sunny"}]}]}]
    msg = _message(base, {"model": model, "max_tokens": 8, "temperature": 0, "tools": [WEATHER],
                          "tool_choice": {"type": "none"}, "messages": turns})
    assert msg["content"][0]["type"] == "text" and msg["stop_reason"] in ("end_turn",
                                                                          "max_tokens")
    # the template saw the same conversation as the OpenAI one
    openai_turns = [*ASK,
                    {"role": "assistant", "content": "Let me check.", "tool_calls": [{
                        "id": "toolu_1", "type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "toolu_1",
                     "content": "18 degrees and sunny"}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"],
                                               "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    prompt = _ok(httpx.post(f"{base}/tokenize", json={"messages": openai_turns,
                                                      "tools": tools}, headers=AUTH))
    assert msg["usage"]["input_tokens"] == prompt["count"]
    counted = _ok(_post(base, "/v1/messages/count_tokens", {
        "model": model, "messages": turns, "tools": [WEATHER]}))
    assert counted["input_tokens"] == prompt["count"]


def test_a_final_assistant_message_is_continued(base, model) -> None:
    prefix = "The capital of France is"
    msg = _message(base, {"model": model, "max_tokens": 6, "temperature": 0, "messages": [
        *QUESTION, {"role": "assistant", "content": prefix}]})
    chat = _ok(_post(base, "/v1/chat/completions", {
        "messages": [*QUESTION, {"role": "assistant", "content": prefix}], "max_tokens": 6,
        "temperature": 0, "continue_final_message": True, "add_generation_prompt": False}))
    assert _text(msg) == chat["choices"][0]["message"]["content"]
    assert "Paris" in _text(msg)


@pytest.mark.parametrize(("body", "said"), [
    ({"messages": QUESTION}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]},
     "messages[0].content[1]: image blocks are not supported"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": []}]}, "must not be empty"),
    ({"max_tokens": 5, "messages": QUESTION, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [{**WEATHER, "type": "web_search_1"}]},
     "server tools"),
    # as the SDK sends a server tool (no input_schema): was "tools.0.input_schema: Field
    # required", as if it were a client tool missing its schema
    ({"max_tokens": 5, "messages": QUESTION, "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]},
     "tools of type 'web_search_20250305' (Anthropic's server tools) are not supported"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [{"name": "f"}]},
     "tools.0.input_schema: Field required"),
    ({"max_tokens": 5, "messages": QUESTION, "output_config": {"format": {
        "type": "json_schema", "schema": {"type": "objectx"}}}},
     "output_config.format.schema"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "nope"}}, "no function named 'nope'"),
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]},
     "send text and tool_use blocks"),
])
def test_bad_requests_are_anthropic_400s(base, model, body, said) -> None:
    message = _error(_post(base, "/v1/messages", {"model": model, **body}), 400,
                     "invalid_request_error")
    assert said in message, message


def test_output_config_format_constrains_the_answer(base, model) -> None:
    # Anthropic's structured outputs (vLLM serves them too): was ignored, a free-text answer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    body = {"model": model, "max_tokens": 40, "temperature": 0, "messages": QUESTION,
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    msg = _message(base, body)
    assert msg["stop_reason"] == "end_turn"
    answer = json.loads(_text(msg))
    assert set(answer) == {"city"} and isinstance(answer["city"], str)
    events = _events(base, body)
    assert "".join(d["delta"]["text"] for n, d in events
                   if n == "content_block_delta") == _text(msg)


def test_not_found_auth_and_bad_json(base, model) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": QUESTION}
    assert "claude-sonnet-4-5" in _error(_post(base, "/v1/messages", body), 404,
                                         "not_found_error")
    _error(_post(base, "/v1/messages/count_tokens",
                 {"model": "claude-sonnet-4-5", "messages": QUESTION}), 404, "not_found_error")
    good = {**body, "model": model}
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        assert "x-api-key" in _error(_post(base, "/v1/messages", good, headers), 401,
                                     "authentication_error")
    _error(_post(base, "/v1/messages/count_tokens", {"model": model, "messages": QUESTION},
                 {}), 401, "authentication_error")
    bad = httpx.post(f"{base}/v1/messages", content=b"{not json", headers=AUTH, timeout=30)
    assert "not valid JSON" in _error(bad, 400, "invalid_request_error")
    # still serving, and a Bearer key is taken too
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert _ok(_post(base, "/v1/messages", good, bearer))["content"]


def test_anthropic_sdk(base, model) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(api_key=KEY, base_url=base, max_retries=0, timeout=180)
    kw = {"model": model, "max_tokens": 40, "messages": QUESTION,
          "extra_body": {"temperature": 0}}  # newer SDKs take no temperature argument
    msg = client.messages.create(**kw)
    assert msg.stop_reason == "end_turn" and "Paris" in msg.content[0].text
    with client.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == msg.content[0].text
    assert final.usage.output_tokens == msg.usage.output_tokens
    counted = client.messages.count_tokens(model=model, messages=QUESTION)
    assert counted.input_tokens == msg.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(**{**kw, "model": "claude-sonnet-4-5"})
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="wrong", base_url=base, max_retries=0).messages.create(**kw)


def _parse(events: list[str]) -> list[dict]:
    out = []
    for e in events:
        name, data = e.split("\n")[:2]
        payload = json.loads(data[len("data: "):])
        assert name == f"event: {payload['type']}"
        out.append(payload)
    return out


def test_event_writer_blocks_and_an_in_band_error() -> None:
    from modelport.entrypoints.anthropic.serving import _EventWriter

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    w = _EventWriter("msg_1", None)
    chunks = [
        {"model": "m", "usage": usage, "choices": [{"delta": {"role": "assistant",
                                                              "content": ""}}]},
        {"model": "m", "choices": [{"delta": {"content": "Sure."}}]},
        {"model": "m", "choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "c0", "type": "function", "function": {"name": "f"}}]}}]},
        {"model": "m", "choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"a": 1}'}}]}}]},
        {"model": "m", "choices": [{"delta": {"tool_calls": [
            {"index": 1, "id": "c1", "type": "function",
             "function": {"name": "g", "arguments": "{}"}}]},
            "finish_reason": "tool_calls"}]},
    ]
    got = _parse([e for c in chunks for e in w.feed(c)] + w.finish())
    assert [(g["type"], g.get("index")) for g in got] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert got[5]["content_block"] == {"type": "tool_use", "id": "c0", "name": "f", "input": {}}
    assert got[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert got[-2]["delta"]["stop_reason"] == "tool_use"
    assert got[-2]["usage"] == {"input_tokens": 5, "output_tokens": 2}

    w = _EventWriter("msg_2", None)
    got = _parse(w.feed(chunks[1]) + w.feed(
        {"error": {"message": "engine died", "type": "internal_server_error", "param": None,
                   "code": None}}))
    assert w.failed
    assert [g["type"] for g in got] == ["message_start", "ping", "content_block_start",
                                        "content_block_delta", "content_block_stop", "error"]
    assert got[-1]["error"] == {"type": "api_error", "message": "engine died"}


def test_event_writer_ends_a_call_before_the_text_after_it() -> None:
    """One step may finish a call's arguments and write text after the call (several tokens
    a step: speculative decoding, text held back for a stop sequence): the arguments go to
    the tool_use block before it stops; they came after its content_block_stop."""
    from modelport.entrypoints.anthropic.serving import _EventWriter

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    w = _EventWriter("msg_1", None)
    chunks = [
        {"model": "m", "usage": usage, "choices": [{"delta": {"role": "assistant",
                                                              "content": ""}}]},
        {"model": "m", "choices": [{"delta": {"content": "Sure.", "tool_calls": [
            {"index": 0, "id": "c0", "type": "function", "function": {"name": "f"}}]}}]},
        {"model": "m", "choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"a": '}}]}}]},
        {"model": "m", "choices": [{"delta": {"content": " Done.", "tool_calls": [
            {"index": 0, "function": {"arguments": "1}"}}]}, "finish_reason": "tool_calls"}]},
    ]
    got = _parse([e for c in chunks for e in w.feed(c)] + w.finish())
    stopped: set[int] = set()
    for g in got:  # no block gets a delta once it has stopped
        if g["type"] == "content_block_stop":
            stopped.add(g["index"])
        elif g["type"] == "content_block_delta":
            assert g["index"] not in stopped, got
    assert [(g["type"], g.get("index")) for g in got] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert "".join(g["delta"]["partial_json"] for g in got
                   if g["type"] == "content_block_delta" and g["index"] == 1) == '{"a": 1}'
    assert got[10]["delta"] == {"type": "text_delta", "text": " Done."}
