"""Structured outputs (guided decoding) with xgrammar, as vLLM serves them: offline through
SamplingParams(structured_outputs=StructuredOutputsParams(...)) (and the older
guided_decoding=GuidedDecodingParams(...)), and over HTTP through response_format json_object /
json_schema / structural_tag, structured_outputs and vLLM's older guided_* fields and
structural_tag. The embedded default model
(a real BPE tokenizer) on CPU; generations stay short.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from helpers.server_proc import serving
from modelport import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from modelport.engine.messages import dict_to_params, params_to_dict

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON = "Describe a person as JSON with a name and an age:"
REGEX = r"\d{3}-\d{4}"
CHOICES = ["yes", "no", "maybe so"]


def check_person(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"name", "age"}, obj  # required, and no other properties (strict)
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256)


def _so(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 48)
    so = kw.pop("so")
    return SamplingParams(structured_outputs=so, **kw)


# ---------------------------------------------------------------- the params


def test_params_need_exactly_one_constraint_and_cross_to_the_core_as_plain_data() -> None:
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="structural_tag must be"):
        StructuredOutputsParams(structural_tag="{}")
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs={"regex": "a"}, guided_decoding={"regex": "b"})
    p = SamplingParams(guided_decoding=GuidedDecodingParams(json=SCHEMA))  # the older names
    assert p.structured_outputs == StructuredOutputsParams(json=json.dumps(SCHEMA))
    d = params_to_dict(p)
    assert d["structured_outputs"] == {"json": json.dumps(SCHEMA)}
    import msgspec

    back = dict_to_params(msgspec.msgpack.decode(msgspec.msgpack.encode(d)))
    assert back.structured_outputs == p.structured_outputs
    # a dict is the same as the class
    assert SamplingParams(structured_outputs={"choice": CHOICES}).structured_outputs.choice == CHOICES


# ---------------------------------------------------------------- offline


def test_json_schema_output_parses_and_follows_the_schema(llm) -> None:
    out = llm.generate([PERSON], _so(so=StructuredOutputsParams(json=SCHEMA), temperature=0,
                                     max_tokens=60))[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    check_person(out.text)


def test_regex_output_fully_matches(llm) -> None:
    outs = llm.generate(["My phone number is"], _so(so=StructuredOutputsParams(regex=REGEX),
                                                     temperature=0.8, seed=3, n=2))
    for o in outs[0].outputs:
        assert re.fullmatch(REGEX, o.text), o.text
        assert o.finish_reason == "stop"


def test_choice_output_is_one_of_the_choices_for_every_sample(llm) -> None:
    outs = llm.generate(["Is the sky blue? Answer:"],
                        _so(so=StructuredOutputsParams(choice=CHOICES), temperature=1.0, n=2))
    assert len(outs[0].outputs) == 2
    for o in outs[0].outputs:
        assert o.text in CHOICES and o.finish_reason == "stop"


def test_json_object_with_the_older_guided_decoding_name(llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=60,
                            guided_decoding=GuidedDecodingParams(json_object=True,
                                                                 disable_any_whitespace=True))
    out = llm.generate(['A JSON object with the key "a" set to 1:'], params)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


def test_an_unconstrained_request_in_the_same_batch_is_unaffected(llm) -> None:
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], plain)[0].outputs[0].token_ids
    both = llm.generate(
        ["The capital of France is", PERSON],
        [plain, _so(so=StructuredOutputsParams(json=SCHEMA), temperature=0, max_tokens=60)],
    )
    assert both[0].outputs[0].token_ids == alone
    check_person(both[1].outputs[0].text)


@pytest.mark.parametrize(("kw", "said"), [
    ({"json": {"type": "foo"}}, r"invalid JSON schema in structured_outputs\.json"),
    ({"json": "{not json"}, r"structured_outputs\.json is not valid JSON"),
    ({"regex": "([a-"}, r"invalid regex in structured_outputs\.regex"),
    ({"grammar": "root ::= "}, r"invalid grammar in structured_outputs\.grammar"),
])
def test_an_invalid_constraint_is_a_value_error_when_added(llm, kw, said) -> None:
    with pytest.raises(ValueError, match=said):
        llm.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**kw)))
    # the engine is unaffected
    assert llm.generate(["hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("sosrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--max-model-len", "256"]
    with serving(argv, log) as url:
        yield url


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=120)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_http_response_format_json_schema(base, path) -> None:
    body = ({"messages": [{"role": "user", "content": PERSON}]} if "chat" in path
            else {"prompt": PERSON})
    r = _ok(_post(base, path, {**body, "max_tokens": 60, "temperature": 0,
                               "response_format": JSON_SCHEMA_FORMAT}))
    choice = r["choices"][0]
    check_person(choice["message"]["content"] if "chat" in path else choice["text"])
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_http_guided_choice_and_structured_outputs_with_n_2(base, path) -> None:
    body = ({"messages": [{"role": "user", "content": "Is the sky blue?"}]} if "chat" in path
            else {"prompt": "Is the sky blue? Answer:"})
    for extra in ({"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}):
        r = _ok(_post(base, path, {**body, "max_tokens": 8, "n": 2, **extra}))
        texts = [c["message"]["content"] if "chat" in path else c["text"] for c in r["choices"]]
        assert len(texts) == 2 and all(t in CHOICES for t in texts), texts
    r = _ok(_post(base, path, {**body, "max_tokens": 12, "guided_regex": REGEX,
                               "temperature": 0}))
    text = r["choices"][0]["message"]["content"] if "chat" in path else r["choices"][0]["text"]
    assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"guided_regex": "([a-"}, "guided_regex"),
    ({"structured_outputs": {"regex": "([a-"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"structural_tag": "{}"}, "structural_tag"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
])
def test_http_invalid_constraints_are_400s_naming_the_field(base, extra, param) -> None:
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        err = _error(_post(base, path, {**body, "max_tokens": 2, **extra}))
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        if param in ("guided_json", "guided_regex") and len(extra) == 1:
            assert param in err["message"], err


# ---------------------------------------------------------------- structural tags

COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
         "required": ["color"], "additionalProperties": False}
# xgrammar's format (what vLLM passes on): exactly <answer>{json}</answer>
ANSWER_TAG = {"type": "structural_tag", "format": {
    "type": "tag", "begin": "<answer>", "content": {"type": "json_schema", "json_schema": COLOR},
    "end": "</answer>"}}
# the older shape: free text until a trigger, then begin + schema + end
LEGACY_TAG = {"type": "structural_tag", "triggers": ["<function="], "structures": [
    {"begin": "<function=paint>", "schema": COLOR, "end": "</function>"}]}


def check_answer(text: str) -> None:
    m = re.fullmatch(r"<answer>(.*)</answer>", text, re.S)
    assert m, text
    assert json.loads(m.group(1))["color"] in ("red", "blue"), text


def test_structural_tag_format_constrains_the_output(llm) -> None:
    for tag in (ANSWER_TAG, json.dumps(ANSWER_TAG)):  # a dict or its JSON text
        so = StructuredOutputsParams(structural_tag=tag)
        outs = llm.generate(["Pick a color:"] * 2, _so(so=so, max_tokens=40, temperature=1.0,
                                                       seed=3), use_tqdm=False)  # fmt: skip
        for o in outs:
            check_answer(o.outputs[0].text)
            assert o.outputs[0].finish_reason == "stop"


def test_legacy_structural_tag_frees_text_until_a_trigger(llm) -> None:
    from xgrammar.testing import _is_grammar_accept_string

    from modelport.engine.structured_output import _grammar, spec_key

    so = StructuredOutputsParams(structural_tag=LEGACY_TAG)
    g = _grammar(spec_key(so))
    assert _is_grammar_accept_string(g, 'Sure. <function=paint>{"color": "red"}</function> ok')
    assert _is_grammar_accept_string(g, "no call at all")
    assert not _is_grammar_accept_string(g, '<function=paint>{"color": "green"}</function>')
    assert not _is_grammar_accept_string(g, '<function=draw>{"color": "red"}</function>')
    # the engine runs it: the trigger forces the tag, so a prompt ending in the trigger's
    # start is continued by a valid call or by free text that never starts another
    outs = llm.generate(["Call paint: <function="], _so(so=so, max_tokens=24, temperature=0),
                        use_tqdm=False)  # fmt: skip
    out = outs[0].outputs[0]
    assert _grammar_accepts_all(llm, so, list(out.token_ids))  # every token, even if cut short
    if out.finish_reason == "stop":
        assert _is_grammar_accept_string(g, out.text)


@pytest.mark.parametrize("tag", [
    {"type": "structural_tag", "format": {"type": "no-such-format"}},
    {"type": "structural_tag", "structures": [{"begin": "<a>"}], "triggers": ["<a"]},
    {"structures": [], "triggers": "<a"},
    [1, 2],
    "not json",
])
def test_an_invalid_structural_tag_is_a_value_error(llm, tag) -> None:
    with pytest.raises(ValueError, match="structural"):
        so = StructuredOutputsParams(structural_tag=tag)
        llm.generate(["hi"], _so(so=so, max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_http_structural_tag_response_format_and_fields(base, path) -> None:
    body = ({"messages": [{"role": "user", "content": "Pick a color."}]} if "chat" in path
            else {"prompt": "Pick a color:"})
    for extra in ({"response_format": ANSWER_TAG},
                  {"structured_outputs": {"structural_tag": json.dumps(ANSWER_TAG)}},
                  {"structural_tag": json.dumps(ANSWER_TAG)}):  # vLLM's older field
        r = _ok(_post(base, path, {**body, "max_tokens": 40, "temperature": 0, **extra}))
        c = r["choices"][0]
        check_answer(c["message"]["content"] if "chat" in path else c["text"])
    r = _ok(_post(base, path, {**body, "max_tokens": 4, "response_format": LEGACY_TAG}))
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    bad = {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>"}}
    err = _error(_post(base, path, {**body, "max_tokens": 2, "response_format": bad}))
    assert err["param"] == "response_format" and "structural tag" in err["message"], err


# ---------------------------------------------------------------- scheduling


def test_grammar_requests_take_no_drafts_and_no_async_overlap(tmp_path) -> None:
    """A grammar advances token by token on the host: such requests are never speculated and
    drain async scheduling's in-flight step; outputs are the same either way."""
    from helpers.tiny_models import make_tiny_llama_dir
    from modelport.engine.request import Request

    req = Request("r", [1, 2], SamplingParams(structured_outputs={"regex": "a"}))
    assert req.no_speculation and req.needs_host_history

    tiny = make_tiny_llama_dir(tmp_path / "tiny")
    kw = {"max_model_len": 128, "kv_cache_memory": 8 << 20}
    regex = "(ab){2,6}c"
    params = [SamplingParams(temperature=0, max_tokens=16,
                             structured_outputs=StructuredOutputsParams(regex=regex)),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    prompts = ["abababababab", "abababababab"]
    texts = {}
    for name, extra in (("sync", {"async_scheduling": False}), ("async", {"async_scheduling": True}),
                        ("spec", {"speculative_config": {"method": "ngram",
                                                         "num_speculative_tokens": 3,
                                                         "prompt_lookup_max": 2}})):
        engine = LLM(str(tiny), **kw, **extra)
        outs = engine.generate(prompts, params, use_tqdm=False)
        texts[name] = [o.outputs[0].token_ids for o in outs]
        assert re.fullmatch(regex, outs[0].outputs[0].text), outs[0].outputs[0].text
        if name == "async":
            assert engine.llm_engine.core.async_scheduling
        if name == "spec":  # only the unconstrained request was speculated
            sched = engine.llm_engine.core.scheduler
            assert sched.num_drafts > 0
            before = sched.num_drafts
            grammar_only = engine.generate(prompts[:1], params[:1], use_tqdm=False)
            assert grammar_only[0].outputs[0].token_ids == texts["sync"][0]
            assert sched.num_drafts == before
        del engine
    assert texts["sync"] == texts["async"] == texts["spec"]


# ---------------------------------------------------------------- compiling off the loop


def _schema(tag: str) -> dict:
    """SCHEMA under a title of its own: a spec no other test compiled (not cached)."""
    return {**SCHEMA, "title": f"{tag}-{time.monotonic_ns()}"}


def _gated_compile(monkeypatch, fail: str | None = None):
    """Patch the manager's compile seam: each compile waits for the returned Event (so the
    test decides when it ends, no timing), is recorded in ``calls``, and a spec whose text
    holds ``fail`` fails as xgrammar's errors do."""
    from modelport.engine.structured_output import StructuredOutputManager

    gate = threading.Event()
    calls: list[tuple] = []
    compile_ = StructuredOutputManager._compile

    def gated(self, key):
        calls.append(key)
        assert gate.wait(120), "the test never opened the gate"
        if fail is not None and fail in str(key[1]):
            raise ValueError(f"cannot compile structured_outputs.{key[0]}: {fail}")
        return compile_(self, key)

    monkeypatch.setattr(StructuredOutputManager, "_compile", gated)
    return gate, calls


def _step_until(engine, done, outputs: dict, limit: int = 2000) -> None:
    for _ in range(limit):
        if done():
            return
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not get there")


def _finished(outputs: dict, rid: str) -> bool:
    return bool(outputs.get(rid)) and outputs[rid][-1].finished


def test_a_compiling_grammar_does_not_hold_up_other_requests(llm, monkeypatch) -> None:
    from modelport.engine.request import RequestStatus

    gate, calls = _gated_compile(monkeypatch)
    engine = llm.llm_engine
    engine.add_request("slow", PERSON, _so(so=StructuredOutputsParams(json=_schema("slow")),
                                           temperature=0, max_tokens=60))
    engine.add_request("plain", "The capital of France is",
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    core = engine.core
    assert core.num_compiling == 1
    assert core.scheduler.requests["slow"].status is RequestStatus.WAITING_FOR_FSM
    outputs: dict = {}
    _step_until(engine, lambda: _finished(outputs, "plain"), outputs)
    # the plain request ran to its end while the grammar was still compiling
    assert len(outputs["plain"][-1].outputs[0].token_ids) == 6
    assert "slow" not in outputs and core.num_compiling == 1 and len(calls) == 1
    assert core.scheduler.requests["slow"].status is RequestStatus.WAITING_FOR_FSM
    gate.set()
    _step_until(engine, lambda: _finished(outputs, "slow"), outputs)
    out = outputs["slow"][-1].outputs[0]
    assert out.finish_reason == "stop", out.text
    check_person(out.text)
    assert not engine.has_unfinished_requests() and core.num_compiling == 0


def test_a_grammar_that_fails_to_compile_fails_only_its_request(llm, monkeypatch) -> None:
    gate, _ = _gated_compile(monkeypatch, fail="boom")
    engine = llm.llm_engine
    engine.add_request("bad", PERSON, _so(so=StructuredOutputsParams(json=_schema("boom")), n=2))
    engine.add_request("plain", "The capital of France is",
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    gate.set()
    outputs: dict = {}
    errors = []
    while engine.has_unfinished_requests():
        try:
            for out in engine.step():
                outputs.setdefault(out.request_id, []).append(out)
        except ValueError as e:
            errors.append(str(e))
    assert errors == ["cannot compile structured_outputs.json: boom"]  # once for both samples
    assert "bad" not in outputs
    assert len(outputs["plain"][-1].outputs[0].token_ids) == 6
    core = engine.core
    assert core.num_compiling == 0 and not core.scheduler.requests
    assert not engine.output_processor.has_request("bad")
    assert core._structured_outputs().num_inflight == 0
    # offline: LLM.generate says why, and drops that call's other requests
    with pytest.raises(ValueError, match="boom"):
        llm.generate(["hi", PERSON], [SamplingParams(max_tokens=2),
                                      _so(so=StructuredOutputsParams(json=_schema("boom")))],
                     use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_identical_specs_compile_once(llm, monkeypatch) -> None:
    gate, calls = _gated_compile(monkeypatch)
    so = StructuredOutputsParams(json=_schema("same"))
    engine = llm.llm_engine
    # n=2 plus another request: three engine requests wait on one compile
    engine.add_request("a", PERSON, _so(so=so, n=2, temperature=0.7, seed=1))
    engine.add_request("b", PERSON, _so(so=StructuredOutputsParams(json=so.json), temperature=0))
    assert engine.core.num_compiling == 3
    gate.set()
    outputs: dict = {}
    _step_until(engine, lambda: not engine.has_unfinished_requests(), outputs)
    assert len(calls) == 1
    for rid in ("a", "b"):
        for o in outputs[rid][-1].outputs:
            assert o.finish_reason in ("stop", "length")
    # later: served from the cache, ready at admission
    out = llm.generate([PERSON], _so(so=so, temperature=0, max_tokens=60), use_tqdm=False)
    check_person(out[0].outputs[0].text)
    assert len(calls) == 1


def test_abort_while_compiling(llm, monkeypatch) -> None:
    gate, calls = _gated_compile(monkeypatch)
    engine = llm.llm_engine
    core = engine.core
    mgr = core._structured_outputs()
    engine.add_request("gone", PERSON, _so(so=StructuredOutputsParams(json=_schema("gone"))))
    assert core.num_compiling == 1 and mgr.num_inflight == 1
    fut = next(iter(core._compiling.values()))[1]
    engine.abort_request(["gone"])
    assert core.num_compiling == 0 and not core.scheduler.requests
    assert not engine.has_unfinished_requests() and not engine.output_processor.has_request("gone")
    assert engine.step() == []  # nothing left to run, nothing reported
    gate.set()
    if not fut.cancelled():  # it had started: it ends, and its grammar is cached, not leaked
        fut.result(timeout=120)
    assert mgr.num_inflight == 0
    assert llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_a_queued_compile_no_one_waits_for_is_cancelled(monkeypatch) -> None:
    from modelport.engine.structured_output import StructuredOutputManager

    gate = threading.Event()
    monkeypatch.setattr(StructuredOutputManager, "_compile",
                        lambda self, key: gate.wait(120) and ("compiled", key))
    mgr = StructuredOutputManager(lambda: None, 100, max_workers=1)
    try:
        first = mgr.submit(StructuredOutputsParams(regex="a"))
        queued = mgr.submit(StructuredOutputsParams(regex="b"))
        assert mgr.submit(StructuredOutputsParams(regex="b")) is queued  # shared while in flight
        assert mgr.num_inflight == 2 and mgr.num_compiles == 2
        mgr.cancel(queued)
        assert queued.cancelled() and mgr.num_inflight == 1
        gate.set()
        assert first.result(timeout=120)[0] == "compiled"
        assert mgr.num_inflight == 0
        again = mgr.submit(StructuredOutputsParams(regex="a"))  # cached: done at once
        assert again.done() and again.result() is first.result() and mgr.num_compiles == 2
    finally:
        gate.set()
        mgr.shutdown()


# ---------------------------------------------------------------- min_tokens vs the grammar


def _grammar_accepts_all(llm, so: StructuredOutputsParams, token_ids: list[int]) -> bool:
    matcher = llm.llm_engine.core._structured_outputs().new_matcher(so)
    return all(matcher.accept_token(t) for t in token_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_gives_way_to_a_grammar_that_allows_only_eos(llm, temperature) -> None:
    """min_tokens bans EOS, but once "yes" / "no" is out the grammar allows only EOS: the
    grammar wins (vLLM's rule), the request stops there, and no token the grammar refuses is
    ever emitted."""
    so = StructuredOutputsParams(choice=["yes", "no"])
    eos = llm.llm_engine.tokenizer.eos_token_ids
    outs = llm.generate(["Is the sky blue? Answer:"],
                        SamplingParams(structured_outputs=so, min_tokens=10, max_tokens=20,
                                       temperature=temperature, seed=7, n=2), use_tqdm=False)
    for o in outs[0].outputs:
        assert o.text in ("yes", "no") and o.finish_reason == "stop", (o.text, o.token_ids)
        assert o.token_ids[-1] in eos, o.token_ids  # ended by EOS, not by a refused token
        assert _grammar_accepts_all(llm, so, o.token_ids), o.token_ids
    # min_tokens still holds where the grammar leaves other tokens: a regex of digits
    out = llm.generate(["Count: 1 2 3 4 5"], SamplingParams(
        structured_outputs=StructuredOutputsParams(regex=r"[0-9 ]{1,30}"), min_tokens=6,
        max_tokens=12, temperature=0), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6, out.token_ids


def test_a_token_the_grammar_refuses_is_never_emitted(llm) -> None:
    """allowed_token_ids that leave the grammar nothing: the request stops, emitting nothing
    outside the grammar."""
    tok = llm.llm_engine.tokenizer
    (only,) = tok.encode("zebra", add_special_tokens=False)[:1]
    out = llm.generate(["Is the sky blue? Answer:"], SamplingParams(
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
        allowed_token_ids=[only], max_tokens=5, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "stop"


def test_the_core_process_refuses_a_request_whose_grammar_failed_to_compile() -> None:
    """Served, a compile failure reaches the frontend as CoreRejected (AsyncLLM raises it as
    the request's ValueError, as for a request refused at admission)."""
    import queue
    from multiprocessing import Pipe

    from modelport.engine import core_client as cc
    from modelport.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats

    class FakeCore:  # the EngineCore surface _busy_loop uses
        is_sleeping = False

        def __init__(self) -> None:
            self.waiting: list[str] = []
            self.rejected: list[tuple[str, str]] = []

        def add_request(self, r) -> None:
            self.waiting.append(r.request_id)

        def abort_requests(self, ids) -> list:
            return []

        def has_unfinished_requests(self) -> bool:
            return bool(self.waiting)

        def step(self) -> EngineCoreOutputs:  # the grammar failed: refused, no output
            self.rejected += [(rid, "cannot compile structured_outputs.json: boom")
                              for rid in self.waiting]
            self.waiting = []
            return EngineCoreOutputs(outputs=[])

        def take_rejected(self) -> list[tuple[str, str]]:
            out, self.rejected = self.rejected, []
            return out

        def get_stats(self) -> SchedulerStats:
            return SchedulerStats()

    ours, theirs = Pipe()
    sent: queue.Queue = queue.Queue()
    req = EngineCoreRequest(request_id="r1", prompt_token_ids=[1], sampling_params={},
                            eos_token_ids=[], arrival_time=0.0)
    ours.send_bytes(cc._to_core_encoder.encode(cc.AddRequest(request=req)))
    loop = threading.Thread(target=cc._busy_loop, args=(FakeCore(), theirs, sent.put))
    loop.start()
    try:
        msgs = [sent.get(timeout=60) for _ in range(2)]
    finally:
        ours.send_bytes(cc._to_core_encoder.encode(cc.Shutdown()))
        loop.join(60)
    assert isinstance(msgs[0], cc.CoreStepOutputs)
    assert msgs[1] == cc.CoreRejected(request_id="r1", kind="invalid",
                                      message="cannot compile structured_outputs.json: boom")
