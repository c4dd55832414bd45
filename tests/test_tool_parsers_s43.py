"""The tool-call parsers glm45, kimi_k2, xlam, qwen3_xml, llama4_json, deepseek_v31 and
seed_oss, and the reasoning parsers deepseek_v3, seed_oss and hunyuan_a13b:

- whole-output parses (calls, content kept before them, arguments typed by the schema);
- streams cut into random small chunks (and char by char) reassemble to exactly the
  non-streaming answer, each call's name before its argument pieces, no marker in content;
- malformed or cut-off output: no crash, its text kept as content;
- over HTTP: the tiny model driven (by a choice constraint) to think in Hunyuan's tags and
  answer with a GLM-4.5 call, streamed and not.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir, tiny_tokenizer
from modelport.engine.structured_output import REASONING_TAGS, ReasoningEnd
from modelport.entrypoints.openai.protocol import ChatCompletionRequest
from modelport.entrypoints.openai.reasoning import (
    REASONING_PARSERS,
    ReasoningPlan,
    ReasoningStreamer,
    get_reasoning_parser,
    think_token_ids,
)
from modelport.entrypoints.openai.tool_parsers import PARSERS, ToolCallStreamer, get_parser
from modelport.entrypoints.openai.tools import ToolChoiceOutput, ToolSettings, plan_tools
from test_tool_parsers_more import _calls
from test_tool_parsers_more import _stream as _stream_fragments

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "opts": {"type": "object"},
                "zip": {"type": "string"},
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

NEW_TOOL_PARSERS = ("glm45", "kimi_k2", "xlam", "qwen3_xml", "llama4_json", "deepseek_v31",
                    "seed_oss")
NEW_REASONING_PARSERS = ("deepseek_v3", "seed_oss", "hunyuan_a13b")


def _parse(name: str, text: str, tools: list | None = TOOLS) -> tuple[str | None, list]:
    return _calls(name, text, tools)


def _cuts(text: str, rng: random.Random) -> list[int]:
    """Random small chunks (1 to 6 characters), as a stream's deltas."""
    cuts, at = [], 0
    while at < len(text):
        at += rng.randint(1, 6)
        cuts.append(min(at, len(text)))
    return cuts


def _stream(name: str, text: str, cuts, tools: list | None = TOOLS) -> tuple[str, list]:
    """The content and calls a stream cut at `cuts` reassembles to (test_tool_parsers_more's
    streamer loop)."""
    content, calls, _ = _stream_fragments(name, text, sorted(set(cuts)), tools)
    return content, calls


def _check(name: str, text: str, tools: list | None = TOOLS, splits: int = 40):
    """The non-streaming answer; streams in random chunks and char by char give the same."""
    content, calls = _parse(name, text, tools)
    want = (content or "", calls)
    rng = random.Random(f"{name}:{text}")
    for cuts in [range(1, len(text)), *(_cuts(text, rng) for _ in range(splits))]:
        assert _stream(name, text, cuts, tools) == want, cuts
    return content, calls


def _check_content(name: str, text: str) -> None:
    """Malformed or cut-off: no call, all of the text content (streamed or not)."""
    assert _parse(name, text) == (text, [])
    rng = random.Random(text)
    for cuts in [range(1, len(text)), *(_cuts(text, rng) for _ in range(20))]:
        assert _stream(name, text, cuts)[0] == text, cuts


def _auto(parser: str) -> ToolChoiceOutput:
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                tools=TOOLS)
    return ToolChoiceOutput(plan_tools(req, ToolSettings(True, parser)))


def test_the_new_parsers_are_cli_choices() -> None:
    from modelport.engine.arg_utils import EngineArgs
    from modelport.entrypoints.openai.api_server import make_parser

    assert set(NEW_TOOL_PARSERS) <= set(PARSERS)
    for name in NEW_TOOL_PARSERS:
        args = make_parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", name])
        assert args.tool_call_parser == name
    assert set(NEW_REASONING_PARSERS) <= set(REASONING_PARSERS) <= set(REASONING_TAGS)
    for name in NEW_REASONING_PARSERS:
        assert make_parser().parse_args(["--reasoning-parser", name]).reasoning_parser == name
        assert EngineArgs(reasoning_parser=name)._resolve_structured_outputs() == (name, False)


