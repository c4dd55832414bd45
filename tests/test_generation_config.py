"""Sampling defaults from the model's generation_config.json (vLLM's --generation-config auto,
its default), --override-generation-config, LLM.get_default_sampling_params(); and two more
vLLM server flags: --response-role and --enable-prompt-tokens-details. A tiny random Llama on
CPU, served in-process (build_app + starlette's TestClient, no uvicorn)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from helpers.openai_http import in_process
from helpers.tiny_models import make_tiny_llama_dir
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.generation_config import default_sampling_params
from modelport.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from modelport.entrypoints.openai.serving_common import (
    cached_tokens,
    make_sampling_params,
    usage,
)
from modelport.loader.source import ModelSource
from modelport.sampling_params import SamplingParams

GEN = {"do_sample": False, "temperature": 0.0, "top_k": 5, "repetition_penalty": 1.3,
       "max_new_tokens": 6, "bos_token_id": 256, "eos_token_id": 257}
SMALL = {"max_model_len": 128, "kv_cache_memory": 8 << 20}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """save_pretrained's generation_config.json: bos / eos / pad ids only."""
    return make_tiny_llama_dir(tmp_path_factory.mktemp("gen") / "plain")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = make_tiny_llama_dir(tmp_path_factory.mktemp("gen") / "tuned")
    (d / "generation_config.json").write_text(json.dumps(GEN))
    return d


def _src(path: Path) -> ModelSource:
    return ModelSource("hf", path, path.name)


# ---------------------------------------------------------------- what is read


def test_sampling_keys_are_read_and_do_sample_is_ignored(model_dir, plain_dir, tmp_path,
                                                         caplog) -> None:
    with caplog.at_level("WARNING"):
        found = default_sampling_params(_src(model_dir))
    # as vLLM: the five sampling fields and max_new_tokens (as max_tokens); do_sample false
    # does not make temperature 0 nor drop the others
    assert found == {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.3,
                     "max_tokens": 6}
    assert "Default sampling parameters have been overridden" in caplog.text
    assert "--generation-config vllm" in caplog.text
    assert default_sampling_params(_src(model_dir), "vllm") == {}
    # bos / eos ids only, or no file at all: nothing
    assert default_sampling_params(_src(plain_dir)) == {}
    assert default_sampling_params(_src(tmp_path)) == {}
    # a GGUF file has no generation config
    assert default_sampling_params(ModelSource("gguf", model_dir / "m.gguf", "m")) == {}
    sampled = tmp_path / "sampled"
    sampled.mkdir()
    (sampled / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert default_sampling_params(_src(plain_dir), str(sampled)) == {
        "temperature": 0.6, "top_p": 0.9}


def test_override_merges_over_the_file_and_applies_with_vllm_too(model_dir) -> None:
    over = {"temperature": 0.5, "min_p": 0.1, "max_new_tokens": 3, "unrelated": 1}
    assert default_sampling_params(_src(model_dir), "auto", over) == {
        "temperature": 0.5, "top_k": 5, "repetition_penalty": 1.3, "min_p": 0.1,
        "max_tokens": 3}
    assert default_sampling_params(_src(model_dir), "vllm", {"temperature": 0.5}) == {
        "temperature": 0.5}


def test_bad_generation_config_values_fail_at_start_up(model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="not 'auto', 'vllm' or a folder"):
        default_sampling_params(_src(model_dir), str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="generation config .*top_p"):
        default_sampling_params(_src(model_dir), "auto", {"top_p": 0})
    with pytest.raises(ValueError, match="override_generation_config must be a dict"):
        default_sampling_params(_src(model_dir), "auto", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not 'auto'"):
        EngineArgs(model=str(model_dir), generation_config=str(tmp_path / "missing"),
                   **SMALL).create_engine_config()


def test_engine_config_carries_the_defaults(model_dir) -> None:
    cfg = EngineArgs(model=str(model_dir), **SMALL).create_engine_config()
    assert cfg.default_sampling_params["max_tokens"] == 6
    cfg = EngineArgs(model=str(model_dir), generation_config="vllm",
                     override_generation_config={"top_p": 0.5}, **SMALL).create_engine_config()
    assert cfg.default_sampling_params == {"top_p": 0.5}


# ---------------------------------------------------------------- offline LLM


def test_offline_llm_uses_the_defaults_when_given_no_sampling_params(model_dir) -> None:
    from modelport import LLM

    llm = LLM(str(model_dir), **SMALL)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.repetition_penalty, d.max_tokens) == (0.0, 5, 1.3, 6)
    assert (d.top_p, d.min_p) == (1.0, 0.0)  # not in the file: SamplingParams' own
    d.temperature = 0.9  # a new object each time, as vLLM's
    assert llm.get_default_sampling_params().temperature == 0.0
    prompt = "Hello there, tiny model"
    default = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
    explicit = llm.generate(prompt, SamplingParams(temperature=0.0, top_k=5, max_tokens=6,
                                                   repetition_penalty=1.3), use_tqdm=False)
    assert default.token_ids == explicit[0].outputs[0].token_ids
    assert len(default.token_ids) <= 6
    # an explicit SamplingParams is used as given (vLLM's defaults only when none is given)
    mine = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(mine.token_ids) == 9
    chat = llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)[0].outputs[0]
    assert len(chat.token_ids) <= 6


