"""The pooling API's request options, as vLLM / OpenAI clients send them, on a tiny random
BERT embedding model and a BERT cross-encoder (built by tests/test_models_bert.py's helpers),
checked against transformers:

- /v1/embeddings: ``dimensions`` (matryoshka: the first d values, renormalized; a size the
  model does not list is a 400 naming ``dimensions``), ``encoding_format: "base64"``
  (little-endian float32, the same numbers as "float"), ``truncate_prompt_tokens`` (k and
  -1), token-id lists, ``user``, chat-style ``messages`` (with ``add_special_tokens``), a
  literal ``[SEP]`` in a text (token type 0, as transformers);
- /score and /rerank: ``truncate_prompt_tokens`` truncates a pair as transformers does
  ('longest_first'), ``top_n``, ``return_documents``, documents as strings or
  ``{"text": ...}`` objects; bad values are OpenAI-shaped 400s and the server keeps serving.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from test_bert_token_types import _close, _hf
from test_models_bert import _make, _tokenizer

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france", "bananas are yellow", "the sky",
        "berlin, germany [SEP] a city"]
LONG = "a long document about many things, " * 6


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """A matryoshka BERT embedding model (16 / 32 of 64) whose tokenizer has a chat template."""
    path, ref = _make(tmp_path_factory.mktemp("pool-emb") / "emb", "bert", seed=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [16, 32]
    (path / "config.json").write_text(json.dumps(cfg))
    tok = _tokenizer(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path, ref, _tokenizer(path)


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    path, ref = _make(tmp_path_factory.mktemp("pool-cross") / "cross", "bert", head=True,
                      seed=4)
    return path, ref, _tokenizer(path)


def _serve(path, name, tmp_path_factory):
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(path),
            "--served-model-name", name, "--kv-cache-memory", "8MiB"]
    return serving(argv, tmp_path_factory.mktemp(f"{name}-log") / "server.log", timeout=180)


@pytest.fixture(scope="module")
def emb_base(emb, tmp_path_factory):
    with _serve(emb[0], "tiny-emb", tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def cross_base(cross, tmp_path_factory):
    with _serve(cross[0], "tiny-cross", tmp_path_factory) as url:
        yield url


def _cls(ref, enc) -> torch.Tensor:
    return _hf(ref, enc).last_hidden_state[0, 0]


# ---------------------------------------------------------------- /v1/embeddings


def test_dimensions_truncate_then_renormalize(emb_base, emb) -> None:
    _, ref, tok = emb
    full = _cls(ref, tok(QUERY))
    for d in (16, 32):
        body = _ok(_post(emb_base, "/v1/embeddings", {"input": QUERY, "dimensions": d}))
        vec = body["data"][0]["embedding"]
        assert len(vec) == d
        _close(vec, F.normalize(full[:d], dim=-1), 1e-4)
        assert abs(torch.tensor(vec).norm().item() - 1) < 1e-5
    plain = _ok(_post(emb_base, "/v1/embeddings", {"input": QUERY}))["data"][0]["embedding"]
    _close(plain, F.normalize(full, dim=-1), 1e-4)
    err = _error(_post(emb_base, "/v1/embeddings", {"input": QUERY, "dimensions": 20}))
    assert err["param"] == "dimensions"
    assert err["message"] == ('Model "tiny-emb" only supports [16, 32] matryoshka dimensions, '
                              "use other output dimensions will lead to poor results.")
    err = _error(_post(emb_base, "/v1/embeddings", {"input": QUERY, "dimensions": 0}))
    assert err["param"] == "dimensions"


def test_base64_is_the_float_vector_as_little_endian_float32(emb_base) -> None:
    for extra in ({}, {"dimensions": 16}):
        req = {"input": [QUERY, DOCS[0]], **extra}
        floats = _ok(_post(emb_base, "/v1/embeddings", req))["data"]
        b64 = _ok(_post(emb_base, "/v1/embeddings", {**req, "encoding_format": "base64"}))
        for f, b in zip(floats, b64["data"]):
            assert isinstance(b["embedding"], str)
            vec = f["embedding"]
            raw = base64.b64decode(b["embedding"])
            assert len(raw) == 4 * len(vec)  # float32 each
            _close(struct.unpack(f"<{len(vec)}f", raw), vec, 1e-6)  # little-endian


def test_token_id_lists_truncation_and_user(emb_base, emb) -> None:
    _, ref, tok = emb
    ids = [tok(t)["input_ids"] for t in (QUERY, DOCS[1])]
    body = _ok(_post(emb_base, "/v1/embeddings", {"input": ids, "user": "someone",
                                                  "model": "tiny-emb"}))
    assert body["model"] == "tiny-emb"
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    for d, i in zip(body["data"], ids):
        _close(d["embedding"], F.normalize(_cls(ref, {"input_ids": i}), dim=-1), 1e-4)
    # truncate_prompt_tokens: the tokenizer's own right-side truncation ([CLS] ... [SEP])
    body = _ok(_post(emb_base, "/v1/embeddings", {"input": LONG, "truncate_prompt_tokens": 12}))
    assert body["usage"]["prompt_tokens"] == 12
    enc = tok(LONG, truncation=True, max_length=12)
    _close(body["data"][0]["embedding"], F.normalize(_cls(ref, enc), dim=-1), 1e-4)
    huge = LONG * 2  # > 128 positions: refused, unless -1 truncates it to max_model_len
    assert len(tok(huge)["input_ids"]) > 128
    err = _error(_post(emb_base, "/v1/embeddings", {"input": huge}))
    assert "maximum context length is 128" in err["message"]
    body = _ok(_post(emb_base, "/v1/embeddings", {"input": huge, "truncate_prompt_tokens": -1}))
    assert body["usage"]["prompt_tokens"] == 128
    enc = tok(huge, truncation=True, max_length=128)
    _close(body["data"][0]["embedding"], F.normalize(_cls(ref, enc), dim=-1), 1e-4)
    for bad in (0, -2, 500):
        err = _error(_post(emb_base, "/v1/embeddings", {"input": QUERY,
                                                        "truncate_prompt_tokens": bad}))
        assert err["param"] == "truncate_prompt_tokens", err


def test_chat_messages_and_a_literal_sep(emb_base, emb) -> None:
    _, ref, tok = emb
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "user: hello there\nassistant: hi\n"
    plain = _ok(_post(emb_base, "/v1/embeddings", {"messages": msgs}))
    enc = tok(text, add_special_tokens=False)  # vLLM: the template's tokens only by default
    assert plain["usage"]["prompt_tokens"] == len(enc["input_ids"])
    _close(plain["data"][0]["embedding"], F.normalize(_cls(ref, enc), dim=-1), 1e-4)
    special = _ok(_post(emb_base, "/v1/embeddings", {"messages": msgs,
                                                     "add_special_tokens": True}))
    enc = tok(text)  # [CLS] ... [SEP]
    assert special["usage"]["prompt_tokens"] == len(enc["input_ids"])
    _close(special["data"][0]["embedding"], F.normalize(_cls(ref, enc), dim=-1), 1e-4)
    # a literal [SEP] inside one text: all token type 0, as transformers
    enc = tok(DOCS[3])
    assert 3 in enc["input_ids"][1:-1] and not any(enc["token_type_ids"])
    got = _ok(_post(emb_base, "/v1/embeddings", {"input": DOCS[3]}))["data"][0]["embedding"]
    _close(got, F.normalize(_cls(ref, enc), dim=-1), 1e-4)


# ---------------------------------------------------------------- /score and /rerank


def _scores_hf(ref, tok, pairs, keep=None) -> list[float]:
    out = []
    for a, b in pairs:
        kw = {"truncation": True, "max_length": keep} if keep else {}
        out.append(torch.sigmoid(_hf(ref, tok(a, b, **kw)).logits[0, 0]).item())
    return out


def test_score_truncates_pairs_as_transformers(cross_base, cross) -> None:
    _, ref, tok = cross
    firsts, seconds = [LONG, QUERY, LONG], [QUERY, LONG, LONG]
    assert all(len(tok(a, b)["input_ids"]) > 30 for a, b in zip(firsts, seconds))
    r = _ok(_post(cross_base, "/score", {"text_1": firsts, "text_2": seconds,
                                         "truncate_prompt_tokens": 30}))
    want = _scores_hf(ref, tok, zip(firsts, seconds), keep=30)
    _close([d["score"] for d in r["data"]], want)
    assert r["usage"]["prompt_tokens"] == 90
    # the old cut (the joined ids' tail) scores differently: the test tells them apart
    enc = tok(LONG, QUERY)
    tail_cut = {k: v[:29] + v[-1:] for k, v in enc.items()}
    old = torch.sigmoid(_hf(ref, tail_cut).logits[0, 0]).item()
    assert abs(old - want[0]) > 1e-4
    r = _ok(_post(cross_base, "/v1/score", {"queries": QUERY, "documents": DOCS}))
    _close([d["score"] for d in r["data"]], _scores_hf(ref, tok, [(QUERY, d) for d in DOCS]))


def test_rerank_top_n_return_documents_and_document_objects(cross_base, cross) -> None:
    _, ref, tok = cross
    query = "capital [SEP] of france"  # a literal [SEP] in the first text: still type 0
    want = _scores_hf(ref, tok, [(query, d) for d in DOCS])
    order = sorted(range(len(DOCS)), key=lambda i: want[i], reverse=True)
    r = _ok(_post(cross_base, "/rerank", {"query": query, "documents": DOCS, "top_n": 2}))
    assert [x["index"] for x in r["results"]] == order[:2]
    assert [x["document"]["text"] for x in r["results"]] == [DOCS[i] for i in order[:2]]
    _close([x["relevance_score"] for x in r["results"]], [want[i] for i in order[:2]])
    r = _ok(_post(cross_base, "/v1/rerank", {"query": query, "return_documents": False,
                                             "documents": [{"text": d} for d in DOCS]}))
    assert [x["index"] for x in r["results"]] == order
    assert all(set(x) == {"index", "relevance_score"} for x in r["results"])
    _close([x["relevance_score"] for x in r["results"]], [want[i] for i in order])
    r = _ok(_post(cross_base, "/v2/rerank", {"query": LONG, "documents": [LONG, QUERY],
                                             "truncate_prompt_tokens": 40}))
    want = _scores_hf(ref, tok, [(LONG, LONG), (LONG, QUERY)], keep=40)
    got = {x["index"]: x["relevance_score"] for x in r["results"]}
    _close([got[0], got[1]], want)
    assert r["usage"]["prompt_tokens"] == 80


def test_bad_options_are_openai_400s_and_it_keeps_serving(cross_base) -> None:
    pair = {"text_1": LONG, "text_2": LONG}
    for keep, words in ((0, "must be -1"), (500, "greater than max_model_len"),
                        (2, "too small")):
        err = _error(_post(cross_base, "/score", {**pair, "truncate_prompt_tokens": keep}))
        assert err["param"] == "truncate_prompt_tokens" and words in err["message"], err
    err = _error(_post(cross_base, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}))
    assert err["param"] == "top_n"
    _error(_post(cross_base, "/rerank", {"query": QUERY, "documents": []}))
    _error(_post(cross_base, "/rerank", {"query": QUERY, "documents": [{"title": "x"}]}))
    err = _error(_post(cross_base, "/v1/embeddings", {"input": QUERY}))
    assert err["message"] == "The model does not support Embeddings API"
    assert _post(cross_base, "/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200
