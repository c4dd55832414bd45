"""OpenAI tool calling, as vLLM serves it.

- The parsers (hermes, llama3_json) on crafted text: calls, content, and stream increments
  that reassemble to the non-streaming answer.
- Over HTTP on the embedded default model (`--enable-auto-tool-choice --tool-call-parser
  hermes`): a named function and "required" are constrained to the tools' schemas, so the
  answer is a valid call whatever the model; "auto" is driven to a hermes call by a choice
  constraint, so the parser's work is deterministic; 400s in vLLM's words.
- Chat history with assistant tool_calls and tool messages reaches the template (a tiny
  Llama built here, with a tool-aware template), over /tokenize and through LLM.chat(tools=).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir
from modelport.entrypoints.openai.tool_parsers import (
    CallDelta,
    HermesToolParser,
    Llama3JsonToolParser,
    ParsedCall,
    ToolCallStreamer,
    history_for_template,
    scan_required,
)

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}},
                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]


def check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 20
    assert args["unit"] in ("celsius", "fahrenheit")


# ---------------------------------------------------------------- parsers, on crafted text


def _stream_deltas(parser, text: str, step: int = 1) -> tuple[str, list]:
    """Feed `text` in pieces of `step` characters; the content and the call deltas sent."""
    s = ToolCallStreamer(parser.scan)
    content, deltas = "", []
    for end in [*range(step, len(text), step), len(text)]:
        c, new = s.feed(text[:end], end == len(text))
        content += c
        deltas += new
    return content, deltas


def _calls_of(deltas: list) -> list[ParsedCall]:
    """The calls the deltas reassemble to (a call's name in its first delta only)."""
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for d in deltas:
        if d.name is not None:
            assert d.index not in names, "a call's name comes once"
            names[d.index] = d.name
        assert d.index in names, "a call's name comes before its arguments"
        args[d.index] = args.get(d.index, "") + (d.arguments or "")
    return [ParsedCall(names[i], args[i]) for i in sorted(names)]


def _stream(parser, text: str, step: int = 1) -> tuple[str, list[ParsedCall]]:
    content, deltas = _stream_deltas(parser, text, step)
    return content, _calls_of(deltas)


HERMES_TEXT = (
    "Let me look that up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
    "</tool_call>\n"
)


def test_hermes_finds_every_call_and_the_text_before_them() -> None:
    content, calls = HermesToolParser().parse(HERMES_TEXT)
    assert content == "Let me look that up."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1].arguments) == {"tz": "Europe/Paris"}


@pytest.mark.parametrize(("text", "content", "names"), [
    ("just text, no calls \n", "just text, no calls \n", []),
    ('<tool_call>{"name": "f", "arguments": {"a": "é"}}</tool_call>', None, ["f"]),
    # a last call left open (the model stopped at its end-of-turn) still counts
    ('<tool_call>{"name": "f", "arguments": {}}', None, ["f"]),
    # a block that is not a call stays content: nothing is lost
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    # arguments given as a JSON string are decoded
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, ["f"]),
])
def test_hermes_edge_cases(text, content, names) -> None:
    got_content, calls = HermesToolParser().parse(text)
    assert got_content == content
    assert [c.name for c in calls] == names


LLAMA_TEXT = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", '
              '"unit": "celsius"}}; {"name": "get_time", "parameters": {"tz": "CET"}}')


@pytest.mark.parametrize(("text", "content", "calls"), [
    (LLAMA_TEXT, None, [("get_weather", {"city": "Oslo", "unit": "celsius"}),
                        ("get_time", {"tz": "CET"})]),
    ('  {"name": "get_time", "parameters": {"tz": "UTC"}}', None, [("get_time", {"tz": "UTC"})]),
    ('{"name": "get_time", "arguments": {"tz": "UTC"}}', None, [("get_time", {"tz": "UTC"})]),
    ('Sure.<|python_tag|>{"name": "f", "parameters": {}}', "Sure.", [("f", {})]),
    ("The answer is 4.", "The answer is 4.", []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a": ', []),
])
def test_llama3_json(text, content, calls) -> None:
    got_content, got = Llama3JsonToolParser().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()])
@pytest.mark.parametrize("step", [1, 3, 17])
@pytest.mark.parametrize("which", ["calls", "text", "both"])
def test_stream_increments_reassemble_to_the_non_streaming_answer(parser, step, which) -> None:
    calls_text = HERMES_TEXT if parser.name == "hermes" else "Sure! " + LLAMA_TEXT
    text = {"calls": calls_text, "text": "No tools needed:\n  it is sunny.\n\n",
            "both": calls_text}[which]
    content, calls = _stream(parser, text, step)
    want_content, want_calls = parser.parse(text)
    assert content == (want_content or "")
    assert calls == want_calls
    if which == "calls":  # content streamed before the calls were complete
        assert content.startswith(("Let me", "Sure!"))


