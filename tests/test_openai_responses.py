"""POST /v1/responses (OpenAI's Responses API, as vLLM serves it for text models) on the
embedded default model: served through the chat path, so its answers are the chat
completion's; typed SSE events that reassemble to the same text; max_output_tokens cut gives
status "incomplete"; text.format json_schema constrains the output; instructions reach the
template; function tools give function_call items; no response is stored (vLLM's 404s);
errors in OpenAI's shape; the openai client's responses.create works.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving

QUESTION = "Name three colors of the rainbow."
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("xgrammar")
    log = tmp_path_factory.mktemp("respsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "512",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with serving(argv, log) as url:
        yield url





def _text(resp: dict) -> str:
    msgs = [o for o in resp["output"] if o["type"] == "message"]
    assert len(msgs) == 1, resp["output"]
    (part,) = msgs[0]["content"]
    assert part["type"] == "output_text" and part["annotations"] == []
    return part["text"]


def _events(base: str, body: dict) -> list[tuple[str, dict]]:
    out = []
    with httpx.stream("POST", f"{base}/v1/responses", json={**body, "stream": True},
                      timeout=180) as r:
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


def test_text_answer_equals_chat(base) -> None:
    r = _ok(_post(base, "/v1/responses", {"input": QUESTION, "temperature": 0,
                                          "max_output_tokens": 24, "metadata": {"k": "v"},
                                          "user": "u1"}))
    chat = _ok(_post(base, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": 24}))
    assert r["id"].startswith("resp_") and r["object"] == "response"
    assert isinstance(r["created_at"], int)
    assert r["output"][0]["id"].startswith("msg_")
    assert r["output"][0]["role"] == "assistant" and r["output"][0]["status"] == "completed"
    assert _text(r) == chat["choices"][0]["message"]["content"]
    u = r["usage"]
    assert u["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert u["output_tokens"] == chat["usage"]["completion_tokens"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert u["input_tokens_details"]["cached_tokens"] >= 0
    assert u["output_tokens_details"] == {"reasoning_tokens": 0}
    assert r["metadata"] == {"k": "v"} and r["user"] == "u1"
    assert r["temperature"] == 0 and r["max_output_tokens"] == 24
    assert r["store"] is False and r["text"] == {"format": {"type": "text"}}
    # the same conversation as a list of input items (content parts)
    r2 = _ok(_post(base, "/v1/responses", {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        "temperature": 0, "max_output_tokens": 24}))
    assert _text(r2) == _text(r)
    expected = "completed" if chat["choices"][0]["finish_reason"] == "stop" else "incomplete"
    assert r["status"] == expected


def test_stream_events_reassemble(base) -> None:
    body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 24}
    full = _ok(_post(base, "/v1/responses", body))
    events = _events(base, body)
    names = [n for n, _ in events]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    deltas = [d["delta"] for n, d in events if n == "response.output_text.delta"]
    assert len(deltas) > 1
    first, last = names.index("response.output_text.delta"), len(names) - 1 - names[::-1].index(
        "response.output_text.delta")
    assert names[:first] == ["response.created", "response.in_progress",
                             "response.output_item.added", "response.content_part.added"]
    assert set(names[first:last + 1]) == {"response.output_text.delta"}
    done = "response.completed" if full["status"] == "completed" else "response.incomplete"
    assert names[last + 1:] == ["response.output_text.done", "response.content_part.done",
                                "response.output_item.done", done]
    text = "".join(deltas)
    assert text == _text(full)
    ev = dict(events)
    assert ev["response.created"]["response"]["status"] == "in_progress"
    assert ev["response.output_text.done"]["text"] == text
    assert ev["response.output_item.done"]["item"]["content"][0]["text"] == text
    final = ev[done]["response"]
    assert _text(final) == text and final["status"] == full["status"]
    assert final["usage"]["output_tokens"] == full["usage"]["output_tokens"]
    assert final["id"] == ev["response.created"]["response"]["id"]


def test_max_output_tokens_incomplete(base) -> None:
    r = _ok(_post(base, "/v1/responses", {"input": "Write a long story about a dragon.",
                                          "max_output_tokens": 3, "temperature": 0}))
    assert r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["usage"]["output_tokens"] == 3
    names = [n for n, _ in _events(base, {"input": "Write a long story about a dragon.",
                                          "max_output_tokens": 3, "temperature": 0})]
    assert names[-1] == "response.incomplete"


def test_text_format_json_schema(base) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
    r = _ok(_post(base, "/v1/responses", {
        "input": "Give a person's name and age as JSON.", "max_output_tokens": 60,
        "temperature": 0, "text": {"format": fmt}}))
    assert r["status"] == "completed", r
    obj = json.loads(_text(r))
    assert set(obj) == {"name", "age"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
    assert r["text"] == {"format": fmt}
    r = _ok(_post(base, "/v1/responses", {
        "input": "Answer in JSON.", "max_output_tokens": 40, "temperature": 0,
        "text": {"format": {"type": "json_object"}}}))
    if r["status"] == "completed":
        assert isinstance(json.loads(_text(r)), dict)


def test_instructions_reach_template(base) -> None:
    sys = "You are a pirate. Answer like one."
    r = _ok(_post(base, "/v1/responses", {"input": QUESTION, "instructions": sys,
                                          "max_output_tokens": 8, "temperature": 0}))
    tok = _ok(_post(base, "/tokenize", {"messages": [{"role": "system", "content": sys},
                                                     {"role": "user", "content": QUESTION}]}))
    plain = _ok(_post(base, "/tokenize", {"messages": [{"role": "user", "content": QUESTION}]}))
    # (the template may put a default system prompt in a conversation that has none)
    assert r["usage"]["input_tokens"] == tok["count"] != plain["count"]
    assert r["instructions"] == sys
    chat = _ok(_post(base, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": sys}, {"role": "user", "content": QUESTION}],
        "max_tokens": 8, "temperature": 0}))
    assert _text(r) == chat["choices"][0]["message"]["content"]


def test_function_tool_call(base) -> None:
    body = {"input": "What is the weather in Paris?", "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0,
            "max_output_tokens": 60}
    r = _ok(_post(base, "/v1/responses", body))
    calls = [o for o in r["output"] if o["type"] == "function_call"]
    assert len(calls) == 1, r["output"]
    call = calls[0]
    assert call["name"] == "get_weather" and call["status"] == "completed"
    assert call["id"].startswith("fc_") and call["call_id"]
    assert set(json.loads(call["arguments"])) == {"city"}
    events = _events(base, body)
    names = [n for n, _ in events]
    assert "response.function_call_arguments.done" in names
    args = "".join(d["delta"] for n, d in events
                   if n == "response.function_call_arguments.delta")
    assert json.loads(args) == json.loads(call["arguments"])
    # the call and its output as history reach the template
    r = _ok(_post(base, "/v1/responses", {
        "input": [{"role": "user", "content": "What is the weather in Paris?"},
                  {"type": "function_call", "call_id": call["call_id"], "name": "get_weather",
                   "arguments": call["arguments"]},
                  {"type": "function_call_output", "call_id": call["call_id"],
                   "output": "sunny, 21C"}],
        "tools": [WEATHER], "max_output_tokens": 8, "temperature": 0}))
    assert r["usage"]["input_tokens"] > 0


def test_no_store(base) -> None:
    err = _error(httpx.get(f"{base}/v1/responses/resp_abc", timeout=30), 404)
    assert "resp_abc" in err["message"]
    _error(httpx.post(f"{base}/v1/responses/resp_abc/cancel", timeout=30), 404)
    err = _error(_post(base, "/v1/responses", {"input": "hi", "previous_response_id": "resp_x"}),
                 404)
    assert err["param"] == "previous_response_id" or "resp_x" in err["message"]
    err = _error(_post(base, "/v1/responses", {"input": "hi", "background": True}))
    assert err["param"] == "background"


@pytest.mark.parametrize(("body", "param"), [
    ({}, None),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "web_search_call"}]}, "input[0]"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "hi", "tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"input": "hi", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 0}, None),
    ({"input": "hi", "temperature": 5}, None),
    ({"input": "hi", "model": "nope"}, "model"),
])
def test_errors(base, body, param) -> None:
    r = _post(base, "/v1/responses", body)
    status = 404 if param == "model" else 400
    err = _error(r, status)
    if param is not None:
        assert err["param"] == param, err
    # the server keeps serving
    assert _ok(_post(base, "/v1/responses", {"input": "hi", "max_output_tokens": 2}))


def test_openai_client(base) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x")
    models = client.models.list().data
    r = client.responses.create(model=models[0].id, input=QUESTION, temperature=0,
                                max_output_tokens=24)
    raw = _ok(_post(base, "/v1/responses", {"input": QUESTION, "temperature": 0,
                                            "max_output_tokens": 24}))
    assert r.output_text == _text(raw)
    assert r.usage is not None and r.usage.total_tokens == raw["usage"]["total_tokens"]
    stream = client.responses.create(model=models[0].id, input=QUESTION, temperature=0,
                                     max_output_tokens=24, stream=True)
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_stream_translation_of_reasoning_and_calls() -> None:
    """The chat stream's reasoning, content and tool-call deltas become reasoning, message and
    function_call items (no server: crafted chat chunks)."""
    import asyncio

    from modelport.entrypoints.openai.serving_responses import ResponsesRequest, ServingResponses

    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                                                   "finish_reason": finish}]}) + "\n\n"

    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning": "Let me "}),
              chunk({"reasoning": "think."}), chunk({"content": "Calling."}),
              chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"),
              "data: " + json.dumps({"choices": [], "usage": {
                  "prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                  "completion_tokens_details": {"reasoning_tokens": 4}}}) + "\n\n",
              "data: [DONE]\n\n"]

    async def source():
        for c in chunks:
            yield c

    async def run() -> list[dict]:
        serving = ServingResponses(None)  # type: ignore[arg-type]
        req = ResponsesRequest(input="hi", stream=True)
        out = []
        async for e in serving._stream(req, "resp_x", 0, "m", source()):
            name, data = e.split("\n")[:2]
            out.append(json.loads(data[6:]))
            assert name == f"event: {out[-1]['type']}"
        return out

    events = asyncio.run(run())
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    kinds = [o["type"] for o in final["output"]]
    assert kinds == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me think."
    assert final["output"][1]["content"][0]["text"] == "Calling."
    call = final["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "f", '{"a": 1}')
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    assert [e["type"] for e in events].count("response.output_item.done") == 3
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_stream_ends_a_call_before_the_text_after_it() -> None:
    """One step may finish a call's arguments and write text after the call (several tokens
    a step): the arguments go to the function_call item before it is done. They came after
    its response.function_call_arguments.done, which carried them cut short."""
    import asyncio

    from modelport.entrypoints.openai.serving_responses import ResponsesRequest, ServingResponses

    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                                                   "finish_reason": finish}]}) + "\n\n"

    chunks = [chunk({"role": "assistant", "content": ""}),
              chunk({"content": "Calling.", "tool_calls": [
                  {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
              chunk({"content": " Done.", "tool_calls": [
                  {"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"),
              "data: [DONE]\n\n"]

    async def source():
        for c in chunks:
            yield c

    async def run() -> list[dict]:
        serving = ServingResponses(None)  # type: ignore[arg-type]
        req = ResponsesRequest(input="hi", stream=True)
        return [json.loads(e.split("\n")[1][6:])
                async for e in serving._stream(req, "resp_x", 0, "m", source())]

    events = asyncio.run(run())
    done: set[int] = set()
    for e in events:  # no item gets a delta once it is done
        if e["type"] == "response.output_item.done":
            done.add(e["output_index"])
        elif e["type"].endswith(".delta"):
            assert e["output_index"] not in done, events
    (args_done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args_done["arguments"] == '{"a": 1}'
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "message"]
    assert final["output"][2]["content"][0]["text"] == " Done."
