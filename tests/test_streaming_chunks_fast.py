"""Streamed chunks written as JSON text (protocol.ChunkJSON, the default) are byte for byte
the chunks the pydantic models dump (MODELPORT_SSE_FASTPATH=0): the chat and completions
stream generators run over the same engine outputs both ways, with n=2, logprobs, include_usage,
stop reasons of every type and text that JSON must escape."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelport.entrypoints.openai import protocol
from modelport.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionLogProbs,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
)
from modelport.entrypoints.openai.serving_chat import ServingChat
from modelport.entrypoints.openai.serving_completion import ServingCompletion
from modelport.entrypoints.openai.tools import ToolSettings, plan_tools
from modelport.outputs import CompletionOutput, Logprob, RequestOutput

# what each choice's text grows by, step after step (escapes, non-ASCII, an emoji, controls)
PIECES = [
    ["Hello", ' "quoted"', " back\\slash", "\n\t", "\u00e9t\u00e9 ", "\U0001f600", "\x01\x1f\x7f",
     " \u2028end", "</script>", "."],
    ["", "x", "", "caf\u00e9", " {json: [1, 2]}", "\r\n", "\u4e2d\u6587", "!", "", "z"],
]
FINISH = [("length", None), ("stop", "</s>")]  # choice 1: a stop string
TOKENS = {0: 7, 1: 9}


class FakeEngine:
    served_model_names = ["tiny-model"]

    def decode_token(self, token_id: int) -> str:
        return f"<{token_id}>"


class FakeStream:
    """A RequestStream's cumulative outputs for two choices (n=2)."""

    def __init__(self, logprobs: bool, stop_reason_int: bool = False) -> None:
        self.logprobs = logprobs
        self.stop_reason_int = stop_reason_int
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        texts = ["", ""]
        ids: list[list[int]] = [[], []]
        lps: list[list] = [[], []]
        steps = len(PIECES[0])
        for step in range(steps):
            outs = []
            for i in range(2):
                texts[i] += PIECES[i][step]
                tid = 100 * i + step
                ids[i].append(tid)
                pos = {tid: Logprob(-0.5 - step / 7, 1, f"t{tid}\u00e9"),
                       tid + 1: Logprob(-1e-5 if step % 2 else -2.25, 2, None),
                       tid + 2: Logprob(float("-inf") if step == 3 else -3.0, 3, '"q"')}
                lps[i].append(pos)
                last = step == steps - 1
                reason, stop = FINISH[i] if last else (None, None)
                if last and i == 1 and self.stop_reason_int:
                    stop = 2
                outs.append(CompletionOutput(
                    index=i, text=texts[i], token_ids=list(ids[i]),
                    cumulative_logprob=-1.0,
                    logprobs=list(lps[i]) if self.logprobs else None,
                    finish_reason=reason, stop_reason=stop))
            yield RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 3],
                                outputs=outs, finished=step == steps - 1)

    async def aclose(self) -> None:
        self.closed = True


async def _collect(gen) -> list[str]:
    return [x async for x in gen]


def _chat_events(fast: bool, body: dict, **stream_kw) -> list[str]:
    protocol.SSE_FASTPATH = fast
    req = ChatCompletionRequest(**body)
    serving = ServingChat(FakeEngine())
    plan = plan_tools(req, ToolSettings())
    return asyncio.run(_collect(serving._stream(req, "tiny-model", 'chatcmpl-"x"', FakeStream(
        logprobs=bool(body.get("logprobs")), **stream_kw), 3, plan)))


def _completion_events(fast: bool, body: dict, **stream_kw) -> list[str]:
    protocol.SSE_FASTPATH = fast
    req = CompletionRequest(**body)
    serving = ServingCompletion(FakeEngine())
    stream = FakeStream(logprobs=body.get("logprobs") is not None, **stream_kw)
    return asyncio.run(_collect(serving._stream(req, "tiny-model", "cmpl-1",
                                                [("abc", [1, 2, 3])], [stream])))


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(protocol.time, "time", lambda: 1_700_000_000.5)
    monkeypatch.setattr(protocol, "SSE_FASTPATH", protocol.SSE_FASTPATH)  # restored after


CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2}
CHAT_CASES = [
    {},
    {"stream_options": {"include_usage": True}},
    {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    {"logprobs": True},  # top_logprobs 0
    {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},  # pydantic both
]


@pytest.mark.parametrize("extra", CHAT_CASES)
@pytest.mark.parametrize("stop_int", [False, True])
def test_chat_chunks_equal_the_pydantic_ones(extra: dict, stop_int: bool) -> None:
    body = {**CHAT, **extra}
    fast = _chat_events(True, body, stop_reason_int=stop_int)
    slow = _chat_events(False, body, stop_reason_int=stop_int)
    assert fast == slow  # the SSE text, byte for byte
    events = [json.loads(e[6:]) for e in fast[:-1]]
    assert fast[-1] == "data: [DONE]\n\n"
    # one choice a chunk (vLLM's and OpenAI's shape for n > 1), the role chunks first
    assert [e["choices"] for e in events[:2]] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None, "stop_reason": None}] for i in range(2)]
    assert all(len(e["choices"]) == 1 for e in events if not e.get("usage"))
    assert all(e["id"] == 'chatcmpl-"x"' and e["object"] == "chat.completion.chunk"
               and e["created"] == 1_700_000_000 and e["model"] == "tiny-model" for e in events)
    texts = {0: "", 1: ""}
    finish = {}
    for e in events[2:]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"]["content"]
            if c["finish_reason"] is not None:
                finish[c["index"]] = (c["finish_reason"], c["stop_reason"])
            if body.get("logprobs"):
                lp = c["logprobs"]["content"]
                assert len(lp) == 1 and lp[0]["token"].startswith("t")
                assert len(lp[0]["top_logprobs"]) == body.get("top_logprobs", 0)
            else:
                assert c["logprobs"] is None
    assert texts == {i: "".join(PIECES[i]) for i in range(2)}
    assert finish == {0: ("length", None), 1: ("stop", 2 if stop_int else "</s>")}
    usage_chunks = [e for e in events if e.get("usage")]
    if extra.get("stream_options", {}).get("include_usage"):
        assert usage_chunks[-1] == {**events[-1], "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 2 * len(PIECES[0]),
            "total_tokens": 3 + 2 * len(PIECES[0])}}
    else:
        assert not usage_chunks and all("usage" not in e for e in events)


COMPLETION = {"prompt": "abc", "stream": True, "n": 2}
COMPLETION_CASES = [
    {},
    {"stream_options": {"include_usage": True}},
    {"logprobs": 2, "stream_options": {"include_usage": True}},
    {"logprobs": 0, "echo": True},
    {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
]


@pytest.mark.parametrize("extra", COMPLETION_CASES)
@pytest.mark.parametrize("stop_int", [False, True])
def test_completion_chunks_equal_the_pydantic_ones(extra: dict, stop_int: bool) -> None:
    body = {**COMPLETION, **extra}
    fast = _completion_events(True, body, stop_reason_int=stop_int)
    slow = _completion_events(False, body, stop_reason_int=stop_int)
    assert fast == slow
    events = [json.loads(e[6:]) for e in fast[:-1]]
    texts = {0: "", 1: ""}
    for e in events:
        assert e["object"] == "text_completion" and e["system_fingerprint"] is None
        # one choice a chunk; only the final usage chunk has none
        assert len(e["choices"]) == 1 or (e is events[-1] and e.get("usage"))
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            assert set(c) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    echo = "abc" if body.get("echo") else ""
    assert texts == {i: echo + "".join(PIECES[i]) for i in range(2)}
    if "logprobs" in body:
        lp = [c["logprobs"] for e in events for c in e["choices"]]
        assert all(x is not None for x in lp)
        n_tokens = sum(len(x["tokens"]) for x in lp)
        assert n_tokens == 2 * len(PIECES[0]) + (2 * 3 if body.get("echo") else 0)


@pytest.mark.parametrize("text", ["", "plain", '"\\/\b\f\n\r\t', "\x00\x1f\x7f\x80\x9f",
                                  "\u2028\u2029\ufeff\ufffd", "\U0001f600\u00e9\u4e2d",
                                  "".join(map(chr, range(0, 0x250)))])
@pytest.mark.parametrize("stop", [None, "", "stop \"s\"", 0, 128001])
def test_choice_json_is_the_models_dump(text: str, stop) -> None:
    lp_chat = protocol.ChoiceLogprobs(content=[TokenLogprob(
        token=text, logprob=-1e-7, bytes=list(text.encode()),
        top_logprobs=[TopLogprob(token="a", logprob=float("-inf"), bytes=[97])])])
    for lp in (None, lp_chat):
        for finish in (None, "stop", "length", "abort"):
            want = protocol.ChatStreamChoice(
                index=3, delta=protocol.DeltaMessage(content=text), logprobs=lp,
                finish_reason=finish, stop_reason=stop).model_dump_json()
            assert protocol.chat_choice_json(3, text, lp, finish, stop) == want
    want = protocol.ChatStreamChoice(
        index=0, delta=protocol.DeltaMessage(role="assistant", content=text)).model_dump_json()
    assert protocol.chat_choice_json(0, text, None, None, None, role="assistant") == want
    lp_cmpl = CompletionLogProbs(text_offset=[0], token_logprobs=[-1e-7], tokens=[text],
                                 top_logprobs=[{text: -2.5, "b": float("-inf")}])
    for lp in (None, lp_cmpl):
        want = protocol.CompletionChoice(index=1, text=text, logprobs=lp, finish_reason="stop",
                                         stop_reason=stop).model_dump_json(
                                             exclude={"prompt_logprobs"})
        assert protocol.completion_choice_json(1, text, lp, "stop", stop) == want