def test_hermes_stream_sends_content_before_a_call_completes() -> None:
    s = ToolCallStreamer(HermesToolParser().scan)
    assert s.feed("Checking <tool", False) == ("Checking", [])  # a marker may be arriving
    assert s.feed('Checking <tool_call>{"name": "f", "argu', False) == ("", [])
    content, calls = s.feed('Checking <tool_call>{"name": "f", "arguments": {}}</tool_call>',
                            False)
    assert content == "" and calls == [CallDelta(0, "f", "{}")]  # complete at once: whole


LONG_ARGS = {"query": "a \"quoted\" word, a tab\t, a newline\n, é, 😀 and \\ too",
             "limit": 12, "ratio": -1.5e3, "flags": [True, False, None],
             "nested": {"deep": ["x", {"y": 0.25}], "empty": {}, "none": []}}


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()])
@pytest.mark.parametrize("ascii_escapes", [False, True])
def test_a_long_call_streams_its_name_then_argument_pieces(parser, ascii_escapes) -> None:
    # the model's own spacing and escapes (\u00e9, \ud83d\ude00 surrogate pairs) differ
    # from the re-serialized arguments: the pieces still concatenate to exactly those
    raw = json.dumps(LONG_ARGS, ensure_ascii=ascii_escapes, separators=(",", ":"))
    if parser.name == "hermes":
        text = f'Let me search.<tool_call>\n{{"name": "search", "arguments": {raw}}}\n</tool_call>'
    else:
        text = f'Let me search.<|python_tag|>{{"name": "search", "parameters": {raw}}}'
    want_content, want_calls = parser.parse(text)
    assert json.loads(want_calls[0].arguments) == LONG_ARGS
    for step in (1, 2, 5):
        content, deltas = _stream_deltas(parser, text, step)
        assert content == want_content
        assert deltas[0].name == "search" and deltas[0].arguments is None  # name first
        pieces = [d.arguments for d in deltas[1:]]
        assert all(d.name is None for d in deltas[1:])
        assert len(pieces) > 10 and all(pieces)  # the arguments come as they are written
        assert "".join(pieces) == want_calls[0].arguments
        # sent before the call was complete: every piece but the last few is out early
        assert _calls_of(deltas) == want_calls


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()])
def test_pieces_are_settled_prefixes_token_by_token(parser) -> None:
    # whatever the cut, what has been sent is a prefix of the final arguments
    raw = '{"s": "\\u00e9\\ud83d\\ude00\\n\\"", "n": -12.50e1, "t": true, "z": null}'
    text = ('<tool_call>{"name": "f", "arguments": ' + raw + "}</tool_call>"
            if parser.name == "hermes" else '{"name": "f", "parameters": ' + raw + "}")
    final = parser.parse(text)[1][0].arguments
    s = ToolCallStreamer(parser.scan)
    sent = ""
    for end in range(1, len(text) + 1):
        _, deltas = s.feed(text[:end], end == len(text))
        sent += "".join(d.arguments or "" for d in deltas)
        assert final.startswith(sent), (text[:end], sent)
    assert sent == final == json.dumps(json.loads(raw), ensure_ascii=False)


def test_a_call_with_its_name_after_the_arguments_is_sent_whole() -> None:
    text = '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'
    _, deltas = _stream_deltas(HermesToolParser(), text)
    assert deltas == [CallDelta(0, "f", '{"a": 1}')]


def test_required_scan_takes_each_closed_call() -> None:
    text = '[{"name": "get_time", "parameters": {"tz": "UTC"}}, {"name": "get_weather", "par'
    assert scan_required(text, False).calls == [ParsedCall("get_time", '{"tz": "UTC"}')]


def test_a_step_with_a_name_and_arguments_is_split_one_entry_per_call_a_chunk() -> None:
    from modelport.entrypoints.openai.serving_chat import one_entry_per_call
    from modelport.entrypoints.openai.tools import ToolChoiceOutput, ToolPlan

    out = ToolChoiceOutput(ToolPlan("auto", [WEATHER], parser_name="hermes"))
    content, calls = out.feed('Sure.<tool_call>{"name": "get_weather", "arguments": {"ci',
                              False)
    assert content == "Sure." and [c.index for c in calls] == [0, 0]  # one step, two pieces
    first, *more = one_entry_per_call(calls)
    assert [c.function.name for c in first] == ["get_weather"] and first[0].id
    assert [[c.index for c in m] for m in more] == [[0]]
    assert more[0][0].function.name is None and more[0][0].function.arguments == '{"ci'
    assert one_entry_per_call([]) == [[]]


