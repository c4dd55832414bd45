"""Classification, scoring and reranking, vLLM's way, on tiny random checkpoints built here.

- a ``LlamaForSequenceClassification`` (3 labels) is detected as a classifier:
  ``LLM.classify`` equals transformers' softmax (raw logits with ``use_activation=False``),
  whatever the chunking or batching; labels come from ``id2label``;
- a one-label checkpoint is a cross-encoder: ``LLM.score`` equals transformers' sigmoid of
  the pair (the tokenizer's text pair), 1:1, 1:N and N:N; an embedding model scores by
  cosine similarity;
- vLLM's errors for the wrong runner kind and bad inputs;
- ``modelport serve`` answers /classify, /score, /v1/score, /rerank, /v1/rerank and
  /v2/rerank in vLLM's shapes, with OpenAI-shaped 400s.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from helpers.tiny_models import _byte_level_tokenizer, make_tiny_llama_dir, tiny_llama_config
from modelport import LLM, PoolingParams

PROMPTS = ["hello world", "a much longer prompt to classify, " * 3, "x", "short one"]
QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france", "bananas are yellow", "the sky", "berlin, germany"]
SMALL = dict(max_model_len=256, kv_cache_memory=8 << 20, max_num_batched_tokens=32)
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _make_seq_cls(path: Path, n_labels: int, arch: str = "llama", seed: int = 0):
    """A tiny random *ForSequenceClassification saved with the byte-level tokenizer; returns
    (folder, the transformers model as the reference)."""
    import transformers

    if arch == "llama":
        cfg = tiny_llama_config()
        cls = transformers.LlamaForSequenceClassification
    else:  # qwen2, qwen3 (head_dim 32 != hidden / heads: q / k norms over 32)
        kw = {"head_dim": 32} if arch == "qwen3" else {}
        cfg = getattr(transformers, f"{arch.capitalize()}Config")(
            vocab_size=259,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
            tie_word_embeddings=False,
            **kw,
        )
        cls = getattr(transformers, f"{arch.capitalize()}ForSequenceClassification")
    cfg.num_labels = n_labels
    if n_labels == 3:
        cfg.id2label = dict(LABELS)
        cfg.label2id = {v: k for k, v in LABELS.items()}
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF starts the head near zero and norms at one: randomize
        model.score.weight.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")) or ".bias" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    _byte_level_tokenizer().save_pretrained(path)
    return path, model


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def cls3(tmp_path_factory):
    return _make_seq_cls(tmp_path_factory.mktemp("cls") / "cls3", 3)


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    return _make_seq_cls(tmp_path_factory.mktemp("cls") / "cross", 1, seed=1)


@pytest.fixture(scope="module")
def llm3(cls3):
    return LLM(str(cls3[0]), runner="pooling", **SMALL)


@pytest.fixture(scope="module")
def cross_llm(cross):
    return LLM(str(cross[0]), **SMALL)  # runner auto: the architecture says pooling


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("emb") / "llama")


@pytest.fixture(scope="module")
def embed_llm(embed_dir):
    return LLM(str(embed_dir), runner="pooling", **SMALL)


# ---------------------------------------------------------------- offline: classify


def test_classify_equals_transformers_softmax(llm3, cls3) -> None:
    _, ref = cls3
    assert llm3.runner_type == "pooling"
    outs = llm3.classify(PROMPTS, use_tqdm=False)
    assert len(outs[1].prompt_token_ids) > SMALL["max_num_batched_tokens"]  # chunked
    for prompt, o in zip(PROMPTS, outs):
        assert o.prompt_token_ids == llm3.get_tokenizer().encode(prompt)
        assert o.outputs.num_classes == 3 and o.finished
        _close(o.outputs.probs, _logits(ref, o.prompt_token_ids).softmax(-1))
        assert abs(sum(o.outputs.probs) - 1) < 1e-5
    # one by one equals the batch; raw logits without the activation
    for prompt, o in zip(PROMPTS, outs):
        _close(llm3.classify(prompt, use_tqdm=False)[0].outputs.probs, o.outputs.probs, 1e-5)
    raw = llm3.classify(PROMPTS[0], PoolingParams(use_activation=False), use_tqdm=False)[0]
    _close(raw.outputs.probs, _logits(ref, raw.prompt_token_ids))
    old = llm3.classify(PROMPTS[0], PoolingParams(activation=False), use_tqdm=False)[0]
    _close(old.outputs.probs, raw.outputs.probs, 1e-6)
    enc = llm3.encode(PROMPTS[0], use_tqdm=False)[0]  # the model's own task
    _close(enc.outputs.data, outs[0].outputs.probs, 1e-6)
    assert llm3.llm_engine.core.kv.usage == 0.0


def test_task_and_convert_select_the_classifier(cls3) -> None:
    path, ref = cls3
    ids = _byte_level_tokenizer().encode(PROMPTS[0])
    want = _logits(ref, ids).softmax(-1)
    for kw in ({"task": "classify"}, {"convert": "classify"}, {"runner": "auto"}):
        llm = LLM(str(path), **kw, **SMALL)
        _close(llm.classify(PROMPTS[0], use_tqdm=False)[0].outputs.probs, want)
    # convert="embed": the classifier's backbone as an embedding model
    emb = LLM(str(path), convert="embed", **SMALL)
    with torch.no_grad():
        hidden = ref.model(torch.tensor([ids])).last_hidden_state[0, -1]
    _close(emb.embed(PROMPTS[0], use_tqdm=False)[0].outputs.embedding, F.normalize(hidden, dim=-1))
    with pytest.raises(ValueError, match="Classification API is not supported by this model"):
        emb.classify("hi")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_classifiers(tmp_path, arch) -> None:
    path, ref = _make_seq_cls(tmp_path / arch, 3, arch=arch)
    llm = LLM(str(path), runner="pooling", **SMALL)
    for o in llm.classify(PROMPTS, use_tqdm=False):
        _close(o.outputs.probs, _logits(ref, o.prompt_token_ids).softmax(-1))


def test_qwen3_causal_lm_logits_equal_transformers(tmp_path) -> None:
    """The Qwen3 decoder the classifier stands on also generates: its logits are HF's."""
    import transformers

    from helpers.tiny_models import TINY_PROMPT, load_cpu, run_one_sequence

    _, cls_model = _make_seq_cls(tmp_path / "unused", 3, arch="qwen3")
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(cls_model.config).eval()
    lm.model.load_state_dict(cls_model.model.state_dict())
    lm.config.architectures = ["Qwen3ForCausalLM"]
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    with torch.no_grad():
        want = lm(torch.tensor([TINY_PROMPT])).logits[0]
    _close(run_one_sequence(load_cpu(tmp_path / "lm"), TINY_PROMPT), want)


