"""Embedding requests through a repository written for Triton's vLLM backend: a model whose
model.json makes it a pooling model takes the backend's ``embedding_request`` input (JSON:
the text or token ids, and pooling_params) and answers one response with the vector as JSON
in ``text_output``, the same vector ``LLM(runner="pooling").embed`` gives; each model refuses
the task it does not do, in that backend's words, and bad requests fail alone."""

from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM
from modelport.entrypoints.kserve.embedded import EmbeddedServer

CONFIG = 'backend: "vllm"\ninstance_group [ { count: 1, kind: KIND_MODEL } ]\n'
SMALL = {"enforce_eager": True, "max_model_len": 128, "kv_cache_memory_bytes": 4 << 20}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_embed")
    weights = make_tiny_llama_dir(root / "weights")
    mrl = make_tiny_llama_dir(root / "mrl")
    cfg = json.loads((mrl / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [16, 32]
    (mrl / "config.json").write_text(json.dumps(cfg))
    repo = root / "models"
    models = {"vllm_embed": {"model": str(weights), "runner": "pooling", **SMALL},
              "vllm_mrl": {"model": str(mrl), "task": "embed", **SMALL},
              "vllm_gen": {"model": str(weights), **SMALL}}
    for name, engine in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(CONFIG)
        (repo / name / "1" / "model.json").write_text(json.dumps(engine))
    srv = EmbeddedServer([repo]).start()
    ref = LLM(str(weights), runner="pooling", max_model_len=128, kv_cache_memory=4 << 20)
    yield srv, ref
    srv.stop()


def _grpc(srv, model: str, request: dict | str, **flags: bool) -> list:
    """Triton's own test client: an empty text_input and the embedding_request, on a
    stream; every response until the final one."""
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b""], dtype=np.object_))
    emb = grpcclient.InferInput("embedding_request", [1], "BYTES")
    doc = request if isinstance(request, str) else json.dumps(request)
    emb.set_data_from_numpy(np.array([doc.encode()], dtype=np.object_))
    tensors = [text, emb]
    for name, value in flags.items():
        t = grpcclient.InferInput(name, [1], "BOOL")
        t.set_data_from_numpy(np.array([value], dtype=bool))
        tensors.append(t)
    c.async_stream_infer(model, tensors, request_id="e1")
    out = []
    try:
        while True:
            result, error = results.get(timeout=60)
            out.append(error if error is not None else result)
            if error is not None or result.get_response().parameters[
                    "triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()
    return out


def _close(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def test_text_and_token_ids_give_the_engines_vector_over_grpc(setup) -> None:
    srv, ref = setup
    want = ref.embed("hello world", use_tqdm=False)[0]
    (resp,) = _grpc(srv, "vllm_embed", {"input": "hello world", "pooling_params": {}},
                    return_num_input_tokens=True, return_num_output_tokens=True)
    assert not isinstance(resp, Exception), resp
    vec = json.loads(resp.as_numpy("text_output")[0].decode())
    assert all(isinstance(v, float) for v in vec) and len(vec) == 64
    _close(vec, want.outputs.embedding)
    assert int(resp.as_numpy("num_input_tokens")[0]) == len(want.prompt_token_ids)
    assert int(resp.as_numpy("num_output_tokens")[0]) == 0
    (resp,) = _grpc(srv, "vllm_embed", {"input": want.prompt_token_ids})
    _close(json.loads(resp.as_numpy("text_output")[0].decode()), want.outputs.embedding)
    assert resp.as_numpy("num_input_tokens") is None  # only when asked for


def test_over_http_generate_and_matryoshka_dimensions(setup) -> None:
    """The generate extension (the HTTP way to a decoupled model) carries it as well."""
    srv, _ = setup
    body = {"text_input": "", "embedding_request": json.dumps(
        {"input": "x y z", "pooling_params": {"dimensions": [16]}})}
    r = httpx.post(f"http://{srv.http_url}/v2/models/vllm_mrl/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    vec = json.loads(r.json()["text_output"])
    assert len(vec) == 16 and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4  # cut, normalized
    # the same request on a model without matryoshka dimensions: the engine's 400
    r = httpx.post(f"http://{srv.http_url}/v2/models/vllm_embed/generate", json=body,
                   timeout=60)
    assert r.status_code == 400 and "does not support matryoshka" in r.json()["error"]


def test_each_model_refuses_the_task_it_does_not_do(setup) -> None:
    srv, _ = setup
    (err,) = _grpc(srv, "vllm_gen", {"input": "hi", "pooling_params": {}})
    assert "Model vllm_gen does not support 'embed' request" in str(err)
    r = httpx.post(f"http://{srv.http_url}/v2/models/vllm_embed/generate",
                   json={"text_input": "hi", "parameters": {"max_tokens": 2}}, timeout=30)
    assert r.status_code == 400
    assert "Model vllm_embed does not support 'generate' request" in r.json()["error"]
    # both keep serving their own task
    r = httpx.post(f"http://{srv.http_url}/v2/models/vllm_gen/generate",
                   json={"text_input": "hi", "parameters": {"max_tokens": 2}}, timeout=30)
    assert r.status_code == 200, r.text
    (resp,) = _grpc(srv, "vllm_embed", {"input": "hi"})
    assert len(json.loads(resp.as_numpy("text_output")[0].decode())) == 64


@pytest.mark.parametrize("request_doc, message", [
    ("{not json", "embedding_request is not valid JSON"),
    ({"pooling_params": {}}, "must be a JSON object with an 'input'"),
    ({"input": []}, "'input' must be a string or a non-empty list of token ids"),
    ({"input": [1, "a"]}, "'input' must be a string or a non-empty list of token ids"),
    ({"input": "hi", "pooling_params": [16]}, "'pooling_params' must be a JSON object"),
    ({"input": "hi", "pooling_params": {"dimensions": []}}, "'dimensions' is an empty list"),
    ({"input": [10 ** 9]}, "prompt token ids must be in [0, 259)"),
    ({"input": "word " * 200}, "longer than the maximum model length"),
])
def test_bad_embedding_requests_fail_alone(setup, request_doc, message) -> None:
    srv, _ = setup
    doc = request_doc if isinstance(request_doc, str) else json.dumps(request_doc)
    r = httpx.post(f"http://{srv.http_url}/v2/models/vllm_embed/generate",
                   json={"text_input": "", "embedding_request": doc}, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    (err,) = _grpc(srv, "vllm_embed", request_doc)  # a stream's error response
    assert isinstance(err, Exception) and message in str(err), err
    (ok,) = _grpc(srv, "vllm_embed", {"input": "still here"})
    assert not isinstance(ok, Exception), ok
