"""BGE-M3 (models/bge_m3.py): dense, sparse and ColBERT outputs against transformers.

A tiny random XLM-RoBERTa checkpoint is built here (test_models_bert's builder) with random
``sparse_linear.pt`` / ``colbert_linear.pt`` beside it; the reference is transformers'
``XLMRobertaModel`` with the heads applied here as FlagEmbedding's BGEM3 defines them:
sparse ``relu(sparse_linear(h))`` per token, ColBERT ``normalize(colbert_linear(h[1:]))``,
dense the [CLS] row normalized, lexical weights the largest sparse weight of each non-special
token. modelport answers as vLLM's BgeM3EmbeddingModel: token_classify rows without the
leading BOS and closing EOS, token_embed rows without the BOS.

- offline: the architecture is picked from the .pt files (or hf_overrides), one batch of
  texts of different lengths and mixed tasks equals the reference, lexical_weights() equals
  FlagEmbedding's dict;
- errors: a task whose head is missing (hf_overrides on a folder without .pt files, a folder
  with only the sparse head; a plain XLM-R's token_embed is its hidden states, its
  token_classify refused), dimensions with a token task, a bad head file;
- the server's /pooling: token_classify / token_embed / embed (float and base64) equal the
  same reference; a missing head is a 400 in OpenAI's error shape.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from modelport import LLM, PoolingParams
from modelport.lexical_weights import lexical_weights
from test_models_bert import _make, _tokenizer

TEXTS = ["hello world", "a much longer text, with repeated words words words!", "x",
         "short one"]
SMALL = dict(kv_cache_memory=8 << 20)
COLBERT_DIM = 24  # unlike hidden (64): the head's size comes from its weights


def _heads(path: Path, sparse: bool = True, colbert: bool = True, seed: int = 3):
    torch.manual_seed(seed)
    heads = {"sparse": torch.nn.Linear(64, 1), "colbert": torch.nn.Linear(64, COLBERT_DIM)}
    with torch.no_grad():
        heads["sparse"].bias.fill_(0.05)  # some weights > 0, some clipped by relu
    if sparse:
        torch.save(heads["sparse"].state_dict(), path / "sparse_linear.pt")
    if colbert:
        torch.save(heads["colbert"].state_dict(), path / "colbert_linear.pt")
    return heads


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    path, ref = _make(tmp_path_factory.mktemp("bgem3") / "m3", "xlm", seed=2)
    return path, ref, _heads(path), _tokenizer(path)


def _reference(ref, heads, tok, text: str) -> dict:
    """FlagEmbedding's BGEM3 outputs of one text, from transformers' hidden states."""
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        h = ref(input_ids=torch.tensor([ids])).last_hidden_state[0]
        sparse = torch.relu(heads["sparse"](h))  # [T, 1]
        colbert = F.normalize(heads["colbert"](h[1:]), dim=-1)
    unused = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    lexical: dict[str, float] = {}
    for tid, w in zip(ids, sparse[:, 0].tolist()):
        if tid not in unused and w > 0 and w > lexical.get(str(tid), 0.0):
            lexical[str(tid)] = w
    return {"ids": ids, "dense": F.normalize(h[0], dim=-1), "sparse": sparse[1:-1],
            "colbert": colbert, "lexical": lexical}


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


# ---------------------------------------------------------------- offline


def test_offline_outputs_equal_flagembedding_definitions(m3, caplog) -> None:
    path, ref, heads, tok = m3
    with caplog.at_level("INFO"):
        llm = LLM(str(path), **SMALL)  # XLMRobertaModel + the .pt files: BGE-M3
    assert llm.llm_engine.config.model_config.architecture == "BgeM3EmbeddingModel"
    assert "sparse_linear.pt, colbert_linear.pt" in caplog.text
    assert llm.llm_engine.config.pooler_config.token_tasks == ("token_classify", "token_embed")
    want = [_reference(ref, heads, tok, t) for t in TEXTS]
    assert len({len(w["ids"]) for w in want}) == len(TEXTS)  # ragged lengths

    sparse = llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    colbert = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    dense = llm.embed(TEXTS, use_tqdm=False)
    for w, s, c, d in zip(want, sparse, colbert, dense):
        assert s.prompt_token_ids == w["ids"]
        assert tuple(s.outputs.data.shape) == (len(w["ids"]) - 2, 1)
        _close(s.outputs.data, w["sparse"])
        assert tuple(c.outputs.data.shape) == (len(w["ids"]) - 1, COLBERT_DIM)
        _close(c.outputs.data, w["colbert"])
        _close(d.outputs.embedding, w["dense"])
        assert lexical_weights(s.prompt_token_ids, s.outputs.data, llm.get_tokenizer()) == \
            pytest.approx(w["lexical"], abs=1e-4)
    assert any(w["lexical"] for w in want) and any(
        (w["sparse"] == 0).any() for w in want)  # relu clipped some

    # one batch of mixed tasks: each request gets its own task's output
    tasks = ["token_embed", "embed", "token_classify", "token_embed"]
    mixed = llm.encode(TEXTS, [PoolingParams(task=t) for t in tasks], use_tqdm=False)
    for t, w, o in zip(tasks, want, mixed):
        key = {"token_embed": "colbert", "embed": "dense", "token_classify": "sparse"}[t]
        _close(o.outputs.data, w[key])
    # raw projections: use_activation=False (no relu), normalize=False (no L2)
    raw = llm.encode(TEXTS[1], PoolingParams(use_activation=False, task="token_classify"),
                     use_tqdm=False)[0]
    unnorm = llm.encode(TEXTS[1], PoolingParams(normalize=False, task="token_embed"),
                        use_tqdm=False)[0]
    ids = torch.tensor([want[1]["ids"]])
    with torch.no_grad():
        h = ref(input_ids=ids).last_hidden_state[0]
        _close(raw.outputs.data, heads["sparse"](h[1:-1]))
        _close(unnorm.outputs.data, heads["colbert"](h[1:]))
    # errors: dimensions needs a matryoshka model (BGE-M3 is not); a prompt without its
    # BOS / EOS
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        llm.encode(TEXTS[0], PoolingParams(dimensions=8), pooling_task="token_embed",
                   use_tqdm=False)
    bare = llm.encode({"prompt_token_ids": want[0]["ids"][1:-1]},
                      pooling_task="token_classify", use_tqdm=False)[0]
    assert bare.outputs.data.shape[0] == len(want[0]["ids"]) - 2  # nothing more to drop
    with pytest.raises(ValueError, match="3 weights for 2 prompt tokens"):
        lexical_weights([0, 5, 6, 2], [0.1, 0.2, 0.3], tok)


def test_missing_heads_are_named_errors(tmp_path) -> None:
    bare, _ = _make(tmp_path / "bare", "xlm", seed=4)
    # hf_overrides selects BGE-M3 without head files: dense only, token tasks refused
    llm = LLM(str(bare), hf_overrides={"architectures": ["BgeM3EmbeddingModel"]}, **SMALL)
    assert llm.llm_engine.config.model_config.architecture == "BgeM3EmbeddingModel"
    assert len(llm.embed("hello", use_tqdm=False)[0].outputs.embedding) == 64
    for task, head in (("token_classify", "sparse_linear.pt"),
                       ("token_embed", "colbert_linear.pt")):
        with pytest.raises(ValueError, match=f"pooling task '{task}' is not supported by this "
                                             f"model \\(supported: embed\\); {task} needs .*, "
                                             f"or a BGE-M3 checkpoint with {head}"):
            llm.encode("hello", pooling_task=task, use_tqdm=False)
    del llm
    # no .pt files, no override: a plain XLM-R encoder, whose token_embed is its hidden
    # states (tests/test_token_pooling.py); token_classify needs a classifier
    plain = LLM(str(bare), **SMALL)
    assert plain.llm_engine.config.model_config.architecture == "XLMRobertaModel"
    assert plain.encode("hello", pooling_task="token_embed",
                        use_tqdm=False)[0].outputs.data.shape[1] == 64
    with pytest.raises(ValueError, match="'token_classify' is not supported.*needs a "
                                         "classification model"):
        plain.encode("hello", pooling_task="token_classify", use_tqdm=False)
    del plain
    # only the sparse head: token_classify works, token_embed is refused
    _heads(bare, colbert=False)
    sparse_only = LLM(str(bare), **SMALL)
    assert sparse_only.llm_engine.config.pooler_config.token_tasks == ("token_classify",)
    assert sparse_only.encode("hello", pooling_task="token_classify",
                              use_tqdm=False)[0].outputs.data.shape[1] == 1
    with pytest.raises(ValueError, match="supported: embed, token_classify"):
        sparse_only.encode("hello", pooling_task="token_embed", use_tqdm=False)


def test_bad_head_file_and_overrides_are_refused(tmp_path) -> None:
    path, _ = _make(tmp_path / "bad", "xlm", seed=5)
    torch.save(torch.nn.Linear(32, 1).state_dict(), path / "sparse_linear.pt")
    with pytest.raises(ValueError, match=r"sparse_linear.pt: weight shape \[1, 32\] does not "
                                         "fit hidden_size 64"):
        LLM(str(path), **SMALL)
    torch.save({"weight": [1.0]}, path / "sparse_linear.pt")
    with pytest.raises(ValueError, match="sparse_linear.pt is not a state dict of tensors"):
        LLM(str(path), **SMALL)
    with pytest.raises(ValueError, match="hf_overrides\\['architectures'\\] must be"):
        LLM(str(path), hf_overrides={"architectures": "BgeM3EmbeddingModel"}, **SMALL)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(m3, tmp_path_factory):
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(m3[0]),
            "--served-model-name", "tiny-m3", "--kv-cache-memory", "8MiB"]
    with serving(argv, tmp_path_factory.mktemp("m3log") / "server.log", timeout=180) as url:
        yield url


def test_server_pooling_tasks_equal_reference(server, m3) -> None:
    path, ref, heads, tok = m3
    want = [_reference(ref, heads, tok, t) for t in TEXTS]
    r = _ok(_post(server, "/pooling", {"model": "tiny-m3", "input": TEXTS,
                                       "task": "token_classify"}))
    for w, d in zip(want, r["data"]):
        _close(d["data"], w["sparse"])
        assert lexical_weights(w["ids"], d["data"], tok) == pytest.approx(w["lexical"], abs=1e-4)
    assert r["usage"]["prompt_tokens"] == sum(len(w["ids"]) for w in want)
    r = _ok(_post(server, "/pooling", {"input": TEXTS, "task": "token_embed"}))
    for w, d in zip(want, r["data"]):
        _close(d["data"], w["colbert"])
    r = _ok(_post(server, "/pooling", {"input": TEXTS[1], "task": "token_embed",
                                       "encoding_format": "base64"}))
    raw = base64.b64decode(r["data"][0]["data"])
    flat = struct.unpack(f"<{len(raw) // 4}f", raw)
    _close(torch.tensor(flat).view(-1, COLBERT_DIM), want[1]["colbert"])
    for body, path_ in (({"input": TEXTS}, "/pooling"), ({"input": TEXTS}, "/v1/embeddings")):
        r = _ok(_post(server, path_, body))
        for w, d in zip(want, r["data"]):
            _close(d.get("data", d.get("embedding")), w["dense"])
    err = _error(_post(server, "/pooling", {"input": "x", "task": "token_embed",
                                            "dimensions": 8}))
    assert "does not support matryoshka" in err["message"] and err["param"] == "dimensions"


def test_server_missing_head_is_a_400(tmp_path_factory) -> None:
    bare, _ = _make(tmp_path_factory.mktemp("bgem3bare") / "bare", "xlm", seed=6)
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(bare),
            "--hf-overrides", '{"architectures": ["BgeM3EmbeddingModel"]}',
            "--kv-cache-memory", "8MiB"]
    with serving(argv, tmp_path_factory.mktemp("m3barelog") / "server.log",
                 timeout=180) as url:
        err = _error(_post(url, "/pooling", {"input": "hello", "task": "token_classify"}))
        assert "'token_classify' is not supported by this model" in err["message"]
        assert "sparse_linear.pt" in err["message"] and err["param"] == "task"
        r = _ok(_post(url, "/pooling", {"input": "hello"}))  # the dense vector still serves
        assert len(r["data"][0]["data"]) == 64