def test_wrong_runner_kind_is_vllms_error(llm3, cls3, embed_llm, embed_dir) -> None:
    with pytest.raises(
        ValueError,
        match=r"Embedding API is not supported by this model\. "
        r"Try converting the model using `--convert embed`",
    ):
        llm3.embed("hi")
    with pytest.raises(ValueError, match=r"LLM\.generate\(\) is only supported for generative"):
        llm3.generate("hi")
    with pytest.raises(ValueError, match=r"Score API is only enabled for num_labels == 1\."):
        llm3.score("a", "b")
    with pytest.raises(
        ValueError,
        match=r"Classification API is not supported by this model\. "
        r"Try converting the model using `--convert classify`",
    ):
        embed_llm.classify("hi")
    with pytest.raises(ValueError, match="is a classification model: it cannot generate"):
        LLM(str(cls3[0]), runner="generate", **SMALL)
    with pytest.raises(ValueError, match="no classification head"):
        LLM(str(embed_dir), convert="classify", **SMALL)
    with pytest.raises(ValueError, match="task 'classify' is not supported for LlamaForCausalLM"):
        LLM(str(embed_dir), task="classify", **SMALL)
    gen = LLM(str(embed_dir), **SMALL)
    with pytest.raises(ValueError, match=r"Score API is not supported by this model"):
        gen.score("a", "b")
    with pytest.raises(ValueError, match="Classification API is not supported"):
        gen.classify("a")
    with pytest.raises(ValueError, match="longer than the maximum model length of 256"):
        llm3.classify("y" * 300, use_tqdm=False)


# ---------------------------------------------------------------- offline: score


def test_cross_encoder_score_equals_transformers_sigmoid(cross_llm, cross) -> None:
    _, ref = cross
    hf_tok = _byte_level_tokenizer()

    def want(a: str, b: str) -> float:
        ids = hf_tok(a, text_pair=b)["input_ids"]
        return torch.sigmoid(_logits(ref, ids)[0]).item()

    one = cross_llm.score(QUERY, DOCS[0], use_tqdm=False)
    assert len(one) == 1
    assert one[0].prompt_token_ids == hf_tok(QUERY, text_pair=DOCS[0])["input_ids"]
    assert abs(one[0].outputs.score - want(QUERY, DOCS[0])) < 1e-4
    many = cross_llm.score(QUERY, DOCS, use_tqdm=False)  # 1:N
    _close([o.outputs.score for o in many], [want(QUERY, d) for d in DOCS])
    pairs = cross_llm.score(DOCS, DOCS[::-1], use_tqdm=False)  # N:N
    _close([o.outputs.score for o in pairs], [want(a, b) for a, b in zip(DOCS, DOCS[::-1])])
    raw = cross_llm.score(
        QUERY, DOCS[1], pooling_params=PoolingParams(use_activation=False), use_tqdm=False
    )[0]
    ids = hf_tok(QUERY, text_pair=DOCS[1])["input_ids"]
    assert abs(raw.outputs.score - _logits(ref, ids)[0].item()) < 1e-4
    # a one-label classifier classifies too: the sigmoid, one class
    c = cross_llm.classify(QUERY, use_tqdm=False)[0]
    assert c.outputs.num_classes == 1
    with pytest.raises(ValueError, match="Input lengths must be either 1:1, 1:N or N:N"):
        cross_llm.score(DOCS[:2], DOCS[:3], use_tqdm=False)
    with pytest.raises(ValueError, match="At least one text_pair element must be given"):
        cross_llm.score(QUERY, [], use_tqdm=False)


