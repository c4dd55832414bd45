"""Structured outputs (guided decoding) with xgrammar, as vLLM serves them: offline through
SamplingParams(structured_outputs=StructuredOutputsParams(...)) (and the older
guided_decoding=GuidedDecodingParams(...)), and over HTTP through response_format json_object /
json_schema, structured_outputs and vLLM's older guided_* fields. The embedded default model
(a real BPE tokenizer) on CPU; generations stay short.
"""

from __future__ import annotations

import json
import re

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
    with pytest.raises(ValueError, match="structural_tag is not supported"):
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
