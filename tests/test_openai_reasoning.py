"""Reasoning outputs (`--reasoning-parser deepseek_r1|qwen3`), as vLLM serves them.

- The parsers on crafted text: reasoning and content of a finished answer (missing start
  tag, no end tag, thinking off, a prompt that already ended the thinking), and stream
  increments, with the tags split over many small deltas, that reassemble to the
  non-streaming answer.
- Over HTTP on a tiny Llama built here, with a byte-level tokenizer to which `<think>` and
  `</think>` are added as single tokens (vLLM refuses to start a think-tag reasoning parser
  on a tokenizer without them; so does this server, checked on the plain tiny tokenizer):
  a choice constraint makes the model write an exact `<think>...</think>` answer (the tags
  as one token each or byte by byte; the servers run with vLLM's
  `--structured-outputs-config '{"enable_in_reasoning": true}'`, so the grammar constrains
  the thinking too: by default it starts after `</think>`, see
  test_reasoning_structured.py), so the split is checked end to end (non-streaming,
  streaming, n > 1, include_reasoning false, with a hermes tool call after the thinking);
  an unconstrained answer with no end tag is all reasoning; qwen3's enable_thinking: false
  reaches the template and makes the answer content, also as the server's
  --default-chat-template-kwargs; usage counts reasoning_tokens as vLLM does.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import TINY_VOCAB, make_tiny_llama_dir, tiny_tokenizer
from modelport.entrypoints.openai.reasoning import (
    ReasoningPlan,
    ReasoningStreamer,
    get_reasoning_parser,
    prompt_ends_reasoning,
    think_token_ids,
)

# ---------------------------------------------------------------- parsers, on crafted text


def _plan(name: str = "deepseek_r1", prompt: str | None = None, **template_kw) -> ReasoningPlan:
    return ReasoningPlan.for_request(get_reasoning_parser(name, template_kw), prompt, True)


def _stream(plan: ReasoningPlan, pieces: list[str]) -> tuple[str | None, str]:
    """Feed the text piece by piece; (reasoning, content) sent, None when none was."""
    s = ReasoningStreamer(plan)
    text, reasoning, content_seen = "", None, ""
    for i, piece in enumerate(pieces):
        text += piece
        r, content = s.feed(text, i == len(pieces) - 1)
        assert content.startswith(content_seen), "content only grows"
        content_seen = content
        if r:
            reasoning = (reasoning or "") + r
    return reasoning, content_seen


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])  # the tag-in-prompt parsers
@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>Two and two make four.</think>The answer is 4.",
     "Two and two make four.", "The answer is 4."),
    # the opening tag was in the prompt (DeepSeek-R1's template): only the end is generated
    ("Two and two make four.</think>\n\nThe answer is 4.",
     "Two and two make four.", "\n\nThe answer is 4."),
    # no end tag: all of it is reasoning (the thinking was cut off)
    ("<think>Let me think about", "Let me think about", None),
    ("Let me think about", "Let me think about", None),
    # nothing after the thinking: content is null
    ("<think>done</think>", "done", None),
    ("\n<think>x</think>y", "x", "y"),
    ("</think>only content", "", "only content"),
    # a second </think> is content
    ("a</think>b</think>c", "a", "b</think>c"),
])
def test_non_streaming_split(name, text, reasoning, content) -> None:
    assert _plan(name).extract(text) == (reasoning, content)


TEXTS = [
    "<think>Two and two make four.</think>The answer is 4.",
    "Two and two.</think>\n\nThe answer is 4.",
    "  <think>\nstill thinking, no end",
    "no tags at all </thi",
    "<thin",
    "<think></think>",
    "a < b and c </ d </think> e </think",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("how", ["bytes", "random", "whole"])
def test_stream_increments_reassemble_to_the_non_streaming_answer(text, how) -> None:
    plan = _plan()
    pieces = {"bytes": list(text), "whole": [text],
              "random": _chunks(text, random.Random(len(text)))}[how]
    reasoning, content = _stream(plan, pieces)
    want_reasoning, want_content = plan.extract(text)
    assert (reasoning or "") == (want_reasoning or "")
    assert content == (want_content or "")


def test_a_tag_that_may_be_arriving_is_held_back() -> None:
    s = ReasoningStreamer(_plan())
    assert s.feed("<thi", False) == ("", "")
    assert s.feed("<think>Hmm </thi", False) == ("Hmm ", "")
    assert s.feed("<think>Hmm </think", False) == ("", "")
    assert s.feed("<think>Hmm </think>O", False) == ("", "O")
    assert s.feed("<think>Hmm </think>OK", True) == ("", "OK")
    # a partial end tag that never completes is reasoning after all
    s = ReasoningStreamer(_plan())
    assert s.feed("abc </thi", False) == ("abc ", "")
    assert s.feed("abc </thi", True) == ("</thi", "")


def test_qwen3_enable_thinking_false_makes_it_all_content() -> None:
    off = _plan("qwen3", enable_thinking=False)
    assert off.extract("<think>x</think>y") == (None, "<think>x</think>y")
    assert off.extract("plain answer") == (None, "plain answer")
    assert _stream(off, list("plain answer")) == (None, "plain answer")
    # deepseek_r1 has no such switch; qwen3 thinks by default
    assert _plan("deepseek_r1", enable_thinking=False).extract("a</think>b") == ("a", "b")
    assert _plan("qwen3").extract("a</think>b") == ("a", "b")
    assert _plan("qwen3").extract("no end") == ("no end", None)


def test_a_prompt_that_ended_the_thinking_leaves_content() -> None:
    assert prompt_ends_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_ends_reasoning("<|im_start|>assistant\n")
    assert not prompt_ends_reasoning(None)
    plan = _plan(prompt="assistant\n<think>\n\n</think>\n\n")
    assert plan.extract("The answer.") == (None, "The answer.")
    assert _plan(prompt="assistant\n<think>\n").extract("hmm</think>ok") == ("hmm", "ok")


def test_unknown_parser_is_named() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, deepseek_v3, glm45, granite, "
                       "hunyuan_a13b, mistral, qwen3, seed_oss"):
        get_reasoning_parser("nemotron")


S, E = 1000, 1001  # the think tags' ids


@pytest.mark.parametrize(("ids", "r1", "qwen3"), [
    ([S, 1, 2, 3, E, 4, 5], 3, 3),
    ([1, 2, E, 4], 2, 0),  # opening tag in the prompt: R1 counts up to the end tag
    ([1, 2, 3], 0, 0),  # no end tag (thinking cut off, or none): vLLM counts none
    ([S, 1, 2], 2, 2),
    ([E, 1, S, 2, E, E, 3], 1, 1),  # a stray end tag does not count below zero
    ([], 0, 0),
])
def test_reasoning_tokens_are_counted_as_vllm_does(ids, r1, qwen3) -> None:
    assert get_reasoning_parser("deepseek_r1").count_reasoning_tokens(ids, S, E) == r1
    assert get_reasoning_parser("qwen3").count_reasoning_tokens(ids, S, E) == qwen3


def test_think_tags_must_be_single_tokens() -> None:
    tok = tiny_tokenizer()  # byte level: "<think>" is 7 tokens
    for name, cls in (("deepseek_r1", "DeepSeekR1"), ("qwen3", "Qwen3")):
        with pytest.raises(RuntimeError, match=f"^{cls}ReasoningParser reasoning parser could "
                           "not locate think start/end tokens in the tokenizer!$"):
            think_token_ids(name, tok)
    tok.hf.add_tokens(["<think>", "</think>"])
    assert think_token_ids("qwen3", tok) == (TINY_VOCAB, TINY_VOCAB + 1)


# ---------------------------------------------------------------- over HTTP

# Qwen3's switch: enable_thinking false closes an empty thinking block in the prompt
THINK_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "What is two and two?"}]
THOUGHT, ANSWER = "Two and two make four.", "The answer is 4."
FORCED = f"<think>{THOUGHT}</think>{ANSWER}"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


THINK_IDS = {"<think>": TINY_VOCAB, "</think>": TINY_VOCAB + 1}
# the tags' tokens over their bytes, so a constrained answer writes each tag as one token
TAGS_AS_TOKENS = {"logit_bias": {str(i): 100 for i in THINK_IDS.values()}}
# the grammar constrains the thinking too, so a choice can write it (vLLM's setting)
IN_REASONING = ("--structured-outputs-config", '{"enable_in_reasoning": true}')


@pytest.fixture(scope="module")
def think_model(tmp_path_factory):
    """The tiny Llama with the think tags added to its tokenizer as single (non-special)
    tokens, as reasoning models have them (vLLM needs them)."""
    pytest.importorskip("xgrammar")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    path = make_tiny_llama_dir(tmp_path_factory.mktemp("think") / "tiny",
                               vocab_size=TINY_VOCAB + len(THINK_IDS))
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_IDS])
    assert tok.convert_tokens_to_ids(list(THINK_IDS)) == list(THINK_IDS.values())
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(THINK_TEMPLATE)
    return path


def _server(model, tmp_path_factory, *flags: str):
    log = tmp_path_factory.mktemp("reasoningsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model),
            "--max-model-len", "512", "--kv-cache-memory", "16MiB", *flags]
    return serving(argv, log)


@pytest.fixture(scope="module")
def r1(think_model, tmp_path_factory):
    with _server(think_model, tmp_path_factory, "--reasoning-parser", "deepseek_r1",
                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 *IN_REASONING) as url:
        yield url


@pytest.fixture(scope="module")
def qwen3(think_model, tmp_path_factory):
    # the api_server module's launch form
    log = tmp_path_factory.mktemp("qwen3srv") / "server.log"
    argv = ["-m", "modelport.entrypoints.openai.api_server", "--model", str(think_model),
            "--max-model-len", "512", "--kv-cache-memory", "16MiB",
            "--reasoning-parser", "qwen3", *IN_REASONING]
    with serving(argv, log) as url:
        yield url


def _chat(base: str, body: dict) -> dict:
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def _events(base: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{base}/v1/chat/completions",
                      json={"messages": ASK, **body, "stream": True}, timeout=180) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _reassemble(events: list[dict]) -> dict[int, dict]:
    """Per choice: reasoning, content, calls, finish_reason, and how many deltas carried
    reasoning."""
    out: dict[int, dict] = {}
    for ev in events:
        assert "error" not in ev, ev
        for ch in ev["choices"]:
            c = out.setdefault(ch["index"], {"reasoning": None, "content": "", "calls": [],
                                             "finish": None, "reasoning_deltas": 0})
            delta = ch["delta"]
            assert "reasoning_content" not in delta  # removed from vLLM: not sent
            if "reasoning" in delta:
                assert delta["reasoning"], "no empty reasoning deltas"
                c["reasoning"] = (c["reasoning"] or "") + delta["reasoning"]
                c["reasoning_deltas"] += 1
            c["content"] += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:  # a call streams in pieces (by index)
                if "id" in tc:
                    c["calls"].append({"function": {"name": tc["function"]["name"],
                                                    "arguments": ""}})
                c["calls"][tc["index"]]["function"]["arguments"] += (
                    tc["function"].get("arguments") or "")
            if ch["finish_reason"] is not None:
                c["finish"] = ch["finish_reason"]
    return out


def test_forced_thinking_is_split_from_the_content(r1) -> None:
    body = {"max_tokens": 120, "structured_outputs": {"choice": [FORCED]}}
    choice = _chat(r1, body)["choices"][0]
    assert choice["message"]["reasoning"] == THOUGHT
    assert choice["message"]["content"] == ANSWER
    assert "reasoning_content" not in choice["message"]
    assert choice["finish_reason"] == "stop"

    (got,) = _reassemble(_events(r1, body)).values()
    assert (got["reasoning"], got["content"], got["finish"]) == (THOUGHT, ANSWER, "stop")
    # one byte a token: the thinking came in many deltas, its tags split over several
    assert got["reasoning_deltas"] > 5


def test_n_choices_are_split_each(r1) -> None:
    body = {"max_tokens": 120, "n": 3, "temperature": 1.0,
            "structured_outputs": {"choice": [FORCED, f"{THOUGHT}</think>Four."]}}
    choices = _chat(r1, body)["choices"]
    assert len(choices) == 3
    for c in choices:
        assert c["message"]["reasoning"] == THOUGHT
        assert c["message"]["content"] in (ANSWER, "Four.")
    streamed = _reassemble(_events(r1, body))
    assert sorted(streamed) == [0, 1, 2]
    for c in streamed.values():
        assert c["reasoning"] == THOUGHT and c["content"] in (ANSWER, "Four.")


def test_missing_start_tag_still_splits(r1) -> None:
    body = {"max_tokens": 120, "structured_outputs": {"regex": r"Hmm, four\.</think>Four\."}}
    msg = _chat(r1, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == ("Hmm, four.", "Four.")
    (got,) = _reassemble(_events(r1, body)).values()
    assert (got["reasoning"], got["content"]) == ("Hmm, four.", "Four.")


def test_include_reasoning_false_drops_it(r1) -> None:
    body = {"max_tokens": 120, "structured_outputs": {"choice": [FORCED]},
            "include_reasoning": False, "logprobs": True, "top_logprobs": 2}
    choice = _chat(r1, body)["choices"][0]
    assert choice["message"]["reasoning"] is None
    assert choice["message"]["content"] == ANSWER
    assert choice["logprobs"] is None  # vLLM: the tokens would show the reasoning
    events = _events(r1, body)
    (got,) = _reassemble(events).values()
    assert got["reasoning"] is None and got["content"] == ANSWER
    assert all(ch["logprobs"] is None for ev in events for ch in ev["choices"])


def test_no_end_tag_is_all_reasoning_and_completions_are_unaffected(r1) -> None:
    """An unconstrained answer of the random model (no </think> in it): all reasoning. The
    same prompt on /v1/completions gives the raw text, with no reasoning field."""
    ids = httpx.post(f"{r1}/tokenize", json={"messages": ASK}).json()["tokens"]
    comp = httpx.post(f"{r1}/v1/completions", json={
        "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True}, timeout=180)
    assert comp.status_code == 200, comp.text
    raw = comp.json()["choices"][0]
    assert "reasoning" not in raw
    raw = raw["text"]
    assert "</think>" not in raw and not raw.lstrip().startswith("<think>")
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    msg = _chat(r1, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == (raw, None)
    (got,) = _reassemble(_events(r1, body)).values()
    assert (got["reasoning"], got["content"]) == (raw, "")
    assert httpx.get(f"{r1}/v1/models").json()["data"][0]["object"] == "model"


def test_a_constrained_answer_is_split_as_any_other(r1, qwen3) -> None:
    """As vLLM: the parser splits a constrained answer too (here the grammar, constraining
    the thinking as well, wrote no </think>: all reasoning); with the thinking off in the
    prompt it is all content."""
    body = {"max_tokens": 10, "structured_outputs": {"choice": ["yes", "no"]}}
    msg = _chat(r1, body)["choices"][0]["message"]
    assert msg["reasoning"] in ("yes", "no") and msg["content"] is None
    msg = _chat(qwen3, {**body, "chat_template_kwargs": {"enable_thinking": False}}
                )["choices"][0]["message"]
    assert msg["reasoning"] is None and msg["content"] in ("yes", "no")


def test_tool_parser_sees_only_the_content(r1) -> None:
    # the thinking mentions a call: it is reasoning, not a call
    thought = 'I could write <tool_call>{"name": "get_weather"}</tool_call> now.'
    body = {"max_tokens": 250, "tools": [WEATHER],
            "structured_outputs": {"choice": [f"<think>{thought}</think>{CALL}"]}}
    choice = _chat(r1, body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning"] == thought
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    (got,) = _reassemble(_events(r1, body)).values()
    assert got["reasoning"] == thought and got["content"] == ""
    assert got["finish"] == "tool_calls"
    assert [c["function"]["name"] for c in got["calls"]] == ["get_weather"]


def test_qwen3_enable_thinking_false_reaches_the_template(qwen3) -> None:
    kw = {"chat_template_kwargs": {"enable_thinking": False}}
    ids = httpx.post(f"{qwen3}/tokenize", json={"messages": ASK, **kw}).json()["tokens"]
    prompt = httpx.post(f"{qwen3}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt.endswith("assistant\n<think>\n\n</think>\n\n")
    comp = httpx.post(f"{qwen3}/v1/completions", json={
        "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}, timeout=180)
    raw = comp.json()["choices"][0]["text"]
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}
    msg = _chat(qwen3, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == (None, raw)
    (got,) = _reassemble(_events(qwen3, body)).values()
    assert (got["reasoning"], got["content"]) == (None, raw)


def test_qwen3_thinks_by_default(qwen3) -> None:
    body = {"max_tokens": 120, "structured_outputs": {"choice": [FORCED]}}
    msg = _chat(qwen3, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == (THOUGHT, ANSWER)
    (got,) = _reassemble(_events(qwen3, body)).values()
    assert (got["reasoning"], got["content"]) == (THOUGHT, ANSWER)


@pytest.mark.parametrize("form", ["serve", "api_server"])
def test_reasoning_parser_flag_in_both_launch_forms(form) -> None:
    from modelport.entrypoints.cli import build_parser
    from modelport.entrypoints.openai.api_server import make_parser

    def parse(*argv: str):
        if form == "serve":
            return build_parser().parse_args(["serve", *argv])
        return make_parser().parse_args(list(argv))

    assert parse("--reasoning-parser", "qwen3").reasoning_parser == "qwen3"
    assert parse().reasoning_parser is None
    with pytest.raises(SystemExit):
        parse("--reasoning-parser", "nemotron")


# ---------------------------------------------------------------- usage, defaults, refusal


def _final_usage(events: list[dict]) -> dict:
    assert events[-1]["choices"] == []
    return events[-1]["usage"]


@pytest.mark.parametrize("server", ["r1", "qwen3"])
def test_usage_counts_the_reasoning_tokens(server, request) -> None:
    """vLLM with --reasoning-parser: usage.completion_tokens_details.reasoning_tokens, the
    tokens of the thinking (by the tags' token ids): here one token a byte of THOUGHT."""
    base = request.getfixturevalue(server)
    body = {"max_tokens": 120, "structured_outputs": {"choice": [FORCED]}, **TAGS_AS_TOKENS}
    resp = _chat(base, body)
    assert resp["choices"][0]["message"]["reasoning"] == THOUGHT
    u = resp["usage"]
    assert u["completion_tokens_details"] == {"reasoning_tokens": len(THOUGHT.encode())}
    # the two tags, a token a byte of the rest, and the end-of-sequence token
    assert u["completion_tokens"] == 2 + len(THOUGHT.encode()) + len(ANSWER.encode()) + 1
    events = _events(base, {**body, "stream_options": {"include_usage": True}})
    assert _final_usage(events) == u
    # n > 1: summed over the choices, as vLLM
    both = _chat(base, {**body, "n": 2})["usage"]
    assert both["completion_tokens_details"] == {"reasoning_tokens": 2 * len(THOUGHT.encode())}


def test_r1_counts_up_to_the_end_tag_without_a_start_tag(r1) -> None:
    body = {"max_tokens": 120, "structured_outputs": {"regex": r"Hmm, four\.</think>Four\."},
            **TAGS_AS_TOKENS}
    u = _chat(r1, body)["usage"]
    assert u["completion_tokens_details"] == {"reasoning_tokens": len("Hmm, four.")}
    events = _events(r1, {**body, "stream_options": {"include_usage": True}})
    assert _final_usage(events) == u


def test_an_answer_that_is_all_content_has_no_reasoning_tokens(qwen3) -> None:
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    assert _chat(qwen3, body)["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


@pytest.fixture(scope="module")
def qwen3_no_thinking(think_model, tmp_path_factory):
    with _server(think_model, tmp_path_factory, "--reasoning-parser", "qwen3",
                 "--default-chat-template-kwargs", '{"enable_thinking": false}',
                 *IN_REASONING) as url:
        yield url


def _prompt(base: str, **body) -> str:
    r = httpx.post(f"{base}/tokenize", json={"messages": ASK, **body})
    assert r.status_code == 200, r.text
    return httpx.post(f"{base}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]


def test_default_chat_template_kwargs_are_under_the_requests(qwen3_no_thinking) -> None:
    base = qwen3_no_thinking
    closed = "assistant\n<think>\n\n</think>\n\n"
    assert _prompt(base).endswith(closed)  # the server's default reaches the template
    # a request's own key wins; its other keys are added to the defaults
    assert _prompt(base, chat_template_kwargs={"enable_thinking": True}).endswith("assistant\n")
    assert _prompt(base, chat_template_kwargs={"other": 1}).endswith(closed)
    # and the reasoning parser sees the merged kwargs: thinking off, all content
    body = {"max_tokens": 120, "structured_outputs": {"choice": [FORCED]}}
    msg = _chat(base, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == (None, FORCED)
    body["chat_template_kwargs"] = {"enable_thinking": True}
    msg = _chat(base, body)["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == (THOUGHT, ANSWER)


def test_a_tokenizer_without_think_tokens_is_refused_at_start(tmp_path_factory) -> None:
    """vLLM: `DeepSeekR1ReasoningParser reasoning parser could not locate think start/end
    tokens in the tokenizer!`, and the server does not start (exit status 1)."""
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("nothink") / "tiny")  # byte level
    with pytest.raises(RuntimeError, match=r"server exited \(1\)(.|\n)*DeepSeekR1Reasoning"
                       "Parser reasoning parser could not locate think start/end tokens"):
        with _server(path, tmp_path_factory, "--reasoning-parser", "deepseek_r1"):
            pass
