"""The reasoning parsers beyond think tags in the prompt (deepseek_r1, qwen3): mistral
([THINK] ... [/THINK], each one token), glm45 (generated <think> tags) and granite (plain
phrases), with vLLM's rules:
non-streaming splits, streams cut at every point reassembling to the same answer, what the
engine's structured outputs wait for (REASONING_TAGS), and granite over HTTP on a tiny model
whose vocabulary has no think tokens at all.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir, tiny_tokenizer
from modelport.engine.structured_output import REASONING_TAGS, ReasoningEnd
from modelport.entrypoints.openai.reasoning import (
    REASONING_PARSERS,
    ReasoningPlan,
    ReasoningStreamer,
    get_reasoning_parser,
    think_token_ids,
)


def _plan(name: str, prompt: str | None = None) -> ReasoningPlan:
    return ReasoningPlan.for_request(get_reasoning_parser(name), prompt, True)


def _stream(plan: ReasoningPlan, text: str, cuts) -> tuple[str, str]:
    streamer = ReasoningStreamer(plan)
    reasoning, content = "", ""
    for end in [c for c in cuts if 0 < c < len(text)] + [len(text)]:
        fresh, content_so_far = streamer.feed(text[:end], end == len(text))
        assert content_so_far.startswith(content), "content only grows"
        reasoning, content = reasoning + fresh, content_so_far
    return reasoning, content


def _every_split(text: str, pieces: int = 3) -> list:
    out: list = [range(1, len(text))]
    for k in range(pieces):
        out += itertools.combinations(range(1, len(text)), k)
    return out


def _check(name: str, text: str, pieces: int = 3) -> tuple[str | None, str | None]:
    """Every stream of the text reassembles to its non-streaming split."""
    plan = _plan(name)
    reasoning, content = plan.extract(text)
    for cuts in _every_split(text, pieces):
        assert _stream(plan, text, cuts) == (reasoning or "", content or ""), cuts
    return reasoning, content


def test_both_are_registered_and_validated() -> None:
    from modelport.engine.arg_utils import EngineArgs
    from modelport.entrypoints.openai.api_server import make_parser

    assert {"mistral", "granite", "glm45"} <= set(REASONING_PARSERS) <= set(REASONING_TAGS)
    for name in ("mistral", "granite", "glm45"):
        assert make_parser().parse_args(["--reasoning-parser", name]).reasoning_parser == name
        assert EngineArgs(reasoning_parser=name)._resolve_structured_outputs() == (name, False)


# ---------------------------------------------------------------- mistral


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("[THINK]2 and 2 make 4.[/THINK]The answer is 4.", "2 and 2 make 4.", "The answer is 4."),
        ("[THINK]Ça fait 4…[/THINK]", "Ça fait 4…", None),
        # no [THINK]: all content, a stray [/THINK] dropped (vLLM)
        ("The answer is 4.", None, "The answer is 4."),
        ("4[/THINK] indeed", None, "4 indeed"),
        # text before [THINK] is content; no [/THINK]: the rest is reasoning
        ("Hm.[THINK]still going", "still going", "Hm."),
        ("So[THINK]x[/THINK]y", "x", "Soy"),
    ],
)
def test_mistral_splits(text, reasoning, content) -> None:
    assert _check("mistral", text) == (reasoning, content)


def test_mistral_ignores_the_prompt_and_needs_its_tokens() -> None:
    # Magistral's system prompt may itself hold [THINK]...[/THINK]
    plan = _plan("mistral", prompt="[SYSTEM_PROMPT]Use [THINK]x[/THINK].[/SYSTEM_PROMPT]")
    assert plan.extract("[THINK]a[/THINK]b") == ("a", "b")
    with pytest.raises(
        RuntimeError,
        match="^Mistral reasoning parser could not locate think "
        "start/end tokens in the tokenizer!$",
    ):
        think_token_ids("mistral", tiny_tokenizer())
    vocab = {"[THINK]": 7, "[/THINK]": 8}
    assert ReasoningEnd.from_vocab("mistral", vocab) == ReasoningEnd(7, 8)
    with pytest.raises(RuntimeError, match="could not locate think start/end tokens"):
        ReasoningEnd.from_vocab("mistral", {"<think>": 1, "</think>": 2})
    parser = get_reasoning_parser("mistral")
    assert parser.count_reasoning_tokens([5, 7, 1, 2, 8, 3], 7, 8) == 2


# ---------------------------------------------------------------- glm45


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>2 and 2 make 4.</think>The answer is 4.", "2 and 2 make 4.", "The answer is 4."),
        ("<think>思考</think>", "思考", None),
        ("The answer is 4.", None, "The answer is 4."),  # thinking off: no <think> generated
    ],
)
def test_glm45_splits(text, reasoning, content) -> None:
    assert _check("glm45", text) == (reasoning, content)


def test_glm45_needs_both_tags_unstreamed_and_ends_after_the_assistant_token() -> None:
    plan = _plan("glm45", prompt="<|assistant|><think></think>")  # the prompt does not decide
    text = "<think>cut off"
    assert plan.extract(text) == (None, text)  # vLLM: both tags or all content
    assert _stream(plan, text, range(1, len(text))) == ("cut off", "")
    assert plan.extract("a<think>b</think>c") == ("b", "c")  # text before <think> dropped
    # the engine: </think> after the last <|assistant|> ends the reasoning
    vocab = {"<|assistant|>": 5, "<think>": 6, "</think>": 7}
    end = ReasoningEnd.from_vocab("glm45", vocab)
    assert end is not None and end.ended([5, 6, 7]) and not end.ended([5, 6, 7, 9, 5, 6])
    assert not end.ended([5, 6, 1, 2])
    with pytest.raises(RuntimeError, match="could not locate"):
        ReasoningEnd.from_vocab("glm45", {"<think>": 6, "</think>": 7})


# ---------------------------------------------------------------- granite

GRANITE = (
    "Here is my thought process: 2 and 2 make 4, so the answer is 4. "
    "Here is my response: The answer is 4."
)


def test_granite_splits_at_its_phrases() -> None:
    assert _check("granite", GRANITE, pieces=2) == (
        " 2 and 2 make 4, so the answer is 4. ",
        " The answer is 4.",
    )
    assert _check("granite", "Here's my thought process:a:b Here's my response:c") == ("a:b ", "c")
    assert _check("granite", "Here is my thought process:xHere is my response:") == ("x", None)
    assert _check("granite", "The answer is 4.") == (None, "The answer is 4.")


def test_granite_truncated_or_late_phrases_follow_vllm() -> None:
    plan = _plan("granite")
    # no response phrase: vLLM's non-streaming answer is all content; its stream reasons
    text = "Here is my thought process: still thinking"
    assert plan.extract(text) == (None, text)
    assert _stream(plan, text, range(1, len(text))) == (" still thinking", "")
    # phrases not at the start: non-streaming still splits (vLLM's regex searches), the
    # text before them dropped; a stream is all content
    late = "Well. Here is my thought process: a Here is my response: b"
    assert plan.extract(late) == (" a ", " b")
    assert _stream(plan, late, range(1, len(late))) == ("", late)


def test_granite_needs_no_tokens_and_does_not_hold_the_grammar() -> None:
    assert think_token_ids("granite", tiny_tokenizer()) == (-1, -1)
    assert ReasoningEnd.from_vocab("granite", {}) is None  # constrained from the first token
    assert get_reasoning_parser("granite").count_reasoning_tokens([1, 2, 3], -1, -1) == 0
    # the prompt never ends a granite answer's reasoning
    assert _plan("granite", prompt="<think></think>").extract(GRANITE)[0] is not None


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def granite_base(tmp_path_factory):
    pytest.importorskip("xgrammar")
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("granite") / "tiny")
    log = tmp_path_factory.mktemp("granitesrv") / "server.log"
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
        "--reasoning-parser",
        "granite",
    ]
    with serving(argv, log) as url:
        yield url


def test_granite_over_http(granite_base) -> None:
    # the tiny vocabulary has no think tokens: granite starts all the same, and a choice
    # constraint (on from the first token) makes the model write both phrases
    body = {
        "messages": [{"role": "user", "content": "2+2?"}],
        "max_tokens": 150,
        "structured_outputs": {"choice": [GRANITE]},
    }
    r = httpx.post(f"{granite_base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["reasoning"] == " 2 and 2 make 4, so the answer is 4. "
    assert msg["content"] == " The answer is 4."

    with httpx.stream(
        "POST", f"{granite_base}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        events = [
            json.loads(ln[6:])
            for ln in s.iter_lines()
            if ln.startswith("data: ") and ln != "data: [DONE]"
        ]
    reasoning = "".join(ch["delta"].get("reasoning") or "" for ev in events for ch in ev["choices"])
    content = "".join(ch["delta"].get("content") or "" for ev in events for ch in ev["choices"])
    assert (reasoning, content) == (msg["reasoning"], msg["content"])
