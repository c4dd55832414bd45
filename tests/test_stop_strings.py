"""Stop strings in the output processor (offline API and server alike), min_tokens included."""

from __future__ import annotations

import pytest

from helpers.tiny_models import tiny_tokenizer
from modelport.engine.messages import EngineCoreOutput
from modelport.frontend.processor import OutputProcessor
from modelport.sampling_params import SamplingParams


def run(text: str, params: SamplingParams, *, per_step: int = 1, kind: str = "final"):
    """Feed ``text`` one byte token at a time (``per_step`` tokens a step, as speculative
    decoding delivers them) until the processor finishes the request; returns the outputs
    delivered and the request ids it asked the engine to abort."""
    proc = OutputProcessor(tiny_tokenizer())  # token id == byte value
    proc.add_request("r", None, [256], params, output_kind=kind)
    ids = list(text.encode())
    delivered, aborted = [], []
    for i in range(0, len(ids), per_step):
        last = i + per_step >= len(ids)
        out = EngineCoreOutput(
            request_id="r",
            new_token_ids=ids[i : i + per_step],
            finish_reason="length" if last else None,
        )
        results, abort = proc.process_outputs([out])
        delivered += results
        aborted += abort
        if results and results[-1].finished:
            break
    assert delivered and delivered[-1].finished
    return delivered, aborted


TEXT = " Paris. It is big. Yes"


def test_stop_string_before_min_tokens_does_not_stop() -> None:
    first = run(TEXT, SamplingParams(stop=["."], max_tokens=30))[0][-1].outputs[0]
    assert first.text == " Paris" and len(first.token_ids) == len(" Paris.")  # no min_tokens
    delivered, aborted = run(TEXT, SamplingParams(stop=["."], max_tokens=30, min_tokens=10))
    c = delivered[-1].outputs[0]
    assert c.text == " Paris. It is big"
    assert len(c.token_ids) == len(" Paris. It is big.")  # stopped at the first "." past 10
    assert (c.finish_reason, c.stop_reason) == ("stop", ".")
    assert aborted == ["r"]  # the engine is told to stop generating


@pytest.mark.parametrize(
    "stop,include,text,reason",
    [
        ("cde", False, "abcdefghij", "length"),  # completes with token 5 = min_tokens
        ("def", False, "abc", "stop"),  # completes with token 6: stops, trimmed as usual
        ("def", True, "abcdef", "stop"),
        ("f", False, "abcde", "stop"),
        ("a", False, "abcdefghij", "length"),
    ],
)
def test_stop_string_counts_once_it_completes_after_min_tokens(stop, include, text, reason) -> None:
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include, min_tokens=5)
    c = run("abcdefghij", params)[0][-1].outputs[0]
    assert (c.text, c.finish_reason) == (text, reason)
    assert c.stop_reason == (stop if reason == "stop" else None)


@pytest.mark.parametrize("per_step", [2, 3, 4])
def test_several_tokens_a_step_stop_where_one_at_a_time_does(per_step) -> None:
    params = SamplingParams(stop=[".", "is b"], max_tokens=30, min_tokens=10)
    one = run(TEXT, params)[0][-1].outputs[0]
    many = run(TEXT, params, per_step=per_step)[0][-1].outputs[0]
    assert one.text == " Paris. It "
    assert (many.text, many.token_ids, many.stop_reason) == (one.text, one.token_ids, "is b")


def test_streamed_deltas_honour_min_tokens() -> None:
    params = SamplingParams(stop=["."], max_tokens=30, min_tokens=10)
    delivered, _ = run(TEXT, params, kind="delta")
    assert "".join(o.outputs[0].text for o in delivered) == " Paris. It is big"
    assert delivered[-1].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("reason", [None, ord("!")])  # EOS, or a stop_token_ids entry
def test_stop_token_id_is_in_token_ids_but_not_in_text(include, reason) -> None:
    """vLLM: when the core stops on a stop token (EOS or a stop_token_ids entry, special or
    not), its id is in token_ids and its text is left out unless include_stop_str_in_output."""
    proc = OutputProcessor(tiny_tokenizer())  # token id == byte value: "!" is a plain token
    params = SamplingParams(max_tokens=16, include_stop_str_in_output=include,
                            stop_token_ids=[ord("!")])
    proc.add_request("r", None, [256], params)
    ids = list(b"Hi!")
    results, _ = proc.process_outputs([EngineCoreOutput(
        request_id="r", new_token_ids=ids, finish_reason="stop", stop_reason=reason)])
    out = results[-1].outputs[0]
    assert out.token_ids == ids
    assert out.text == ("Hi!" if include else "Hi")
    assert out.finish_reason == "stop" and out.stop_reason == reason


def test_a_length_finish_keeps_its_last_token_text() -> None:
    delivered, _ = run("Hi!", SamplingParams(max_tokens=3))
    assert delivered[-1].outputs[0].text == "Hi!"