def test_embedding_model_scores_by_cosine(embed_llm, embed_dir) -> None:
    embs = {
        t: torch.tensor(o.outputs.embedding)
        for t, o in zip([QUERY, *DOCS], embed_llm.embed([QUERY, *DOCS], use_tqdm=False))
    }
    outs = embed_llm.score(QUERY, DOCS, use_tqdm=False)
    for d, o in zip(DOCS, outs):
        assert abs(o.outputs.score - F.cosine_similarity(embs[QUERY], embs[d], dim=0).item()) < 1e-5
        tok = embed_llm.get_tokenizer()
        assert o.prompt_token_ids == tok.encode(QUERY) + tok.encode(d)
    assert len({round(o.outputs.score, 6) for o in outs}) == len(DOCS)
    # vLLM's older task="score" on an embedding model: the same cosine scores
    old = LLM(str(embed_dir), task="score", **SMALL).score(QUERY, DOCS[2], use_tqdm=False)
    assert abs(old[0].outputs.score - outs[2].outputs.score) < 1e-6


# ---------------------------------------------------------------- the server


def _argv(path: Path, name: str, *flags: str) -> list[str]:
    return [
        "-m",
        "modelport.entrypoints.cli",
        "serve",
        "--model",
        str(path),
        "--served-model-name",
        name,
        *flags,
        "--max-model-len",
        "256",
        "--kv-cache-memory",
        "8MiB",
        "--max-num-batched-tokens",
        "32",
    ]


