"""The `llm` backend: modelport's engine in a Triton repository, over generate, infer and gRPC."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers.server_proc import free_port, start_server, stop_server
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.entrypoints.kserve.embedded import EmbeddedServer

CONFIG = """
name: "{name}"
backend: "llm"
max_batch_size: 0
model_transaction_policy {{ decoupled: {decoupled} }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }}
]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }} ]
parameters {{ key: "model" value: {{ string_value: "{model}" }} }}
parameters {{ key: "kv_cache_memory" value: {{ string_value: "8388608" }} }}
parameters {{ key: "max_model_len" value: {{ string_value: "256" }} }}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmrepo")
    model_dir = make_tiny_llama_dir(root / "weights")
    repo = root / "models"
    for name, dec in (("tiny_llm", "false"), ("tiny_llm_stream", "true")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(
            CONFIG.format(name=name, decoupled=dec, model=model_dir))
    bad = repo / "bad_llm"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text(
        CONFIG.format(name="bad_llm", decoupled="false", model=root / "missing"))
    srv = EmbeddedServer([repo], exit_on_error=False).start()  # bad_llm fails on purpose
    ref = LLM(str(model_dir), kv_cache_memory=8 << 20, max_model_len=256)
    yield srv, ref
    srv.stop()


def expected(ref, prompt: str, n: int) -> str:
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return ref.generate([prompt], p, use_tqdm=False)[0].outputs[0].text


def test_generate_extension(setup) -> None:
    srv, ref = setup
    r = httpx.post(f"http://{srv.http_url}/v2/models/tiny_llm/generate", json={
        "text_input": "hello", "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "tiny_llm"
    assert doc["text_output"] == expected(ref, "hello", 6)


def test_generate_takes_top_level_fields_as_parameters(setup) -> None:
    """Triton: fields beside text_input that are not inputs are passed as parameters."""
    srv, ref = setup
    url = f"http://{srv.http_url}/v2/models/tiny_llm/generate"
    r = httpx.post(url, json={"text_input": "hello", "max_tokens": 6, "temperature": 0,
                              "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == expected(ref, "hello", 6)
    r = httpx.post(url, json={"text_input": "hello", "max_tokens": 6, "temperature": 5.0,
                              "seed": 1, "ignore_eos": True, "parameters": {"temperature": 0}})
    assert r.json()["text_output"] == expected(ref, "hello", 6)  # "parameters" wins: greedy
    r = httpx.post(url, json={"text_input": "hello", "stop": ["x"]})
    assert r.status_code == 400
    assert "field 'stop' is not an input of model 'tiny_llm'" in r.json()["error"]


def test_generate_stream_deltas_concatenate(setup) -> None:
    srv, ref = setup
    with httpx.stream("POST", f"http://{srv.http_url}/v2/models/tiny_llm_stream/generate_stream",
                      json={"text_input": "abc", "parameters": {"max_tokens": 8, "temperature": 0,
                                                                 "ignore_eos": True}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2
    assert "".join(e["text_output"] for e in events) == expected(ref, "abc", 8)


def test_stream_false_on_a_decoupled_model_is_one_response(setup) -> None:
    """vLLM's Triton backend example, `generate` with "stream": false on a decoupled model:
    one final response holding the whole text (it sent one per token, which generate refuses)."""
    srv, ref = setup
    body = {"text_input": "abc", "parameters": {"stream": False, "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True}}
    r = httpx.post(f"http://{srv.http_url}/v2/models/tiny_llm_stream/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == expected(ref, "abc", 8)
    body["parameters"]["stream"] = "maybe"
    r = httpx.post(f"http://{srv.http_url}/v2/models/tiny_llm_stream/generate", json=body)
    assert r.status_code == 400 and "stream must be a boolean" in r.json()["error"]


def _text_and_max_tokens(client, text: bytes, max_tokens: int) -> tuple:  # noqa: ANN001
    """tritonclient (http or grpc) inputs: the prompt and a max_tokens tensor."""
    t = client.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text], dtype=np.object_))
    mt = client.InferInput("max_tokens", [1], "INT32")
    mt.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return t, mt


def test_tritonclient_http_infer_with_max_tokens_tensor(setup) -> None:
    srv, ref = setup
    c = httpclient.InferenceServerClient(srv.http_url)
    text, mt = _text_and_max_tokens(httpclient, b"xyz", 5)
    # greedy through request parameters, length through the tensor
    r = c.infer("tiny_llm", [text, mt], parameters={"temperature": 0, "ignore_eos": True})
    out = r.as_numpy("text_output").reshape(-1)[0]
    out = out.decode() if isinstance(out, bytes) else out
    assert out == expected(ref, "xyz", 5)


def test_grpc_stream_infer(setup) -> None:
    srv, ref = setup
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"stream me"], dtype=np.object_))
    c.async_stream_infer("tiny_llm_stream", [text], request_id="s1",
                         parameters={"max_tokens": 6, "temperature": 0, "ignore_eos": True},
                         enable_empty_final_response=False)
    pieces = []
    while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    c.stop_stream()
    assert "".join(pieces) == expected(ref, "stream me", 6)


def test_bad_llm_config_is_a_load_error_others_serve(setup) -> None:
    srv, _ = setup
    index = httpx.post(f"http://{srv.http_url}/v2/repository/index", json={}).json()
    bad = [m for m in index if m["name"] == "bad_llm"][0]
    assert bad["state"] == "UNAVAILABLE" and "not found" in bad["reason"]
    r = httpx.post(f"http://{srv.http_url}/v2/models/tiny_llm/generate",
                   json={"text_input": "ok", "parameters": {"max_tokens": 300}})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]
    r = httpx.post(f"http://{srv.http_url}/v2/models/tiny_llm/generate",
                   json={"text_input": "ok", "parameters": {"max_tokens": 2}})
    assert r.status_code == 200


BAD_MAX_TOKENS = "max_tokens must be an integer in [1, 2^31), got -4"


@pytest.mark.parametrize("model", ["tiny_llm", "tiny_llm_stream"])
@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_bad_sampling_value_is_400(setup, model, endpoint) -> None:
    """The user's report: max_tokens -4 was a 500 "ValueError: ..." on generate_stream."""
    srv, _ = setup
    url = f"http://{srv.http_url}/v2/models/{model}/{endpoint}"
    cases = [
        ({"text_input": "Hi", "max_tokens": -4}, BAD_MAX_TOKENS),  # the input tensor
        ({"text_input": "Hi", "parameters": {"max_tokens": -4}}, BAD_MAX_TOKENS),
        ({"text_input": "Hi", "parameters": {"temperature": -1}}, "temperature must be >= 0, got -1.0"),
        ({"text_input": "Hi", "parameters": {"top_k": "many"}},
         "top_k must be an integer, got 'many'"),
        ({"text_input": "Hi", "parameters": {"top_k": 2.5}},
         "top_k must be an integer, got 2.5"),
        ({"text_input": "Hi", "parameters": {"ignore_eos": "sure"}},
         "ignore_eos must be a boolean, got 'sure'"),
        ({"text_input": "Hi", "parameters": {"stop": 7}},
         "stop must be a string or a list of strings, got 7"),
        ({"text_input": "Hi", "parameters": {"stop": {"a": 1}}},
         "stop must be a string or a list of strings, got {'a': 1}"),
    ]  # fmt: skip
    for body, message in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json() == {"error": f"model '{model}': {message}"}, body
    # a parameter named like an input is that input (Triton's generate): its JSON value is
    # checked as the input's datatype
    for bad in ("many", 2.5):
        r = httpx.post(url, json={"text_input": "Hi", "parameters": {"max_tokens": bad}})
        assert r.status_code == 400
        assert r.json() == {"error": "'data' of INT32 input 'max_tokens' must hold integers, "
                                     f"got {bad!r}"}
    ok = {"text_input": "Hi", "parameters": {"max_tokens": 2, "ignore_eos": "true"}}
    assert httpx.post(url, json=ok).status_code == 200


def test_bad_sampling_value_over_grpc(setup) -> None:
    srv, _ = setup
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    text, mt = _text_and_max_tokens(grpcclient, b"Hi", -4)
    with pytest.raises(InferenceServerException) as info:
        c.infer("tiny_llm", [text, mt])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == f"model 'tiny_llm': {BAD_MAX_TOKENS}"
    # a stream carries errors as messages (no status there): the same text, no "ValueError"
    results: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer("tiny_llm_stream", [text, mt], request_id="bad")
    result, error = results.get(timeout=60)
    c.stop_stream()
    assert result is None and error.message() == f"model 'tiny_llm_stream': {BAD_MAX_TOKENS}"


@pytest.mark.parametrize("model,endpoint", [("tiny_llm", "generate"),
                                            ("tiny_llm_stream", "generate_stream")])  # fmt: skip
def test_engine_failure_stays_500(setup, monkeypatch, model, endpoint) -> None:
    srv, _ = setup
    llm = srv.manager.get(model).backend.llm

    def dead(*args, **kwargs):
        raise RuntimeError("engine core died")

    monkeypatch.setattr(llm, "generate", dead)
    r = httpx.post(f"http://{srv.http_url}/v2/models/{model}/{endpoint}",
                   json={"text_input": "Hi", "parameters": {"max_tokens": 2}})  # fmt: skip
    assert r.status_code == 500
    assert r.json() == {"error": f"model '{model}': RuntimeError: engine core died"}


def test_repository_llm_is_served_on_v1_too(setup, tmp_path) -> None:
    """`modelport serve --model-repository` answers OpenAI requests for its llm models. Two of
    them load at once in a fresh process (transformers' first import raced in two threads)."""
    import openai

    srv, ref = setup
    repo = tmp_path / "models"
    for name in ("tiny_llm", "tiny_llm_stream"):
        (repo / name / "1").mkdir(parents=True)
        cfg = Path(srv.args.model_repository[0]) / name / "config.pbtxt"
        (repo / name / "config.pbtxt").write_text(cfg.read_text())
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model-repository", str(repo),
            "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    proc, base = start_server(argv, tmp_path / "serve.log", timeout=120,
                              ready_path="/v2/models/tiny_llm/ready")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x")
        assert sorted(m.id for m in client.models.list().data) == ["tiny_llm", "tiny_llm_stream"]
        out = client.completions.create(model="tiny_llm", prompt="hello", max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected(ref, "hello", 6)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
    finally:
        stop_server(proc)


def test_max_num_seqs_parameter_sizes_the_queue(tmp_path) -> None:
    """The backend hands the engine as many requests as it runs at once: max_num_seqs from
    the config's parameters, else the engine's default (256)."""
    from types import SimpleNamespace

    from modelport.repository.backends.llm import LLMBackend
    from modelport.repository.errors import ModelConfigError

    def backend(params: dict[str, str]) -> LLMBackend:
        io = SimpleNamespace(name="text_input"), SimpleNamespace(name="text_output")
        values = {k: SimpleNamespace(string_value=v) for k, v in params.items()}
        config = SimpleNamespace(name="m", input=[io[0]], output=[io[1]], instance_group=[],
                                 parameters=values)
        return LLMBackend(SimpleNamespace(config=config, version_dir=tmp_path))

    assert backend({"model": "/x", "device": "cpu"}).num_instances == 256
    assert backend({"model": "/x", "max_num_seqs": "12"}).num_instances == 12
    with pytest.raises(ModelConfigError, match="max_num_seqs' has invalid value 'many'"):
        backend({"model": "/x", "max_num_seqs": "many"})


def test_model_parameter_relative_to_the_version_folder_else_as_given(tmp_path) -> None:
    """`parameters { key: "model" ... }`: a relative path that exists under the version folder
    is that folder; any other name is kept as --model takes it, so "SmolLM2-135M-Instruct"
    is the embedded default and "org/name" an id in the local HF cache (it was resolved
    under the version folder and the model failed to load)."""
    from types import SimpleNamespace

    from modelport.repository.backends.llm import _engine_args

    def model(value: str) -> str:
        config = SimpleNamespace(name="m", parameters={"model": SimpleNamespace(string_value=value)})
        return _engine_args(SimpleNamespace(config=config, version_dir=tmp_path)).model

    (tmp_path / "weights").mkdir()
    assert model("weights") == str((tmp_path / "weights").resolve())
    assert model("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model("org/name") == "org/name"
    assert model("/abs/path") == "/abs/path"