def test_history_arguments_reach_the_template_as_objects() -> None:
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    out = history_for_template(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # input unchanged


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("xgrammar")
    log = tmp_path_factory.mktemp("toolsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "512",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with serving(argv, log) as url:
        yield url


def _chat(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=180)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


def _events(base: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      timeout=180) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _reassemble(events: list[dict]) -> tuple[str, dict[int, dict], str | None]:
    """(content, calls by index {id, name, arguments}, finish_reason) of choice 0."""
    content, calls, finish = "", {}, None
    for ev in events:
        assert "error" not in ev, ev
        for ch in ev["choices"]:
            delta = ch["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"arguments": ""})
                if "id" in tc:
                    assert "id" not in call, "a call's id comes once"
                    call["id"], call["type"] = tc["id"], tc["type"]
                fn = tc.get("function", {})
                if "name" in fn:
                    call["name"] = fn["name"]
                call["arguments"] += fn.get("arguments", "")
            if ch["finish_reason"] is not None:
                finish = ch["finish_reason"]
    return content, calls, finish


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_function_answers_with_its_arguments_per_the_schema(base) -> None:
    body = {"messages": ASK, "tools": [TIME, WEATHER], "tool_choice": NAMED,
            "max_tokens": 80, "temperature": 0}
    r = _ok(_chat(base, body))
    choice = r["choices"][0]
    msg = choice["message"]
    assert msg["content"] == "" and len(msg["tool_calls"]) == 1
    call = msg["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    check_weather_args(call["function"]["arguments"])
    assert choice["finish_reason"] == "stop"  # vLLM (and OpenAI): a named call stops

    content, calls, finish = _reassemble(_events(base, body))
    assert content == "" and finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    assert calls[0]["arguments"] == call["function"]["arguments"]  # greedy: the same call


def test_required_answers_with_calls_of_the_listed_tools(base) -> None:
    body = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
            "max_tokens": 120, "temperature": 0}
    choice = _ok(_chat(base, body))["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and choice["finish_reason"] == "tool_calls"
    for c in calls:
        assert c["function"]["name"] in ("get_weather", "get_time")
        args = json.loads(c["function"]["arguments"])
        if c["function"]["name"] == "get_weather":
            check_weather_args(c["function"]["arguments"])
        else:
            assert set(args) == {"tz"}
    assert len({c["id"] for c in calls}) == len(calls)

    _, streamed, finish = _reassemble(_events(base, body))
    assert finish == "tool_calls"
    assert [(s["name"], s["arguments"]) for s in streamed.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_openai_client_reads_the_tool_calls(base) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=180)
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=ASK, tools=[WEATHER],
        tool_choice=NAMED, max_tokens=80, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    check_weather_args(call.function.arguments)


HERMES_ANSWER = ('Sure.<tool_call>{"name": "get_weather", "arguments": '
                 '{"city": "Paris", "unit": "celsius"}}</tool_call>')


def test_auto_with_the_hermes_parser(base) -> None:
    # a choice constraint makes the model write exactly a hermes call: the parser's work
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 80,
            "structured_outputs": {"choice": [HERMES_ANSWER]}}
    choice = _ok(_chat(base, body))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}

    events = _events(base, body)
    content, calls, finish = _reassemble(events)
    assert content == "Sure." and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == call["function"]["arguments"]  # exactly the same string
    # as vLLM: the name first (with id and type, no arguments), then argument pieces
    tool_deltas = [tc for ev in events for ch in ev["choices"]
                   for tc in ch["delta"].get("tool_calls") or []]
    first, rest = tool_deltas[0], tool_deltas[1:]
    assert first["id"].startswith("chatcmpl-tool-") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather"}
    # one entry per call in a chunk (as vLLM and OpenAI): the name came in one step with
    # the arguments' first piece, as two entries of index 0 in one chunk, and a client
    # reading delta.tool_calls[0] lost that piece
    for ev in events:
        for ch in ev["choices"]:
            indexes = [tc["index"] for tc in ch["delta"].get("tool_calls") or []]
            assert len(indexes) == len(set(indexes)), ch["delta"]
    assert len(rest) > 1
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
               for tc in rest)
    assert "".join(tc["function"]["arguments"] for tc in rest) == call["function"]["arguments"]

    # no call in the text: plain content, the engine's finish reason
    plain = _ok(_chat(base, {**body, "tool_choice": "auto",
                             "structured_outputs": {"choice": ["It is sunny."]}}))
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.",
                                              "tool_calls": []}
    assert plain["choices"][0]["finish_reason"] == "stop"


