"""``outputs.Prefix``: the view AsyncLLM streams of a running sequence's cumulative token ids
and logprobs (no per-step copy of the whole list), and what the stream's outputs hold."""

from __future__ import annotations

import asyncio

import pytest

from modelport.outputs import Prefix


def test_a_prefix_reads_as_the_list_it_was_taken_from() -> None:
    items = [5, 6, 7, 8]
    view = Prefix(items, 3)
    items.extend([9, 10])  # the list grows after the snapshot: the view does not
    assert len(view) == 3 and list(view) == [5, 6, 7] and view == [5, 6, 7]
    assert view == (5, 6, 7) and view != [5, 6, 7, 8] and view != [5, 6] and view != "567"
    assert view[0] == 5 and view[-1] == 7 and view[-3] == 5
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(IndexError):
        view[-4]
    assert view[1:] == [6, 7] and isinstance(view[1:], list) and view[5:] == []
    assert view[::-1] == [7, 6, 5] and view[-2:] == [6, 7] and view[:10] == [5, 6, 7]
    assert view + [1] == [5, 6, 7, 1] and [1] + view == [1, 5, 6, 7]
    assert 7 in view and 8 not in view and repr(view) == "[5, 6, 7]" and bool(Prefix(items, 0)) is False
    with pytest.raises(TypeError):
        hash(view)


def test_streamed_outputs_hold_views_that_do_not_change_and_the_last_real_lists(tmp_path) -> None:
    from helpers.tiny_models import make_tiny_llama_dir
    from modelport import SamplingParams
    from modelport.engine.arg_utils import EngineArgs
    from modelport.engine.async_llm import AsyncLLM

    d = make_tiny_llama_dir(tmp_path / "m")

    async def main() -> list:
        llm = await AsyncLLM.from_engine_args(
            EngineArgs(model=str(d), kv_cache_memory=4 << 20, max_model_len=64))
        try:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
            return [out async for out in llm.generate([3, 4, 5], params, "r")]
        finally:
            llm.shutdown()

    outs = asyncio.run(main())
    final = outs[-1].outputs[0]
    assert outs[-1].finished and isinstance(final.token_ids, list) and len(final.token_ids) == 12
    assert isinstance(final.logprobs, list) and len(final.logprobs) == 12
    running = [o.outputs[0] for o in outs[:-1] if o.outputs[0].token_ids]
    assert running and all(isinstance(o.token_ids, Prefix) for o in running)
    for o in running:  # each snapshot is still the prefix it was when it was yielded
        n = len(o.token_ids)
        assert o.token_ids == final.token_ids[:n] and len(o.logprobs) == n
        assert list(o.logprobs) == final.logprobs[:n]
