"""A repository written for Triton's vLLM backend (`backend: "vllm"`, `<version>/model.json`)
served unchanged: its completed config, the stream / exclude_input_in_output rules, the
sampling_parameters input, the additional outputs, and its errors."""

from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from helpers.lora_adapters import make_adapter, merge
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.entrypoints.kserve.embedded import EmbeddedServer

# what Triton's vLLM backend tutorial writes: nothing but the backend and the instances
CONFIG = 'backend: "vllm"\ninstance_group [ { count: 1, kind: KIND_MODEL } ]\n'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllmrepo")
    weights = make_tiny_llama_dir(root / "weights")
    repo = root / "models"
    engine = {"model": str(weights), "disable_log_requests": True, "enforce_eager": True,
              "gpu_memory_utilization": 0.5, "max_model_len": 256,
              "kv_cache_memory_bytes": 8 << 20}
    models = {"vllm_model": (CONFIG, engine),
              "no_json": (CONFIG, None),
              "bad_param": (CONFIG + 'parameters { key: "max_model_len" value: { string_value: '
                            '"64" } }\n', engine),
              "bad_arg": (CONFIG, {**engine, "cpu_offload_gb": 4}),
              "vllm_lora": (CONFIG, {**engine, "enable_lora": "true", "max_lora_rank": 8})}
    for name, (cfg, args) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
        if args is not None:
            (repo / name / "1" / "model.json").write_text(json.dumps(args))
    adapter = make_adapter(root / "sql", rank=8, alpha=16, seed=1)
    (repo / "vllm_lora" / "1" / "multi_lora.json").write_text(json.dumps({
        "sql": str(root / "sql"), "other": str(root / "sql")}))
    srv = EmbeddedServer([repo], exit_on_error=False).start()  # the bad ones fail on purpose
    ref = LLM(str(weights), kv_cache_memory=8 << 20, max_model_len=256)
    srv.merged = LLM(str(merge(weights, root / "merged", adapter)), kv_cache_memory=8 << 20,
                     max_model_len=256)
    yield srv, ref
    srv.stop()


def greedy(ref, prompt: str, n: int) -> str:
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return ref.generate([prompt], p, use_tqdm=False)[0].outputs[0].text


def url(srv, endpoint: str, model: str = "vllm_model") -> str:
    return f"http://{srv.http_url}/v2/models/{model}/{endpoint}"


def test_config_is_completed_as_the_vllm_backend_does(setup) -> None:
    srv, _ = setup
    cfg = httpx.get(url(srv, "config")).json()
    inputs = {i["name"]: (i["data_type"], i.get("optional", False)) for i in cfg["input"]}
    assert inputs["text_input"] == ("TYPE_STRING", False)
    assert inputs["stream"] == inputs["exclude_input_in_output"] == ("TYPE_BOOL", True)
    assert inputs["sampling_parameters"] == ("TYPE_STRING", True)
    assert {f"return_{o}" for o in ("finish_reason", "cumulative_logprob", "logprobs",
                                    "num_input_tokens", "num_output_tokens")} <= set(inputs)
    assert [o["name"] for o in cfg["output"]] == [
        "text_output", "finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
        "num_output_tokens"]
    assert cfg["model_transaction_policy"]["decoupled"] is True
    assert cfg.get("max_batch_size", 0) == 0


def test_generate_prepends_the_prompt_unless_excluded(setup) -> None:
    """The tutorial's request: parameters as strings are converted to the fields' types;
    without streaming the text starts with the prompt unless exclude_input_in_output."""
    srv, ref = setup
    params = {"max_tokens": "6", "temperature": "0", "ignore_eos": "true"}
    r = httpx.post(url(srv, "generate"), json={"text_input": "hello", "parameters": params})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == "hello" + greedy(ref, "hello", 6)
    r = httpx.post(url(srv, "generate"), json={"text_input": "hello", "parameters": params,
                                               "exclude_input_in_output": True})
    assert r.json()["text_output"] == greedy(ref, "hello", 6)