# ---------------------------------------------------------------- glm45

GLM = (
    "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo"
    "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>metric"
    "</arg_key>\n<arg_value>true</arg_value>\n<arg_key>opts</arg_key>\n<arg_value>"
    '{"hourly": [1, 2]}</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>01234</arg_value>\n'
    "<arg_key>note</arg_key>\n<arg_value>not json</arg_value>\n</tool_call>\n"
    "<tool_call>get_time\n<arg_key>tz</arg_key>\n<arg_value>UTC</arg_value>\n</tool_call>"
)


def test_glm45_types_values_by_the_schema_and_keeps_the_text_before() -> None:
    content, calls = _check("glm45", GLM)
    assert content == "Let me check."
    assert [n for n, _ in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0][1]) == {
        "city": "São Paulo", "days": 3, "metric": True, "opts": {"hourly": [1, 2]},
        "zip": "01234",  # a string by the schema, though it reads as JSON
        "note": "not json",  # not in the schema, not JSON: the text
    }
    assert calls[1] == ("get_time", '{"tz": "UTC"}')
    # without the tools, JSON values are decoded all the same ("01234" is not JSON)
    untyped = json.loads(_parse("glm45", GLM, None)[1][0][1])
    assert (untyped["days"], untyped["metric"], untyped["zip"]) == (3, True, "01234")
    typed_zip = GLM.replace("01234", "1234")
    assert json.loads(_parse("glm45", typed_zip)[1][0][1])["zip"] == "1234"
    assert json.loads(_parse("glm45", typed_zip, None)[1][0][1])["zip"] == 1234
    # the arguments stream one pair at a time
    pieces = []
    streamer = ToolCallStreamer(get_parser("glm45", TOOLS).scan)
    for end in range(1, len(GLM) + 1):
        pieces += [d.arguments for d in streamer.feed(GLM[:end], end == len(GLM))[1]
                   if d.arguments]
    assert len(pieces) >= 8


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("<tool_call>get_time</tool_call>", None, [("get_time", "{}")]),
        # text after a call is content too
        ("<tool_call>get_time\n</tool_call>\nDone.", "\nDone.", [("get_time", "{}")]),
        # cut off after its last pair: still a call
        ("<tool_call>get_time\n<arg_key>tz</arg_key><arg_value>UTC</arg_value>\n", None,
         [("get_time", '{"tz": "UTC"}')]),
    ],
)
def test_glm45_edges(text, content, calls) -> None:
    assert _check("glm45", text) == (content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed.",
        "<tool_call>get_time\n<arg_key>tz</arg_key><arg_value>UTC",  # cut off in a value
        "<tool_call>\n</tool_call>",  # no name
        "<tool_call>get_time\nstray text</tool_call>",
        "<tool_call>get_time\n<arg_key>tz</arg_key>oops</tool_call>",
        '<tool_call>{"name": "get_time"}</tool_call>',  # hermes' format is not this one
    ],
)
def test_glm45_malformed_is_content(text) -> None:
    _check_content("glm45", text)


def test_glm45_a_broken_block_stays_content_between_good_ones() -> None:
    text = ("<tool_call>get_time\n</tool_call><tool_call>\n</tool_call>"
            "<tool_call>get_time\n</tool_call>")
    assert _check("glm45", text) == ("<tool_call>\n</tool_call>",
                                     [("get_time", "{}"), ("get_time", "{}")])


# ---------------------------------------------------------------- kimi_k2