def test_offline_llm_generation_config_vllm_and_override(model_dir) -> None:
    from modelport import LLM

    llm = LLM(str(model_dir), generation_config="vllm", **SMALL)
    assert llm.get_default_sampling_params() == SamplingParams()
    prompt = "Hello there, tiny model"
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    # vLLM's neutral defaults: temperature 1 samples (a random model's near-flat logits)
    sampled = llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    assert list(sampled[:6]) != list(greedy)
    llm = LLM(str(model_dir), override_generation_config={"temperature": 0.25,
                                                           "max_new_tokens": 4}, **SMALL)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.max_tokens) == (0.25, 5, 4)


# ---------------------------------------------------------------- the request conversion


def test_request_fields_left_out_take_the_defaults_and_sent_ones_win() -> None:
    defaults = {"temperature": 0.0, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.3}
    msgs = [{"role": "user", "content": "hi"}]
    p = make_sampling_params(ChatCompletionRequest(messages=msgs), 8, None, defaults=defaults)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.min_p) == (
        0.0, 5, 0.8, 1.3, 0.0)
    sent = ChatCompletionRequest.model_validate(
        {"messages": msgs, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
         "repetition_penalty": 1.0, "min_p": 0.05})
    p = make_sampling_params(sent, 8, None, defaults=defaults)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.min_p) == (
        1.0, 0, 1.0, 1.0, 0.05)
    # null is "not sent", as in vLLM
    p = make_sampling_params(CompletionRequest.model_validate(
        {"prompt": "x", "temperature": None, "top_k": None}), 8, None, defaults=defaults)
    assert (p.temperature, p.top_k) == (0.0, 5)
    # no generation config: the neutral defaults
    p = make_sampling_params(CompletionRequest(prompt="x"), 8, None)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (1.0, 0, 1.0, 1.0)


def test_prompt_tokens_details_only_when_asked_and_cached() -> None:
    outs = [types.SimpleNamespace(num_cached_tokens=32), types.SimpleNamespace(
        num_cached_tokens=16)]
    assert cached_tokens(types.SimpleNamespace(), outs) is None
    on = types.SimpleNamespace(enable_prompt_tokens_details=True)
    assert cached_tokens(on, outs) == 48
    assert usage(5, 2, cached_tokens=48).model_dump()["prompt_tokens_details"] == {
        "cached_tokens": 48}
    assert "prompt_tokens_details" not in usage(5, 2, cached_tokens=0).model_dump()
    assert "prompt_tokens_details" not in usage(5, 2).model_dump()


# ---------------------------------------------------------------- the OpenAI server


@pytest.fixture(scope="module")
def client(model_dir):
    with in_process([
        "--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "128",
        "--kv-cache-memory", "8MiB", "--override-generation-config", '{"top_k": 3}',
        "--response-role", "bot", "--enable-prompt-tokens-details"]) as c:
        yield c


