"""The tool-call parsers beyond hermes / llama3_json (mistral, pythonic, llama4_pythonic,
qwen3_coder, deepseek_v3, granite, phi4_mini_json, internlm), on model outputs in each format, with vLLM's rules:

- non-streaming: the calls, and the content vLLM keeps for that parser;
- streaming: the text cut into every delta split (short samples: every split into up to
  three deltas; longer ones: every cut point and char by char) reassembles to exactly the
  non-streaming answer, each call's name coming before its argument fragments;
- edge cases: no call, a malformed call (plain content), several calls, nested JSON,
  unicode; Mistral's 9-character ids; qwen3_coder's schema-typed values;
- over HTTP: the tiny model driven (by a choice constraint) to write a Mistral call.
"""

from __future__ import annotations

import itertools
import json
import re

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir
from modelport.entrypoints.openai.protocol import ChatCompletionRequest
from modelport.entrypoints.openai.tool_parsers import PARSERS, ToolCallStreamer, get_parser
from modelport.entrypoints.openai.tools import ToolChoiceOutput, ToolSettings, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "temp": {"type": "number"},
                "metric": {"type": "boolean"},
                "opts": {"type": "object"},
                "tags": {"type": "array"},
            },
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, TIME]


def _calls(name: str, text: str, tools: list | None = None) -> tuple[str | None, list]:
    content, calls = get_parser(name, tools).parse(text)
    return content, [(c.name, c.arguments) for c in calls]


def _stream(
    name: str, text: str, cuts: tuple[int, ...] | range, tools: list | None = None
) -> tuple[str, list, int]:
    """Feed the text's prefixes ending at `cuts` (then the whole, final): the content, the
    calls the deltas reassemble to, and how many argument fragments came."""
    streamer = ToolCallStreamer(get_parser(name, tools).scan)
    content, names, args, fragments = "", {}, {}, 0
    ends = [c for c in cuts if 0 < c < len(text)] + [len(text)]
    for end in ends:
        piece, deltas = streamer.feed(text[:end], end == len(text))
        content += piece
        for d in deltas:
            if d.name is not None:
                assert d.index not in names, "a call's name comes once"
                names[d.index] = d.name
            assert d.index in names, "a call's name comes before its arguments"
            if d.arguments:
                args[d.index] = args.get(d.index, "") + d.arguments
                fragments += 1
    return content, [(names[i], args.get(i, "")) for i in sorted(names)], fragments


def _splits(text: str, pieces: int) -> list:
    out: list = [range(1, len(text))]
    for k in range(pieces):
        out += itertools.combinations(range(1, len(text)), k)
    return out


def _check_every_split(
    name: str, text: str, tools: list | None = None, pieces: int = 3
) -> tuple[str | None, list]:
    """Streams of every split of the text into up to `pieces` deltas (and char by char)
    give the non-streaming answer (content None there is "" in a stream)."""
    content, calls = _calls(name, text, tools)
    want = (content or "", calls)
    for cuts in _splits(text, pieces):
        got = _stream(name, text, cuts, tools)[:2]
        assert got == want, (cuts, got, want)
    return content, calls


def _check_content(name: str, text: str) -> None:
    """Text that is not a call: all content, streamed or not. (A stream may already have
    begun a call that then proves malformed: as in vLLM, that cannot be taken back.)"""
    assert _calls(name, text) == (text, [])
    for cuts in _splits(text, 3):
        assert _stream(name, text, cuts)[0] == text, cuts


def test_the_parsers_are_registered_for_the_cli() -> None:
    from modelport.entrypoints.openai.api_server import make_parser

    new = {
        "mistral",
        "pythonic",
        "llama4_pythonic",
        "qwen3_coder",
        "deepseek_v3",
        "granite",
        "phi4_mini_json",
        "internlm",
    }
    assert new <= set(PARSERS)
    for name in sorted(new):
        args = make_parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", name])
        assert args.tool_call_parser == name
        assert ToolSettings(enable_auto_tools=True, tool_call_parser=name).tool_call_parser == name


# ---------------------------------------------------------------- mistral

MISTRAL_ARRAY = (
    'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
    '"opts": {"hourly": [1, 2], "alerts": null}}}, {"name": "get_time", "arguments": '
    '{"tz": "Europe/Paris"}}]'
)


