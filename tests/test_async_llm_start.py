"""AsyncLLM start-up: the core process starts while this process loads the tokenizer, and a
tokenizer that fails to load takes the started core down with it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport.engine import async_llm
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.async_llm import AsyncLLM
from modelport.frontend import tokenizer as tokenizer_mod
from modelport.sampling_params import SamplingParams

KV = 4 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("start") / "m")


def _args(model_dir) -> EngineArgs:
    return EngineArgs(model=str(model_dir), kv_cache_memory=KV, max_model_len=64)


def _spy_core(monkeypatch) -> tuple[list, list]:
    """Record when each core client's start began and the client it made."""
    began, clients = [], []
    real = async_llm.make_core_client

    def spy(*a, **kw):
        began.append(time.monotonic())
        client = real(*a, **kw)
        clients.append(client)
        return client

    monkeypatch.setattr(async_llm, "make_core_client", spy)
    return began, clients


def test_the_tokenizer_loads_while_the_core_starts(model_dir, monkeypatch) -> None:
    began, clients = _spy_core(monkeypatch)
    real = tokenizer_mod.load_tokenizer
    loaded: list[float] = []

    def slow(*a, **kw):
        tok = real(*a, **kw)
        time.sleep(0.5)  # a tokenizer that is slow to build (a GGUF vocabulary)
        loaded.append(time.monotonic())
        return tok

    monkeypatch.setattr(tokenizer_mod, "load_tokenizer", slow)

    async def main() -> list[int]:
        llm = await AsyncLLM.from_engine_args(_args(model_dir))
        try:
            final = None
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async for out in llm.generate([1, 2, 3], params, "r0"):
                final = out
            return list(final.outputs[0].token_ids)
        finally:
            llm.shutdown()

    tokens = asyncio.run(main())
    assert len(tokens) == 4
    assert len(began) == 1 and len(loaded) == 1
    assert began[0] < loaded[0]  # the core was already starting when the tokenizer was done
    clients[0]._proc.join(10)
    assert not clients[0]._proc.is_alive()


def test_a_tokenizer_that_fails_stops_the_started_core(model_dir, monkeypatch) -> None:
    gate = threading.Event()

    def broken(*a, **kw):
        gate.wait(30)  # fail only once the core is under way
        raise ValueError("this tokenizer cannot be read")

    monkeypatch.setattr(tokenizer_mod, "load_tokenizer", broken)
    real = async_llm.make_core_client
    clients = []

    def opened(*a, **kw):
        gate.set()
        clients.append(real(*a, **kw))
        return clients[-1]

    monkeypatch.setattr(async_llm, "make_core_client", opened)

    with pytest.raises(ValueError, match="this tokenizer cannot be read"):
        asyncio.run(AsyncLLM.from_engine_args(_args(model_dir)))
    assert len(clients) == 1 and clients[0].ready is not None  # the core did come up
    assert clients[0]._closing  # shutdown() ran
    proc = clients[0]._proc
    proc.join(30)  # killed already; a loaded machine can take a while to tear a process down
    assert not proc.is_alive(), _state(proc.pid)  # and went down with the failed start


def _state(pid: int) -> str:
    """A live process's scheduler state and kernel wait channel (for a failure's message)."""
    facts = []
    for name in ("status", "wchan"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError as e:
            text = str(e)
        facts.append(next((ln for ln in text.splitlines() if ln.startswith("State")), text))
    return f"core {pid} still alive: " + "; ".join(facts)
