"""Long text prompts are encoded off the event loop (AsyncLLM.encode_async): on one worker
thread with its own copy of the tokenizer, the same ids as on the loop, and the loop keeps
running meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time

from helpers.tiny_models import tiny_tokenizer
from modelport.engine import async_llm
from modelport.engine.async_llm import AsyncLLM


def _llm(tokenizer) -> AsyncLLM:
    llm = AsyncLLM.__new__(AsyncLLM)  # only what encoding needs: no core, no config
    llm.tokenizer = tokenizer
    llm._encoder = None
    llm.client = None
    return llm


class _Spy:
    """A tokenizer that records the thread of each encode, optionally slow."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self.inner, self.delay, self.threads = inner, delay, []

    def encode(self, text, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_long_text_is_encoded_on_the_tokenizer_thread_with_a_copy() -> None:
    tok = tiny_tokenizer()
    llm = _llm(tok)
    short = "hello " * 10
    long = "The quick brown fox. " * (async_llm.ENCODE_OFFLOAD_CHARS // 20 + 1)

    async def run() -> tuple[list[int], list[int]]:
        a = await llm.encode_async(short)
        assert llm._encoder is None  # short texts never make the thread
        b = await llm.encode_async(long, add_special_tokens=False)
        return a, b

    a, b = asyncio.run(run())
    assert a == tok.encode(short)
    assert b == tok.encode(long, add_special_tokens=False) and len(b) > 1000
    pool, copy = llm._encoder
    assert copy is not tok.hf and type(copy) is type(tok.hf)  # its own tokenizer object
    spy = _Spy(copy)
    llm._encoder = (pool, spy)
    assert asyncio.run(llm.encode_async(long)) == tok.encode(long)
    assert spy.threads == ["modelport-tokenizer_0"]
    llm.shutdown()


def test_the_loop_keeps_running_while_a_long_prompt_is_encoded() -> None:
    llm = _llm(tiny_tokenizer())
    long = "x" * async_llm.ENCODE_OFFLOAD_CHARS

    async def run() -> int:
        pool, copy = llm._offload_encoder()
        llm._encoder = (pool, _Spy(copy, delay=0.5))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        ids = await llm.encode_async(long)
        t.cancel()
        assert len(ids) == len(long)  # byte-level: one id a character
        return ticks

    assert asyncio.run(run()) >= 10  # ~50 ticks in the 0.5 s the encode took
    llm.shutdown()


def test_a_tokenizer_that_cannot_be_copied_encodes_on_the_loop() -> None:
    class Uncopyable:
        def encode(self, text, add_special_tokens=True):
            return [len(text)]

        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    llm = _llm(Uncopyable())
    out = asyncio.run(llm.encode_async("y" * async_llm.ENCODE_OFFLOAD_CHARS))
    assert out == [async_llm.ENCODE_OFFLOAD_CHARS] and llm._encoder is False


def test_many_short_texts_go_to_the_tokenizer_thread_in_one_hop() -> None:
    tok = tiny_tokenizer()
    llm = _llm(tok)
    texts = ["an embedding input, short alone " * 4] * 80  # ~10,000 characters together
    few = texts[:3]

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        a = await llm.encode_many_async(few)
        assert llm._encoder is None  # together below the bound: on the loop
        pool, copy = llm._offload_encoder()
        spy = _Spy(copy)
        llm._encoder = (pool, spy)
        b = await llm.encode_many_async(texts, add_special_tokens=False)
        assert set(spy.threads) == {"modelport-tokenizer_0"} and len(spy.threads) == 80
        return a, b

    a, b = asyncio.run(run())
    assert a == [tok.encode(t) for t in few]
    assert b == [tok.encode(t, add_special_tokens=False) for t in texts]
    llm.shutdown()