def test_tool_history_is_served(base) -> None:
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "chatcmpl-tool-1", "type": "function", "function": {
                       "name": "get_weather",
                       "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "18 degrees"}]
    r = _ok(_chat(base, {"messages": history, "tools": [WEATHER], "tool_choice": "none",
                         "max_tokens": 4}))
    assert r["choices"][0]["message"]["tool_calls"] == []


@pytest.mark.parametrize(("extra", "param", "said"), [
    ({"tool_choice": "required"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
    ({"tool_choice": NAMED}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
    ({"tools": [TIME], "tool_choice": NAMED}, "tool_choice",
     "does not match any of the specified `tools`: there is no function named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools",
     "the parameters of the tool 'f' are not a usable JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools", "the tool 'f'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, None, ""),
    ({"tools": [WEATHER], "tool_choice": NAMED, "guided_regex": "a"}, "tool_choice",
     "You can only either use guided decoding or tools, not both."),
])
def test_invalid_tool_requests_are_400s(base, extra, param, said) -> None:
    err = _error(_chat(base, {"messages": ASK, "max_tokens": 2, **extra}))
    if param is not None:
        assert err["param"] == param, err
    assert said in err["message"], err


# ---------------------------------------------------------------- the chat template

# (chat templates render with trim_blocks, as HF's: no newline after a block tag)
TOOL_TEMPLATE = (
    "{% if tools %}[tools]{% for t in tools %} {{ t.function.name }}{% endfor %};{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% elif m.role == 'tool' %}result of {{ m.tool_call_id }}: {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %};{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
HISTORY = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "18C"},
]
RENDERED = ("[tools] get_weather get_time;<user>weather?;"
            '<assistant>call get_weather {"city": "Paris"};'
            "<tool>result of call-1: 18C;<assistant>")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("tooltpl") / "tiny")
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return path


def test_llm_chat_passes_tools_and_history_to_the_template(tool_model) -> None:
    from modelport import LLM, SamplingParams

    llm = LLM(str(tool_model), max_model_len=256, kv_cache_memory=8 << 20)
    out = llm.chat(HISTORY, SamplingParams(max_tokens=1), tools=[WEATHER, TIME],
                   use_tqdm=False)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == RENDERED


@pytest.fixture(scope="module")
def tiny_base(tool_model, tmp_path_factory):
    """The tiny model served without --enable-auto-tool-choice."""
    log = tmp_path_factory.mktemp("tinytools") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(tool_model),
            "--max-model-len", "256", "--kv-cache-memory", "8MiB"]
    with serving(argv, log) as url:
        yield url


def test_tokenize_and_chat_render_tools_and_history(tiny_base) -> None:
    r = httpx.post(f"{tiny_base}/tokenize", json={"messages": HISTORY, "tools": [WEATHER, TIME]})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    text = httpx.post(f"{tiny_base}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == RENDERED
    # the same prompt for a chat completion (tool_choice none: the template sees the tools)
    r = _ok(_chat(tiny_base, {"messages": HISTORY, "tools": [WEATHER, TIME],
                              "tool_choice": "none", "max_tokens": 1}))
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["choices"][0]["message"]["tool_calls"] == []


def test_auto_needs_the_server_flags(tiny_base) -> None:
    """Without --enable-auto-tool-choice, "auto" (the default with tools) is vLLM's 400; the
    server still serves a named function (constrained, so valid even from random weights)."""
    said = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    for extra in ({}, {"tool_choice": "auto"}):
        err = _error(_chat(tiny_base, {"messages": ASK, "tools": [WEATHER], "max_tokens": 2,
                                       **extra}))
        assert err["message"] == said and err["param"] == "tool_choice"
    pytest.importorskip("xgrammar")
    enum_only = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]}}}
    r = _ok(_chat(tiny_base, {"messages": ASK, "tools": [enum_only], "max_tokens": 40,
                              "tool_choice": {"type": "function", "function": {"name": "pick"}},
                              "structured_outputs": None}))
    call = r["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "pick"
    if r["choices"][0]["finish_reason"] == "stop":  # random weights may run out of tokens
        assert json.loads(call["arguments"])["x"] in ("a", "b")


def test_flags_in_both_launch_forms_and_their_checks() -> None:
    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.openai.api_server import make_parser
    from modelport.entrypoints.openai.tools import ToolSettings

    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    for args in (build_parser().parse_args(["serve", *flags]), make_parser().parse_args(flags)):
        assert args.enable_auto_tool_choice and args.tool_call_parser == "llama3_json"
    with pytest.raises(SystemExit):  # argparse: not a known parser
        make_parser().parse_args(["--tool-call-parser", "nope"])
    with pytest.raises(ValueError, match="requires --tool-call-parser"):
        ToolSettings(enable_auto_tools=True)