def _post(client: TestClient, path: str, body: dict) -> dict:
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_max_new_tokens_is_the_default_length_and_a_cap(client) -> None:
    out = _post(client, "/v1/completions", {"prompt": "abc", "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 6  # vLLM: min(16, max_new_tokens)
    out = _post(client, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "abc"}], "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 6
    out = _post(client, "/v1/completions", {"prompt": "abc", "ignore_eos": True,
                                             "max_tokens": 3})
    assert out["usage"]["completion_tokens"] == 3
    # as vLLM's get_max_tokens: the generation config's max_tokens bounds a larger request
    out = _post(client, "/v1/completions", {"prompt": "abc", "ignore_eos": True,
                                             "max_tokens": 20})
    assert out["usage"]["completion_tokens"] == 6


def test_server_greedy_from_the_generation_config(client) -> None:
    body = {"prompt": "The tiny model says", "max_tokens": 6, "ignore_eos": True}
    left_out = _post(client, "/v1/completions", body)["choices"][0]["text"]
    explicit = _post(client, "/v1/completions", {**body, "temperature": 0.0, "top_k": 3,
                                                  "repetition_penalty": 1.3})
    assert left_out == explicit["choices"][0]["text"]
    # the same again: greedy answers do not vary
    assert left_out == _post(client, "/v1/completions", body)["choices"][0]["text"]


def test_server_response_role(client) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    out = _post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert out["choices"][0]["message"]["role"] == "bot"
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": msgs, "max_tokens": 2, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "bot"
    # vLLM: without a generation prompt the answer continues the last message's role
    out = _post(client, "/v1/chat/completions", {
        "messages": [*msgs, {"role": "assistant", "content": "well"}],
        "add_generation_prompt": False, "max_tokens": 2})
    assert out["choices"][0]["message"]["role"] == "assistant"
    out = _post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2,
                                                  "add_generation_prompt": False})
    assert out["choices"][0]["message"]["role"] == "user"