def test_mistral_array_form_keeps_the_content_before_the_calls() -> None:
    content, calls = _check_every_split("mistral", MISTRAL_ARRAY, pieces=2)
    assert content == "Checking."
    assert calls == [
        ("get_weather", '{"city": "Paris", "opts": {"hourly": [1, 2], "alerts": null}}'),
        ("get_time", '{"tz": "Europe/Paris"}'),
    ]
    # the arguments stream as pieces, not whole
    assert _stream("mistral", MISTRAL_ARRAY, range(1, len(MISTRAL_ARRAY)))[2] > 4


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        # v11+: one [TOOL_CALLS]name{...} per call, the arguments as written
        (
            '[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]get_time{"tz": "UTC"}',
            None,
            [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "UTC"}')],
        ),
        # v13 through an HF tokenizer: name[ARGS]{...}; unicode kept
        (
            'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}',
            "Sure.",
            [("get_weather", '{"city": "Zürich"}')],
        ),
        # vLLM returns v11+ calls with broken arguments as calls (the model sees its mistake)
        ("[TOOL_CALLS]get_time{tz: UTC", None, [("get_time", "{tz: UTC")]),
        ("It is sunny.", "It is sunny.", []),
        ('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]\n', None, [("get_time", "{}")]),
    ],
)
def test_mistral_forms(text, content, calls) -> None:
    assert _check_every_split("mistral", text) == (content, calls)


def test_mistral_malformed_array_is_content() -> None:
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": }}]'
    assert _calls("mistral", text) == (text, [])
    assert _calls("mistral", "[TOOL_CALLS]") == (None, [])  # the token alone: no call


def _auto(parser: str, tools: list) -> ToolChoiceOutput:
    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools
    )
    return ToolChoiceOutput(plan_tools(req, ToolSettings(True, parser)))


def test_mistral_call_ids_are_nine_letters_and_digits() -> None:
    msg, reason = _auto("mistral", TOOLS).message(MISTRAL_ARRAY, "stop")
    assert reason == "tool_calls" and msg.content == "Checking."
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "get_time"]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in msg.tool_calls)
    out = _auto("mistral", TOOLS)
    ids = []
    for end in range(1, len(MISTRAL_ARRAY) + 1):
        ids += [d.id for d in out.feed(MISTRAL_ARRAY[:end], end == len(MISTRAL_ARRAY))[1] if d.id]
    assert len(ids) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    # other parsers keep the server's ids
    msg, _ = _auto("granite", TOOLS).message(
        '<|tool_call|>[{"name": "get_time", "arguments": {}}]', "stop"
    )
    assert msg.tool_calls[0].id.startswith("chatcmpl-tool-")


def test_mistral_and_internlm_keep_special_tokens_in_the_text() -> None:
    # vLLM's adjust_request: [TOOL_CALLS] / <|action_start|> are special tokens
    def req(**kw):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)

    for parser, keeps in (("mistral", True), ("internlm", True), ("hermes", False)):
        r = req(tools=TOOLS)
        plan_tools(r, ToolSettings(True, parser))
        assert r.skip_special_tokens is (not keeps), parser
    r = req(tools=TOOLS, tool_choice="none")
    plan_tools(r, ToolSettings(True, "mistral"))
    assert r.skip_special_tokens is True


# ---------------------------------------------------------------- pythonic


def test_pythonic_calls_with_literal_arguments() -> None:
    text = (
        '[get_weather(city="São Paulo", opts={"hourly": [1, 2], "metric": True}, '
        "temp=-2.5, note=None), get_time(tz='UTC')]"
    )
    content, calls = _check_every_split("pythonic", text, pieces=2)
    assert content is None
    assert calls == [
        (
            "get_weather",
            '{"city": "São Paulo", "opts": {"hourly": [1, 2], "metric": true}, '
            '"temp": -2.5, "note": null}',
        ),
        ("get_time", '{"tz": "UTC"}'),
    ]
    # a call streams one complete keyword at a time
    assert _stream("pythonic", text, range(1, len(text)))[2] >= 4


@pytest.mark.parametrize(
    "text",
    [
        "Sure: [get_time(tz='UTC')]",  # must open with "[": all content
        "[get_time('UTC')]",  # positional arguments are not this format
        "[get_time(tz=zone)]",  # not a literal
        "[get_time(tz='UTC')] and then",  # more than the list
        "[get_time(tz='UTC')",  # unfinished
        "[]",
        "[1, 2]",
    ],
)
def test_pythonic_other_text_is_content(text) -> None:
    _check_content("pythonic", text)


def test_pythonic_short_calls_every_split() -> None:
    assert _check_every_split("pythonic", "[f(a=1), g()]") == (
        None,
        [("f", '{"a": 1}'), ("g", "{}")],
    )