def test_generate_stream_sends_deltas(setup) -> None:
    srv, ref = setup
    body = {"text_input": "abc", "stream": True,
            "parameters": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", url(srv, "generate_stream"), json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2
    assert "".join(e["text_output"] for e in events) == greedy(ref, "abc", 8)
    # streaming with the prompt in the output is refused, as the vLLM backend does
    body["exclude_input_in_output"] = False
    r = httpx.post(url(srv, "generate_stream"), json=body)
    assert r.status_code == 400
    assert "When streaming, `exclude_input_in_output` = False is not allowed." in r.text


def test_defaults_are_vllms_sampling_params(setup) -> None:
    """No max_tokens: vLLM's 16 (not generation_config.json's), as the backend builds
    SamplingParams from the request alone."""
    srv, _ = setup
    r = httpx.post(url(srv, "generate"), json={
        "text_input": "hi", "exclude_input_in_output": True, "return_num_output_tokens": True,
        "parameters": {"ignore_eos": True}})
    assert r.status_code == 200, r.text
    assert r.json()["num_output_tokens"] == 16


def _grpc_stream(srv, inputs: dict) -> list:
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, value in inputs.items():
        kind = "BOOL" if isinstance(value, bool) else "BYTES"
        t = grpcclient.InferInput(name, [1], kind)
        t.set_data_from_numpy(np.array([value], dtype=bool if kind == "BOOL" else np.object_))
        tensors.append(t)
    c.async_stream_infer("vllm_model", tensors, request_id="r1")
    out = []
    while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        out.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    c.stop_stream()
    return out


def test_sampling_parameters_input_and_additional_outputs_over_grpc(setup) -> None:
    """The backend's documented client: sampling_parameters as a JSON string tensor, every
    return_* output asked for, one response per piece of text."""
    srv, ref = setup
    sp = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1,
          "top_p": None}  # nulls are dropped
    responses = _grpc_stream(srv, {
        "text_input": b"stream me", "stream": True,
        "sampling_parameters": json.dumps(sp).encode(),
        **{f"return_{o}": True for o in ("finish_reason", "cumulative_logprob", "logprobs",
                                         "num_input_tokens", "num_output_tokens")}})
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
    assert text == greedy(ref, "stream me", 6)
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in responses]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {"None"}
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in responses) == 6
    n_prompt = len(ref.get_tokenizer().encode("stream me"))
    assert {int(r.as_numpy("num_input_tokens")[0]) for r in responses} == {n_prompt}
    logprobs = [e for r in responses for e in json.loads(r.as_numpy("logprobs")[0])]
    assert len(logprobs) == 6
    assert all(lp["rank"] == 1 for step in logprobs for lp in step.values())  # greedy picks
    total = sum(lp["logprob"] for step in logprobs for lp in step.values())
    assert float(responses[-1].as_numpy("cumulative_logprob")[0]) == pytest.approx(total, abs=1e-4)


def test_request_errors_are_400_and_others_serve(setup) -> None:
    srv, _ = setup
    cases = [
        ({"parameters": {"max_tokens": 2, "frobnicate": 1}},
         "unknown sampling parameter(s): frobnicate"),
        ({"parameters": {"max_tokens": 2, "lora_name": "sql"}}, "LoRA feature is not enabled."),
        ({"parameters": {"max_tokens": "lots"}}, "max_tokens must be an integer, got 'lots'"),
        ({"sampling_parameters": "{not json", "parameters": {}},
         "sampling_parameters is not valid JSON"),
        ({"image": "aGk=", "parameters": {}}, "images are not supported by this model"),
    ]  # fmt: skip
    for extra, message in cases:
        r = httpx.post(url(srv, "generate"), json={"text_input": "Hi", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert message in r.json()["error"], (extra, r.text)
    # one the engine refuses (longer than max_model_len 256): its message, 400
    r = httpx.post(url(srv, "generate"), json={"text_input": "Hi " * 300, "parameters": {}})
    assert r.status_code == 400, r.text
    assert "model 'vllm_model'" in r.json()["error"] and "256" in r.json()["error"], r.text
    r = httpx.post(url(srv, "generate"), json={"text_input": "Hi", "parameters": {"max_tokens": 2}})
    assert r.status_code == 200


def test_bad_repositories_are_load_errors(setup) -> None:
    srv, _ = setup
    index = {m["name"]: m for m in httpx.post(f"http://{srv.http_url}/v2/repository/index",
                                              json={}).json()}
    assert index["vllm_model"]["state"] == "READY"
    assert "'model.json' containing vllm engine args must be provided" in index["no_json"]["reason"]
    assert "unknown vllm backend parameter 'max_model_len'" in index["bad_param"]["reason"]
    assert "cpu_offload_gb" in index["bad_arg"]["reason"]
    assert all(index[m]["state"] == "UNAVAILABLE" for m in ("no_json", "bad_param", "bad_arg"))


def test_lora_name_picks_an_adapter_of_multi_lora_json(setup) -> None:
    """model.json's enable_lora with multi_lora.json (name -> folder): lora_name runs that
    adapter (the same text as the adapter merged into the weights); an unknown one is 400."""
    srv, ref = setup
    body = {"text_input": "hello", "exclude_input_in_output": True,
            "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    plain = httpx.post(url(srv, "generate", "vllm_lora"), json=body).json()["text_output"]
    assert plain == greedy(ref, "hello", 6)
    body["parameters"]["lora_name"] = "sql"
    r = httpx.post(url(srv, "generate", "vllm_lora"), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == greedy(srv.merged, "hello", 6) != plain
    body["parameters"]["lora_name"] = "chat"
    r = httpx.post(url(srv, "generate", "vllm_lora"), json=body)
    assert r.status_code == 400
    assert "LoRA chat is not supported, we currently support ['sql', 'other']" in r.text


def test_inputs_given_inside_parameters_as_triton_maps_them(setup) -> None:
    """The request of Triton's vLLM tutorials: stream, exclude_input_in_output and return_*
    inside "parameters" are the model's inputs there (Triton's generate maps a parameter
    named like an input to that input), the rest sampling parameters."""
    srv, ref = setup
    r = httpx.post(url(srv, "generate"), json={"text_input": "hello", "parameters": {
        "stream": False, "temperature": 0, "max_tokens": 6, "ignore_eos": True,
        "exclude_input_in_output": True, "return_num_output_tokens": True}})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == greedy(ref, "hello", 6)
    assert r.json()["num_output_tokens"] == 6
    r = httpx.post(url(srv, "generate"), json={"text_input": "hello", "stream": False,
                                               "parameters": {"stream": False}})
    assert r.status_code == 400
    assert "input 'stream' is given both as a field and in 'parameters'" in r.text