@pytest.fixture(scope="module")
def servers(cross, embed_dir, tmp_path_factory):
    """A cross-encoder server and an embedding server, started side by side."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    logs = tmp_path_factory.mktemp("clssrv")
    specs = [
        (_argv(cross[0], "tiny-rerank", "--runner", "pooling"), logs / "cross.log"),
        (_argv(embed_dir, "tiny-embed", "--task", "embed"), logs / "embed.log"),
    ]
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(stack.enter_context, serving(a, log, timeout=180)) for a, log in specs]
        yield [f.result() for f in futs]


@pytest.fixture(scope="module")
def base(servers):
    return servers[0]


@pytest.fixture(scope="module")
def embed_base(servers):
    return servers[1]





def test_server_score_and_rerank_equal_the_offline_llm(base, cross_llm) -> None:
    offline = cross_llm.score(QUERY, DOCS, use_tqdm=False)
    want = [o.outputs.score for o in offline]
    n_tokens = sum(len(o.prompt_token_ids) for o in offline)
    for path, body in (
        ("/score", {"text_1": QUERY, "text_2": DOCS}),
        ("/v1/score", {"data_1": QUERY, "data_2": DOCS}),
        ("/score", {"queries": QUERY, "documents": DOCS}),
        ("/v1/score", {"queries": [QUERY] * 4, "items": DOCS}),
    ):
        r = _ok(_post(base, path, {"model": "tiny-rerank", **body}))
        assert r["object"] == "list" and r["model"] == "tiny-rerank"
        assert r["id"].startswith("score-")
        assert [d["index"] for d in r["data"]] == [0, 1, 2, 3]
        assert all(d["object"] == "score" for d in r["data"])
        _close([d["score"] for d in r["data"]], want, 1e-5)
        assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] == n_tokens
    order = sorted(range(len(DOCS)), key=lambda i: want[i], reverse=True)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = _ok(_post(base, path, {"model": "tiny-rerank", "query": QUERY, "documents": DOCS}))
        assert set(r) == {"id", "model", "usage", "results"}
        assert [x["index"] for x in r["results"]] == order
        for x in r["results"]:
            assert x["document"] == {"text": DOCS[x["index"]]}
            assert abs(x["relevance_score"] - want[x["index"]]) < 1e-5
        assert r["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    top = _ok(_post(base, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}))
    assert [x["index"] for x in top["results"]] == order[:2]


def test_server_classify(base, cross_llm) -> None:
    want = cross_llm.classify(PROMPTS, use_tqdm=False)
    r = _ok(_post(base, "/classify", {"model": "tiny-rerank", "input": PROMPTS}))
    assert r["object"] == "list" and r["id"].startswith("classify-")
    for d, w, i in zip(r["data"], want, range(len(PROMPTS))):
        assert d["index"] == i and d["num_classes"] == 1 and d["label"] == "LABEL_0"
        _close(d["probs"], w.outputs.probs, 1e-5)
    n = sum(len(w.prompt_token_ids) for w in want)
    assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] == n
    raw = _ok(_post(base, "/classify", {"input": PROMPTS[0], "use_activation": False}))
    p = want[0].outputs.probs[0]
    _close(raw["data"][0]["probs"], [torch.logit(torch.tensor(p)).item()], 1e-3)


def test_server_errors_are_openai_400s_and_it_keeps_serving(base) -> None:
    for path, body in (
        ("/rerank", {"query": QUERY, "documents": []}),
        ("/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}),
        ("/rerank", {"query": "y" * 300, "documents": DOCS}),
        ("/score", {"text_1": DOCS[:2], "text_2": DOCS[:3]}),
        ("/score", {"text_1": QUERY}),
        ("/classify", {"input": []}),
        ("/classify", {"input": "y" * 300}),
    ):
        _error(_post(base, path, body))
    err = _error(_post(base, "/rerank", {"query": "y" * 300, "documents": DOCS}))
    assert "maximum context length is 256 tokens" in err["message"]
    err = _error(_post(base, "/score", {"text_1": DOCS[:2], "text_2": DOCS[:3]}))
    assert err["message"] == "Input lengths must be either 1:1, 1:N or N:N"
    _error(_post(base, "/rerank", {"query": QUERY, "documents": DOCS, "model": "x"}), 404)
    for path, api in (("/v1/embeddings", "Embeddings"), ("/v1/completions", "Completions")):
        err = _error(_post(base, path, {"input": "hi", "prompt": "hi"}))
        assert err["message"] == f"The model does not support {api} API"
    models = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny-rerank"]
    assert _post(base, "/rerank", {"query": QUERY, "documents": DOCS[:1]}).status_code == 200


def test_embedding_server_reranks_by_cosine_and_refuses_classify(embed_base, embed_llm) -> None:
    want = [o.outputs.score for o in embed_llm.score(QUERY, DOCS, use_tqdm=False)]
    r = _ok(_post(embed_base, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3}))
    order = sorted(range(len(DOCS)), key=lambda i: want[i], reverse=True)[:3]
    assert [x["index"] for x in r["results"]] == order
    _close([x["relevance_score"] for x in r["results"]], [want[i] for i in order], 1e-5)
    s = _ok(_post(embed_base, "/score", {"text_1": QUERY, "text_2": DOCS}))
    _close([d["score"] for d in s["data"]], want, 1e-5)
    tok = embed_llm.get_tokenizer()
    n = sum(len(tok.encode(t)) for t in [QUERY, *DOCS])  # the query embedded once
    assert s["usage"]["prompt_tokens"] == s["usage"]["total_tokens"] == n
    err = _error(_post(embed_base, "/classify", {"input": "hi"}))
    assert err["message"] == "The model does not support Classification API"


def test_sagemaker_invocations_pick_the_pooling_api(base, embed_base) -> None:
    """vLLM's /invocations on pooling servers: the body's fields pick embeddings, classify,
    score or rerank among the APIs the model serves; the answer is that API's."""
    def same(base_url: str, path: str, body: dict) -> dict:
        got = _ok(_post(base_url, "/invocations", body))
        want = _ok(_post(base_url, path, body))
        for doc in (got, want):
            doc.pop("id", None)
            doc.pop("created", None)
        _close_docs(got, want, path)  # a second run of a prompt may differ in the last bits
        return got

    assert same(embed_base, "/v1/embeddings",
                {"model": "tiny-embed", "input": ["a b", "c"]})["object"] == "list"
    same(base, "/score", {"model": "tiny-rerank", "text_1": QUERY, "text_2": DOCS})
    same(base, "/rerank", {"model": "tiny-rerank", "query": QUERY, "documents": DOCS})
    same(base, "/classify", {"model": "tiny-rerank", "input": ["a b", "c"]})
    r = _post(embed_base, "/invocations", {"model": "tiny-embed", "prompt": "x"})
    assert r.status_code == 400
    assert "Expected one of: EmbeddingRequest, ScoreRequest, RerankRequest, PoolingRequest" in (
        r.json()["error"]["message"])


def _close_docs(a, b, where: str) -> None:  # noqa: ANN001 - JSON values
    """Equal JSON documents, floats within 1e-5."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close_docs(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close_docs(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), where
    else:
        assert a == b, where