def test_llama4_pythonic_drops_its_tags_and_escapes_non_ascii() -> None:
    text = '<|python_start|>[get_weather(city="Zürich", days=2)]<|python_end|>'
    assert _check_every_split("llama4_pythonic", text, pieces=2) == (
        None,
        [("get_weather", '{"city": "Z\\u00fcrich", "days": 2}')],
    )
    assert _calls("llama4_pythonic", "[get_time()]") == (None, [("get_time", "{}")])
    assert _calls("pythonic", '[f(city="Zürich")]') == (None, [("f", '{"city": "Zürich"}')])


# ---------------------------------------------------------------- qwen3_coder

QWEN3_CODER = """I'll check both.
<tool_call>
<function=get_weather>
<parameter=city>
São Paulo
</parameter>
<parameter=days>
3
</parameter>
<parameter=temp>
21.0
</parameter>
<parameter=metric>
True
</parameter>
<parameter=opts>
{"hourly": [1, 2]}
</parameter>
<parameter=tags>
['a', 'b']
</parameter>
<parameter=unknown>
7
</parameter>
</function>
</tool_call>
<tool_call>
<function=get_time>
<parameter=tz>
null
</parameter>
</function>
</tool_call>"""


def test_qwen3_coder_converts_values_by_the_tools_schema() -> None:
    content, calls = _check_every_split("qwen3_coder", QWEN3_CODER, TOOLS, pieces=2)
    assert content == "I'll check both."
    assert calls[0] == (
        "get_weather",
        json.dumps(
            {
                "city": "São Paulo",
                "days": 3,
                "temp": 21,
                "metric": True,
                "opts": {"hourly": [1, 2]},
                "tags": ["a", "b"],
                "unknown": "7",
            },
            ensure_ascii=False,
        ),
    )
    assert calls[1] == ("get_time", '{"tz": null}')
    # without the tools every value is a string
    assert _calls("qwen3_coder", QWEN3_CODER)[1][0][1].startswith(
        '{"city": "São Paulo", "days": "3"'
    )
    # one parameter at a time
    assert _stream("qwen3_coder", QWEN3_CODER, range(1, len(QWEN3_CODER)), TOOLS)[2] >= 8


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            "<tool_call>\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n</function>\n"
            "</tool_call>",
            None,
            [("get_time", '{"tz": "UTC"}')],
        ),
        # no <tool_call> tag, parameters not closed: the function still counts (vLLM)
        ("<function=get_time><parameter=tz>UTC", None, [("get_time", '{"tz": "UTC"}')]),
        ("No tools needed.", "No tools needed.", []),
        # a function without its '>': all content
        (
            "<tool_call><function=get_time</tool_call>",
            "<tool_call><function=get_time</tool_call>",
            [],
        ),
        (
            '<tool_call>{"name": "get_time"}</tool_call>',
            '<tool_call>{"name": "get_time"}</tool_call>',
            [],
        ),
    ],
)
def test_qwen3_coder_edges(text, content, calls) -> None:
    pieces = 3 if len(text) < 60 else 2
    assert _check_every_split("qwen3_coder", text, TOOLS, pieces=pieces) == (content, calls)


def test_qwen3_coder_through_the_tool_choice_output_uses_the_request_tools() -> None:
    msg, reason = _auto("qwen3_coder", TOOLS).message(QWEN3_CODER, "stop")
    assert reason == "tool_calls"
    assert json.loads(msg.tool_calls[0].function.arguments)["days"] == 3


# ---------------------------------------------------------------- deepseek_v3

B, CB, SEP, CE, E = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
)
DEEPSEEK = (
    f"Let me see.{B}{CB}function{SEP}get_weather\n```json\n"
    f'{{"city": "北京", "opts": {{"days": [1, 2]}}}}\n```{CE}\n'
    f'{CB}function{SEP}get_time\n```json\n{{"tz": "Asia/Shanghai"}}\n```{CE}{E}'
)


def test_deepseek_v3_calls_keep_their_arguments_as_written() -> None:
    content, calls = _check_every_split("deepseek_v3", DEEPSEEK, pieces=2)
    assert content == "Let me see."
    assert calls == [
        ("get_weather", '{"city": "北京", "opts": {"days": [1, 2]}}'),
        ("get_time", '{"tz": "Asia/Shanghai"}'),
    ]
    assert _stream("deepseek_v3", DEEPSEEK, range(1, len(DEEPSEEK)))[2] > 4


def test_deepseek_v3_edges() -> None:
    assert _check_every_split("deepseek_v3", "Plain answer.") == ("Plain answer.", [])
    # a call that does not match the format is dropped; the text before stays content
    broken = f"Hm.{B}{CB}function{SEP}get_time\n{{}}{CE}{E}"
    assert _check_every_split("deepseek_v3", broken, pieces=2) == ("Hm.", [])
    short = f"{B}{CB}f{SEP}g\n```json\n{{}}\n```{CE}{E}"
    assert _check_every_split("deepseek_v3", short) == (None, [("g", "{}")])