def test_server_prompt_tokens_details_on_a_prefix_cache_hit(client) -> None:
    prompt = "Long enough to fill a few cache blocks (bytes)."  # a token per byte
    first = _post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert "prompt_tokens_details" not in first["usage"]  # nothing cached: left out
    again = _post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and cached % 16 == 0 and cached < again["usage"]["prompt_tokens"]
    msgs = [{"role": "user", "content": prompt + " (chat)"}]
    _post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    chat = _post(client, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": msgs, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    final = json.loads(events[-2])  # the usage chunk, before [DONE]
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    with client.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


# ---------------------------------------------------------------- every other frontend


def test_with_sampling_defaults_fills_left_out_fields_and_caps_max_tokens() -> None:
    from modelport.engine.generation_config import with_sampling_defaults

    defaults = {"temperature": 0.0, "top_k": 5, "max_tokens": 6}
    assert with_sampling_defaults({"temperature": None, "top_p": 0.9}, defaults) == {
        "temperature": 0.0, "top_k": 5, "top_p": 0.9, "max_tokens": 6}
    assert with_sampling_defaults({"temperature": 0.7, "max_tokens": 20}, defaults) == {
        "temperature": 0.7, "top_k": 5, "max_tokens": 6}  # a larger max_tokens is capped
    assert with_sampling_defaults({"max_tokens": 3}, defaults)["max_tokens"] == 3
    assert with_sampling_defaults({"max_tokens": -4}, defaults)["max_tokens"] == -4  # a 400
    assert with_sampling_defaults({"top_k": None, "max_tokens": 9}, None) == {"max_tokens": 9}


LLM_CONFIG = """
name: "tuned"
backend: "llm"
max_batch_size: 0
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }} ]
parameters {{ key: "model" value: {{ string_value: "{model}" }} }}
parameters {{ key: "kv_cache_memory" value: {{ string_value: "8388608" }} }}
parameters {{ key: "max_model_len" value: {{ string_value: "128" }} }}
parameters {{ key: "override_generation_config"
              value: {{ string_value: "{{\\"max_new_tokens\\": 4}}" }} }}
"""


def test_kserve_llm_model_takes_the_generation_config_defaults(model_dir, tmp_path) -> None:
    """The Triton / KServe `llm` backend: fields a request leaves out take the model's
    generation_config.json (greedy, top_k 5, repetition_penalty 1.3) and the
    override_generation_config parameter (max_new_tokens 4: the default length and a cap)."""
    import httpx

    from modelport.entrypoints.kserve.embedded import EmbeddedServer

    (tmp_path / "tuned" / "1").mkdir(parents=True)
    (tmp_path / "tuned" / "config.pbtxt").write_text(LLM_CONFIG.format(model=model_dir))
    srv = EmbeddedServer([tmp_path]).start()
    try:
        url = f"http://{srv.http_url}/v2/models/tuned/generate"

        def gen(**params) -> str:
            r = httpx.post(url, json={"text_input": "The tiny model says",
                                      "parameters": {"ignore_eos": True, **params}})
            assert r.status_code == 200, r.text
            return r.json()["text_output"]

        left_out = gen()
        explicit = gen(temperature=0, top_k=5, repetition_penalty=1.3, max_tokens=4)
        assert left_out == explicit
        assert gen(max_tokens=20) == explicit  # capped at max_new_tokens
        assert explicit.startswith(gen(max_tokens=2))
        backend = srv.manager.get("tuned").backend
        assert backend.llm.engine_config.default_sampling_params == {
            "temperature": 0.0, "top_k": 5, "repetition_penalty": 1.3, "max_tokens": 4}
    finally:
        srv.stop()


def _cli_generate(capsys, *argv: str) -> str:
    from modelport.entrypoints.cli import main

    assert main(["generate", "--prompt", "The tiny model says", "--ignore-eos",
                 "--max-model-len", "128", "--kv-cache-memory", "8MiB", *argv]) == 0
    return capsys.readouterr().out


def test_cli_generate_takes_the_generation_config_defaults(model_dir, capsys) -> None:
    """`modelport generate`: flags left out take the generation config's values (top_k 5,
    repetition_penalty 1.3; max_new_tokens 6 caps --max-tokens' 64), flags typed win."""
    left_out = _cli_generate(capsys, "--model", str(model_dir))
    explicit = _cli_generate(capsys, "--model", str(model_dir), "--generation-config", "vllm",
                             "--top-k", "5", "--repetition-penalty", "1.3", "--max-tokens", "6")
    assert left_out == explicit
    # without the generation config: the command's own 64 tokens, plain greedy
    neutral = _cli_generate(capsys, "--model", str(model_dir), "--generation-config", "vllm")
    assert len(neutral) > len(left_out)
    # a typed flag wins over the generation config's
    typed = _cli_generate(capsys, "--model", str(model_dir), "--top-k", "0",
                          "--repetition-penalty", "1.0", "--max-tokens", "6")
    assert typed == _cli_generate(capsys, "--model", str(model_dir), "--generation-config",
                                  "vllm", "--max-tokens", "6")


def test_other_end_ids_of_the_generation_config_name_themselves_as_stop_reason(
        tmp_path_factory) -> None:  # fmt: skip
    """vLLM: generation_config.json's eos ids other than the tokenizer's own eos stop as
    stop_token_ids do, so stop_reason is the id; the tokenizer's eos leaves it None."""
    from modelport import LLM

    d = make_tiny_llama_dir(tmp_path_factory.mktemp("gen") / "two_eos")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 70]}))
    llm = LLM(str(d), **SMALL)
    assert llm.get_tokenizer().hf.eos_token_id == 257

    def end(token: int) -> tuple[str | None, int | str | None, list[int]]:
        p = SamplingParams(temperature=0, max_tokens=5, logit_bias={token: 100})
        o = llm.generate({"prompt_token_ids": [65, 66, 67]}, p, use_tqdm=False)[0].outputs[0]
        return o.finish_reason, o.stop_reason, list(o.token_ids)

    assert end(70) == ("stop", 70, [70])
    assert end(257) == ("stop", None, [257])