KS, KB, KA, KE, KSE = (
    "<|tool_calls_section_begin|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|tool_calls_section_end|>",
)
KIMI = (
    f"I'll look.{KS}{KB}functions.get_weather:0{KA}"
    f'{{"city": "北京", "opts": {{"days": [1, 2]}}}}{KE}'
    f'{KB}functions.get_time:1{KA}{{"tz": "UTC"}}{KE}{KSE}'
)


def test_kimi_k2_calls_with_their_ids() -> None:
    assert _check("kimi_k2", KIMI) == ("I'll look.", [
        ("get_weather", '{"city": "北京", "opts": {"days": [1, 2]}}'),
        ("get_time", '{"tz": "UTC"}'),
    ])
    msg, reason = _auto("kimi_k2").message(KIMI, "stop")
    assert reason == "tool_calls" and msg.content == "I'll look."
    assert [c.id for c in msg.tool_calls] == ["functions.get_weather:0", "functions.get_time:1"]
    out, ids = _auto("kimi_k2"), []
    for end in range(1, len(KIMI) + 1):
        ids += [d.id for d in out.feed(KIMI[:end], end == len(KIMI))[1] if d.id]
    assert ids == ["functions.get_weather:0", "functions.get_time:1"]
    # its markers are special tokens: the text keeps them
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                tools=TOOLS)
    plan_tools(req, ToolSettings(True, "kimi_k2"))
    assert req.skip_special_tokens is False


def test_kimi_k2_edges() -> None:
    # a call cut off before its end marker is not one; the text before stays (as a stream,
    # which had begun the call, sends it)
    cut = f"Hm.{KS}{KB}functions.get_time:0{KA}{{\"tz\""
    assert _parse("kimi_k2", cut) == ("Hm.", [])
    assert _stream("kimi_k2", cut, range(1, len(cut)))[0] == "Hm."
    assert _check("kimi_k2", "Plain text, no calls.") == ("Plain text, no calls.", [])
    # the singular section marker, whitespace around the arguments
    text = f"<|tool_call_section_begin|>{KB}functions.get_time:3{KA} {{}} {KE}{KSE}"
    assert _check("kimi_k2", text) == (None, [("get_time", "{}")])


# ---------------------------------------------------------------- deepseek_v31

DB, DCB, DSEP, DCE, DE = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
)
DSV31 = (
    f'Let me see.{DB}{DCB}get_weather{DSEP}{{"city": "Zürich", "opts": {{"days": [1]}}}}{DCE}'
    f'{DCB}get_time{DSEP}{{"tz": "Europe/Zurich"}}{DCE}{DE}'
)


def test_deepseek_v31_calls() -> None:
    assert _check("deepseek_v31", DSV31) == ("Let me see.", [
        ("get_weather", '{"city": "Zürich", "opts": {"days": [1]}}'),
        ("get_time", '{"tz": "Europe/Zurich"}'),
    ])
    assert _check("deepseek_v31", f"{DB}{DCB}get_time{DSEP}{{}}{DCE}{DE}") == (
        None, [("get_time", "{}")])


def test_deepseek_v31_edges() -> None:
    _check_content("deepseek_v31", "Just an answer.")
    # cut off inside the arguments: no call, the text before is the content
    assert _parse("deepseek_v31", f'Hm.{DB}{DCB}get_time{DSEP}{{"tz": ') == ("Hm.", [])
    # V3's form (a type, a fence) is not V3.1's: the name is read as written
    v3 = f"{DB}{DCB}function{DSEP}get_time\n```json\n{{}}\n```{DCE}{DE}"
    assert _parse("deepseek_v31", v3)[1] == [("function", "get_time\n```json\n{}\n```")]