# ---------------------------------------------------------------- granite


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        (
            '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Zürich", "opts": '
            '{"days": [1]}}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]',
            [
                ("get_weather", '{"city": "Zürich", "opts": {"days": [1]}}'),
                ("get_time", '{"tz": "UTC"}'),
            ],
        ),
        ('<tool_call>[{"name": "get_time", "arguments": {}}]', [("get_time", "{}")]),
        (' \n<|tool_call|> [{"name": "t", "arguments": {}}]\n', [("t", "{}")]),
    ],
)
def test_granite_calls(text, calls) -> None:
    pieces = 3 if len(text) < 60 else 2
    assert _check_every_split("granite", text, pieces=pieces) == (None, calls)


@pytest.mark.parametrize(
    "text",
    [
        'Sure. <|tool_call|>[{"name": "t", "arguments": {}}]',  # must open with the marker
        '<|tool_call|>[{"name": "t"}]',  # no arguments
        '<|tool_call|>[{"name": "t", "arguments": {}}] then',  # more than the array
        "<|tool_call|>[{",  # unfinished
        "Hello!",
    ],
)
def test_granite_other_text_is_content(text) -> None:
    _check_content("granite", text)


# ---------------------------------------------------------------- phi4_mini_json, internlm


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            'functools[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, '
            '{"name": "get_time", "parameters": {"tz": "UTC"}}]',
            None,
            [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("get_time", '{"tz": "UTC"}')],
        ),
        ('functools[{"name": "t", "arguments": {}}]', None, [("t", "{}")]),
        ("Just text.", "Just text.", []),
        ('functools[{"name": "t"}]', 'functools[{"name": "t"}]', []),  # no arguments: content
    ],
)
def test_phi4_mini_json(text, content, calls) -> None:
    pieces = 3 if len(text) < 60 else 2
    assert _check_every_split("phi4_mini_json", text, pieces=pieces) == (content, calls)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            'Let me search.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
            '{"city": "Zürich", "opts": {"days": [1]}}}<|action_end|>',
            "Let me search.",
            [("get_weather", '{"city": "Z\\u00fcrich", "opts": {"days": [1]}}')],
        ),
        (
            '<|action_start|><|plugin|>{"name": "t", "arguments": {}}<|action_end|>',
            None,
            [("t", "{}")],
        ),
        ("Plain.", "Plain.", []),
        (
            "<|action_start|><|plugin|>{oops}<|action_end|>",
            "<|action_start|><|plugin|>{oops}<|action_end|>",
            [],
        ),
    ],
)
def test_internlm(text, content, calls) -> None:
    pieces = 3 if len(text) < 60 else 2
    assert _check_every_split("internlm", text, pieces=pieces) == (content, calls)


# ---------------------------------------------------------------- over HTTP

TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def mistral_base(tmp_path_factory):
    pytest.importorskip("xgrammar")
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("mistraltools") / "tiny")
    (path / "chat_template.jinja").write_text(TEMPLATE)
    log = tmp_path_factory.mktemp("mistralsrv") / "server.log"
    argv = [
        "-m",
        "modelport.entrypoints.cli",
        "serve",
        "--model",
        str(path),
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "8MiB",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "mistral",
    ]
    with serving(argv, log) as url:
        yield url


def test_mistral_over_http(mistral_base) -> None:
    # ASCII: a non-ASCII choice makes the byte-level grammar ~40x slower here (unicode is
    # covered above, on the parsers)
    answer = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Zurich", "days": 2}'
    body = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "max_tokens": 120,
        "structured_outputs": {"choice": [answer]},
    }
    r = httpx.post(f"{mistral_base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"])
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Zurich", "days": 2}'}

    with httpx.stream(
        "POST", f"{mistral_base}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        events = [
            json.loads(ln[6:])
            for ln in s.iter_lines()
            if ln.startswith("data: ") and ln != "data: [DONE]"
        ]
    content, args, names, ids, finish = "", "", [], [], None
    for ev in events:
        for ch in ev["choices"]:
            content += ch["delta"].get("content") or ""
            for tc in ch["delta"].get("tool_calls") or []:
                ids += [tc["id"]] if "id" in tc else []
                names += [tc["function"]["name"]] if "name" in tc["function"] else []
                args += tc["function"].get("arguments") or ""
            finish = ch["finish_reason"] or finish
    assert (content, names, args, finish) == (
        "Sure.",
        ["get_weather"],
        call["function"]["arguments"],
        "tool_calls",
    )
    assert len(ids) == 1 and re.fullmatch(r"[A-Za-z0-9]{9}", ids[0])
