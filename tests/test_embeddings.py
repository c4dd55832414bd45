"""Embeddings, vLLM's way, from a generative decoder (a tiny random Llama / Qwen2 built here).

- ``LLM(runner="pooling")`` (also ``task="embed"``, ``convert="embed"``): ``embed`` returns the
  final-norm hidden state of the LAST prompt token, L2-normalized, equal to transformers'
  own forward; MEAN / CLS pooling and ``normalize=False`` likewise; chunked prefill (a small
  max_num_batched_tokens) and batching change nothing; ``encode`` returns the same as a tensor;
- ``dimensions`` only for a model whose config says matryoshka (vLLM's rule and words);
- generate on a pooling model, embed / encode on a generative one: vLLM's errors;
- ``modelport serve --task embed`` serves /v1/embeddings (float and base64) and /pooling, and
  answers /v1/completions and /v1/chat/completions with vLLM's 400.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, PoolingParams

PROMPTS = ["hello world", "an embedding of a much longer prompt, " * 3, "x", "short one"]
SMALL = dict(max_model_len=256, kv_cache_memory=8 << 20, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("emb") / "llama")


@pytest.fixture(scope="module")
def matryoshka_dir(tmp_path_factory):
    path = make_tiny_llama_dir(tmp_path_factory.mktemp("emb") / "mrl")
    cfg = json.loads((path / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [16, 32]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), runner="pooling", **SMALL)


def _hidden(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' final-norm hidden states [T, H] (the reference)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32,
                                      local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def test_embed_is_the_last_tokens_normalized_hidden_state(llm, model_dir) -> None:
    outs = llm.embed(PROMPTS, use_tqdm=False)
    assert [len(o.prompt_token_ids) for o in outs][1] > SMALL["max_num_batched_tokens"]
    for prompt, o in zip(PROMPTS, outs):
        assert o.finished and o.prompt_token_ids == llm.get_tokenizer().encode(prompt)
        ref = F.normalize(_hidden(model_dir, o.prompt_token_ids)[-1], dim=-1)
        _close(o.outputs.embedding, ref)
        assert isinstance(o.outputs.embedding[0], float)
    assert len({o.request_id for o in outs}) == len(outs)
    assert llm.llm_engine.core.kv.usage == 0.0  # every request's blocks are back


def test_a_batch_equals_one_by_one_and_encode_equals_embed(llm) -> None:
    batch = llm.embed(PROMPTS, use_tqdm=False)
    for prompt, o in zip(PROMPTS, batch):
        _close(llm.embed(prompt, use_tqdm=False)[0].outputs.embedding, o.outputs.embedding, 1e-5)
    enc = llm.encode(PROMPTS, use_tqdm=False, pooling_task="embed")
    for e, o in zip(enc, batch):
        assert isinstance(e.outputs.data, torch.Tensor)
        _close(e.outputs.data, o.outputs.embedding, 1e-6)
    # token ids and prompt dicts, and truncate_prompt_tokens keeps the last k
    ids = batch[1].prompt_token_ids
    _close(llm.embed({"prompt_token_ids": ids}, use_tqdm=False)[0].outputs.embedding,
           batch[1].outputs.embedding, 1e-5)
    cut = llm.embed(PROMPTS[1], truncate_prompt_tokens=5, use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-5:]


def test_prefix_cache_hit_gives_the_same_vector(llm) -> None:
    assert llm.llm_engine.config.cache_config.enable_prefix_caching  # LAST pooling keeps it
    long = PROMPTS[1] * 2
    first = llm.embed(long, use_tqdm=False)[0]
    hits = llm.llm_engine.core.kv.hits
    again = llm.embed(long, use_tqdm=False)[0]
    assert llm.llm_engine.core.kv.hits > hits
    _close(again.outputs.embedding, first.outputs.embedding, 1e-5)


def test_unnormalized_is_the_raw_hidden_state(llm, model_dir) -> None:
    o = llm.embed(PROMPTS[0], PoolingParams(normalize=False), use_tqdm=False)[0]
    _close(o.outputs.embedding, _hidden(model_dir, o.prompt_token_ids)[-1])
    assert abs(torch.tensor(o.outputs.embedding).norm().item() - 1) > 1e-2


@pytest.mark.parametrize("kw,kind", [
    ({"pooler_config": {"pooling_type": "MEAN"}}, "MEAN"),
    ({"task": "embed", "override_pooler_config": {"pooling_type": "mean"}}, "MEAN"),
    ({"convert": "embed", "pooler_config": {"pooling_type": "CLS"}}, "CLS"),
])
def test_mean_and_cls_pooling(model_dir, kw, kind) -> None:
    args = {**SMALL, **kw}
    if "convert" not in kw and "task" not in kw:
        args["runner"] = "pooling"
    llm = LLM(str(model_dir), **args)
    # vLLM: prefix caching off unless LAST pooling (every prompt token must be computed)
    assert not llm.llm_engine.config.cache_config.enable_prefix_caching
    outs = llm.embed(PROMPTS, use_tqdm=False)  # chunked: the long prompt takes 4 steps
    for o in outs:
        h = _hidden(model_dir, o.prompt_token_ids)
        ref = h.mean(dim=0) if kind == "MEAN" else h[0]
        _close(o.outputs.embedding, F.normalize(ref, dim=-1))


def test_qwen2(tmp_path) -> None:
    path = make_tiny_qwen2_dir(tmp_path / "qwen2")
    llm = LLM(str(path), runner="pooling", **SMALL)
    for o in llm.embed(PROMPTS, use_tqdm=False):
        _close(o.outputs.embedding, F.normalize(_hidden(path, o.prompt_token_ids)[-1], dim=-1))


def test_dimensions_follow_vllms_matryoshka_rule(llm, matryoshka_dir) -> None:
    name = llm.llm_engine.config.served_model_name
    with pytest.raises(ValueError, match=f'Model "{name}" does not support matryoshka '
                                         "representation, changing output dimensions"):
        llm.embed("hi", PoolingParams(dimensions=16), use_tqdm=False)
    mrl = LLM(str(matryoshka_dir), runner="pooling", **SMALL)
    o = mrl.embed(PROMPTS[0], PoolingParams(dimensions=16), use_tqdm=False)[0]
    full = _hidden(matryoshka_dir, o.prompt_token_ids)[-1]
    _close(o.outputs.embedding, F.normalize(full[:16], dim=-1))  # truncated, then normalized
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        mrl.embed("hi", PoolingParams(dimensions=20), use_tqdm=False)
    assert len(mrl.embed("hi", use_tqdm=False)[0].outputs.embedding) == 64


def test_one_runner_kind_per_engine_in_vllms_words(llm, model_dir) -> None:
    with pytest.raises(ValueError, match=r"LLM\.generate\(\) is only supported for generative "
                                         r"models\. Try passing `--runner generate`"):
        llm.generate("hi")
    with pytest.raises(ValueError, match=r"LLM\.chat\(\) is only supported for generative"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="takes pooling requests only"):
        from modelport import SamplingParams

        llm.llm_engine.add_request("g", "hi", SamplingParams(max_tokens=2))
    gen = LLM(str(model_dir), **SMALL)
    with pytest.raises(ValueError, match=r"Embedding API is not supported by this model\. "
                                         r"Try converting the model using `--convert embed`"):
        gen.embed("hi")
    with pytest.raises(ValueError, match=r"LLM\.encode\(\) is only supported for pooling models"):
        gen.encode("hi")
    assert gen.generate("hi", use_tqdm=False)[0].outputs[0].token_ids  # unchanged
    with pytest.raises(ValueError, match="pooling_type 'SUM' is not supported"):
        LLM(str(model_dir), runner="pooling", pooler_config={"pooling_type": "SUM"}, **SMALL)
    with pytest.raises(ValueError, match="runner 'bogus' is not supported"):
        LLM(str(model_dir), runner="bogus", **SMALL)
    with pytest.raises(ValueError, match="task 'classify' is not supported"):
        LLM(str(model_dir), task="classify", **SMALL)
    with pytest.raises(ValueError, match="pooler_config is only for pooling models"):
        LLM(str(model_dir), pooler_config={"pooling_type": "MEAN"}, **SMALL)
    with pytest.raises(ValueError, match="longer than the maximum model length of 256"):
        llm.embed("y" * 300, use_tqdm=False)
    assert len(llm.embed("y" * 256, use_tqdm=False)[0].outputs.embedding) == 64  # fits exactly


def test_cli_flags_resolve_the_runner() -> None:
    import argparse

    from modelport.engine.arg_utils import EngineArgs

    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(p.parse_args(
        ["--runner", "pooling", "--pooler-config", '{"pooling_type": "MEAN"}']))
    assert args.runner == "pooling" and args.pooler_config == {"pooling_type": "MEAN"}
    assert EngineArgs.from_cli_args(p.parse_args(["--task", "embed"])).task == "embed"


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("embsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(model_dir),
            "--served-model-name", "tiny", "--task", "embed", "--max-model-len", "256",
            "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "32"]
    with serving(argv, log, timeout=180) as url:
        yield url




def test_server_embeddings_equal_the_offline_llm(base, llm) -> None:
    want = [o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)]
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    r = _post(base, "/v1/embeddings", {"model": "tiny", "input": PROMPTS, "user": "u"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == list(range(len(PROMPTS)))
    assert all(d["object"] == "embedding" for d in body["data"])
    for d, w in zip(body["data"], want):
        _close(d["embedding"], w, 1e-5)
    n = sum(len(llm.get_tokenizer().encode(p)) for p in PROMPTS)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == n
    for inp, expect in ((PROMPTS[0], want[:1]), (ids, want[:1]), ([ids, ids], want[:1] * 2)):
        data = _post(base, "/v1/embeddings", {"input": inp}).json()["data"]
        assert len(data) == len(expect)
        for d, w in zip(data, expect):
            _close(d["embedding"], w, 1e-5)
    b64 = _post(base, "/v1/embeddings", {"input": PROMPTS[2], "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    _close(struct.unpack(f"<{len(raw) // 4}f", raw), want[2], 1e-6)
    pooled = _post(base, "/pooling", {"input": PROMPTS[3]}).json()["data"][0]
    assert pooled["object"] == "pooling"
    _close(pooled["data"], want[3], 1e-5)


def test_server_batch_encoded_off_the_loop_equals_the_offline_llm(base, llm) -> None:
    """Many inputs, ~10,000 characters together: encoded on the tokenizer thread in one hop
    (AsyncLLM.encode_many_async), the same vectors and token counts as offline."""
    texts = [f"{PROMPTS[i % len(PROMPTS)]} Item {i}, with some more words to make it longer."
             for i in range(160)]
    assert sum(map(len, texts)) >= 8192
    want = [o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)]
    r = _post(base, "/v1/embeddings", {"model": "tiny", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    for d, w in zip(body["data"], want, strict=True):
        _close(d["embedding"], w, 1e-5)
    n = sum(len(llm.get_tokenizer().encode(t)) for t in texts)
    assert body["usage"]["prompt_tokens"] == n


def test_server_chat_style_input(base, llm) -> None:
    msgs = [{"role": "user", "content": "hi there"}]
    text = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=False)
    want = llm.embed({"prompt": text}, use_tqdm=False)[0]
    data = _post(base, "/v1/embeddings", {"messages": msgs}).json()["data"]
    _close(data[0]["embedding"], want.outputs.embedding, 1e-5)


def test_server_errors_are_openai_400s_and_it_keeps_serving(base) -> None:
    err = _error(_post(base, "/v1/embeddings", {"input": "hi", "dimensions": 8}))
    assert err["message"] == ('Model "tiny" does not support matryoshka representation, '
                              "changing output dimensions will lead to poor results.")
    for body in ({"input": []}, {"input": [""]}, {"input": [999999]}, {},
                 {"input": "hi", "messages": [{"role": "user", "content": "x"}]},
                 {"input": "y" * 300}, {"input": "hi", "encoding_format": "int8"}):
        _error(_post(base, "/v1/embeddings", body))
    _error(_post(base, "/v1/embeddings", {"input": "hi", "model": "other"}), 404)
    for path, api in (("/v1/completions", "Completions"),
                      ("/v1/chat/completions", "Chat Completions")):
        err = _error(_post(base, path, {"model": "tiny", "prompt": "hi",
                                        "messages": [{"role": "user", "content": "hi"}]}))
        assert err["message"] == f"The model does not support {api} API"
    r = _post(base, "/v1/messages", {"model": "tiny", "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "The model does not support Messages API"}}
    assert _post(base, "/v1/embeddings", {"input": "still here"}).status_code == 200