# ---------------------------------------------------------------- xlam


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
         '{"name": "get_time", "arguments": {"tz": "UTC"}}]', None,
         [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"tz": "UTC"}')]),
        ('Sure.\n```json\n[{"name": "get_time", "arguments": {"tz": "UTC"}}]\n```', "Sure.",
         [("get_time", '{"tz": "UTC"}')]),
        ('```\n[{"name": "get_time", "arguments": {}}]\n```\nThat is all.', "\nThat is all.",
         [("get_time", "{}")]),
        ('Ok.[TOOL_CALLS][{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]', "Ok.",
         [("get_time", '{"tz": "UTC"}')]),
        ('<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>', None,
         [("get_time", "{}")]),
        # a code block that is not calls stays content; the calls after it are found
        ('```python\nprint(1)\n```\n[TOOL_CALLS][{"name": "get_time", "arguments": {}}]',
         "```python\nprint(1)\n```", [("get_time", "{}")]),
    ],
)
def test_xlam_forms(text, content, calls) -> None:
    assert _check("xlam", text) == (content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny.",
        "[1, 2, 3]",
        '[{"name": "get_time"}]',  # no arguments
        '[{"name": "get_time", "arguments": {"tz": "UTC"}}',  # never closed
        '```json\n{"name": "get_time", "arguments": {}}\n```',  # not a list
        "[TOOL_CALLS] nothing",
        "[]",
    ],
)
def test_xlam_other_text_is_content(text) -> None:
    _check_content("xlam", text)


# ---------------------------------------------------------------- qwen3_xml, seed_oss

XML_CALL = (
    "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n4\n"
    "</parameter>\n<parameter=metric>\nfalse\n</parameter>\n</function>\n"
)


def test_qwen3_xml_is_qwen3_coders_format() -> None:
    text = f"Checking.\n<tool_call>\n{XML_CALL}</tool_call>"
    got = _check("qwen3_xml", text)
    assert got == ("Checking.", [("get_weather", '{"city": "Paris", "days": 4, "metric": false}')])
    assert got == _parse("qwen3_coder", text)


def test_seed_oss_calls() -> None:
    text = (f"Let me look.<seed:tool_call>\n{XML_CALL}</seed:tool_call>"
            "<seed:tool_call><function=get_time><parameter=tz>UTC</parameter></function>"
            "</seed:tool_call>")
    assert _check("seed_oss", text) == ("Let me look.", [
        ("get_weather", '{"city": "Paris", "days": 4, "metric": false}'),
        ("get_time", '{"tz": "UTC"}'),
    ])
    _check_content("seed_oss", "No call here.")
    broken = "<seed:tool_call><function=get_time</seed:tool_call>"
    _check_content("seed_oss", broken)


def test_llama4_json_is_llama3_json() -> None:
    text = '{"name": "get_time", "parameters": {"tz": "UTC"}}'
    assert _check("llama4_json", text) == (None, [("get_time", '{"tz": "UTC"}')])
    assert _check("llama4_json", "Hello!") == ("Hello!", [])


# ---------------------------------------------------------------- reasoning


def _plan(name: str, kwargs: dict | None = None, prompt: str | None = None) -> ReasoningPlan:
    return ReasoningPlan.for_request(get_reasoning_parser(name, kwargs), prompt, True)


def _check_reasoning(plan: ReasoningPlan, text: str) -> tuple[str | None, str | None]:
    reasoning, content = plan.extract(text)
    rng = random.Random(text)
    for cuts in [range(1, len(text)), *(_cuts(text, rng) for _ in range(30))]:
        streamer, got_r, got_c = ReasoningStreamer(plan), "", ""
        for end in sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]:
            fresh, so_far = streamer.feed(text[:end], end == len(text))
            assert so_far.startswith(got_c), "content only grows"
            got_r, got_c = got_r + fresh, so_far
        assert (got_r, got_c) == (reasoning or "", content or ""), cuts
    return reasoning, content


def test_deepseek_v3_reasons_only_when_thinking_is_on() -> None:
    text = "2 and 2 make 4.</think>The answer is 4."
    assert _check_reasoning(_plan("deepseek_v3"), text) == (None, text)
    assert _check_reasoning(_plan("deepseek_v3", {"thinking": False}), text) == (None, text)
    on = _plan("deepseek_v3", {"thinking": True})
    assert _check_reasoning(on, text) == ("2 and 2 make 4.", "The answer is 4.")
    assert _check_reasoning(on, "<think>a</think>b") == ("a", "b")
    assert _check_reasoning(on, "still thinking") == ("still thinking", None)


def test_seed_oss_reasoning() -> None:
    plan = _plan("seed_oss")
    assert _check_reasoning(plan, "<seed:think>2+2=4</seed:think>It is 4.") == ("2+2=4", "It is 4.")
    assert _check_reasoning(plan, "in the prompt's think</seed:think>4") == (
        "in the prompt's think", "4")
    assert _check_reasoning(plan, "<seed:think>cut off") == ("cut off", None)
    # <think> is not Seed's tag; a prompt that closed the thinking leaves all content
    assert _check_reasoning(plan, "<think>x</think>y") == ("<think>x</think>y", None)
    closed = _plan("seed_oss", prompt="<seed:think>x</seed:think>")
    assert closed.extract("a</seed:think>b") == (None, "a</seed:think>b")
    vocab = {"<seed:think>": 3, "</seed:think>": 4}
    assert ReasoningEnd.from_vocab("seed_oss", vocab) == ReasoningEnd(3, 4)
    with pytest.raises(RuntimeError, match="could not locate think start/end tokens"):
        think_token_ids("seed_oss", tiny_tokenizer())


HUNYUAN = "<think>\n2 and 2 make 4.\n</think>\n<answer>\nThe answer is 4.\n</answer>"


def test_hunyuan_a13b_content_is_the_answer_body() -> None:
    plan = _plan("hunyuan_a13b")
    assert _check_reasoning(plan, HUNYUAN) == ("2 and 2 make 4.", "The answer is 4.")
    assert _check_reasoning(plan, "<answer>\nFast.\n</answer>") == (None, "Fast.")
    assert _check_reasoning(plan, "No tags at all.") == (None, "No tags at all.")
    assert _check_reasoning(plan, "<think>\ncut off") == ("cut off", None)
    assert _check_reasoning(plan, "<think>\na\n</think>\n<answer>\nb") == ("a", "b")
    assert _check_reasoning(plan, "<think>x</think>plain") == ("x", "plain")
    # multi-token tags: no token ids needed, the grammar is not held back
    assert think_token_ids("hunyuan_a13b", tiny_tokenizer()) == (-1, -1)
    assert ReasoningEnd.from_vocab("hunyuan_a13b", {}) is None


# ---------------------------------------------------------------- over HTTP

ANSWER = (
    "<think>\nhm\n</think>\n<answer>\nSure.<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
    "</tool_call>\n</answer>"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("xgrammar")
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("s43") / "tiny")
    log = tmp_path_factory.mktemp("s43srv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(path),
            "--max-model-len", "512", "--kv-cache-memory", "8MiB",
            "--enable-auto-tool-choice", "--tool-call-parser", "glm45",
            "--reasoning-parser", "hunyuan_a13b"]
    with serving(argv, log) as url:
        yield url


def test_glm45_call_after_hunyuan_reasoning_over_http(base) -> None:
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
            "max_tokens": 260, "structured_outputs": {"choice": [ANSWER]}}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert (msg["reasoning"], msg["content"]) == ("hm", "Sure.")
    (call,) = msg["tool_calls"]
    # "days" is an integer by the schema, "city" a string
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}

    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines()
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
    reasoning = content = args = ""
    names, finish = [], None
    for ev in events:
        for ch in ev["choices"]:
            reasoning += ch["delta"].get("reasoning") or ""
            content += ch["delta"].get("content") or ""
            for tc in ch["delta"].get("tool_calls") or []:
                names += [tc["function"]["name"]] if "name" in tc["function"] else []
                args += tc["function"].get("arguments") or ""
            finish = ch["finish_reason"] or finish
    assert (reasoning, content, names, args, finish) == (
        "hm", "Sure.", ["get_weather"], call["function"]["arguments"], "tool_calls")
