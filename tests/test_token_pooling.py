"""Per-token pooling tasks of plain pooling models (runner/pooler.py), against transformers.

- ``token_embed`` of an embedding model is every prompt token's final hidden state,
  L2-normalized each (``normalize=False``: raw): a decoder run as a pooling model (a prompt
  longer than max_num_batched_tokens, so chunked prefill splits it; also after a prefix
  cache hit of the same prompt) and BERT-family encoders;
- ``token_classify`` of a classifier is its head on every token's row, then softmax (sigmoid
  for one label; ``use_activation=False``, per request or the engine's pooler_config: the
  logits): a decoder's ``score``, BERT's linear
  classifier without its [CLS] pooler, RoBERTa's whole head, as vLLM's;
- a task the model does not serve is a named error; sequence tasks still answer in the same
  batch;
- the server's /pooling: token_embed on an embedding server (chunked, float and base64),
  token_classify on a classifier server, embed on a classifier server is still a 400.
"""

from __future__ import annotations

import base64
import struct

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, PoolingParams
from test_classify_score import _make_seq_cls
from test_models_bert import _make, _tokenizer

LONG = "a per-token pooling prompt much longer than one chunk, " * 2
PROMPTS = ["hello world", LONG, "x"]
SMALL = dict(max_model_len=256, kv_cache_memory=8 << 20, max_num_batched_tokens=32)


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def _decoder_hidden(model, ids: list[int]) -> torch.Tensor:
    """transformers' final-norm hidden states [T, H] of a decoder (its base model)."""
    base = getattr(model, "model", model)
    with torch.no_grad():
        return base(torch.tensor([ids])).last_hidden_state[0].float()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModel

    path = make_tiny_llama_dir(tmp_path_factory.mktemp("tokpool") / "llama")
    ref = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return path, ref


@pytest.fixture(scope="module")
def embed_llm(llama):
    return LLM(str(llama[0]), runner="pooling", **SMALL)


def test_decoder_token_embed_is_every_tokens_hidden_state_across_chunks(embed_llm, llama):
    ref = llama[1]
    assert embed_llm.llm_engine.config.pooler_config.token_tasks == ("token_embed",)
    outs = embed_llm.encode(PROMPTS, pooling_task="token_embed", use_tqdm=False)
    assert len(outs[1].prompt_token_ids) > 3 * SMALL["max_num_batched_tokens"]  # 4+ chunks
    for o in outs:
        h = _decoder_hidden(ref, o.prompt_token_ids)
        assert o.outputs.data.shape == (len(o.prompt_token_ids), 64)
        _close(o.outputs.data, F.normalize(h, dim=-1))
    raw = embed_llm.encode(LONG, PoolingParams(normalize=False, task="token_embed"),
                           use_tqdm=False)[0]
    _close(raw.outputs.data, _decoder_hidden(ref, raw.prompt_token_ids))
    assert embed_llm.llm_engine.core.kv.usage == 0.0  # every request's blocks are back


def test_decoder_token_embed_after_a_prefix_cache_hit_and_mixed_with_embed(embed_llm, llama):
    long = LONG * 2
    kv = embed_llm.llm_engine.core.kv
    first = embed_llm.embed(long, use_tqdm=False)[0]  # fills the prefix cache
    hits = kv.hits
    rows = embed_llm.encode(long, pooling_task="token_embed", use_tqdm=False)[0]
    assert kv.hits == hits  # a per-token task computes its whole prompt
    h = _decoder_hidden(llama[1], first.prompt_token_ids)
    _close(rows.outputs.data, F.normalize(h, dim=-1))
    _close(first.outputs.embedding, F.normalize(h[-1], dim=-1))
    # one batch of both kinds: each request gets its own task's output
    params = [PoolingParams(task="token_embed"), PoolingParams(task="embed")]
    both = embed_llm.encode([LONG, LONG], params, use_tqdm=False)
    assert both[0].outputs.data.dim() == 2 and both[1].outputs.data.dim() == 1
    _close(both[0].outputs.data[-1], both[1].outputs.data, 1e-5)


def test_embedding_model_refuses_token_classify(embed_llm):
    with pytest.raises(ValueError, match=r"'token_classify' is not supported by this model "
                                         r"\(supported: embed, token_embed\); token_classify "
                                         r"needs a classification model"):
        embed_llm.encode("hi", pooling_task="token_classify", use_tqdm=False)


@pytest.mark.parametrize("n_labels", [3, 1])
def test_decoder_classifier_token_classify(tmp_path, n_labels):
    path, ref = _make_seq_cls(tmp_path / "cls", n_labels)
    llm = LLM(str(path), **SMALL)
    assert llm.llm_engine.config.pooler_config.token_tasks == ("token_classify",)
    outs = llm.encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)
    raw = llm.encode(PROMPTS, PoolingParams(use_activation=False, task="token_classify"),
                     use_tqdm=False)
    seq = llm.classify(PROMPTS, use_tqdm=False)
    for o, r, c in zip(outs, raw, seq):
        logits = _decoder_hidden(ref, o.prompt_token_ids) @ ref.score.weight.float().T
        act = torch.sigmoid(logits) if n_labels == 1 else torch.softmax(logits, dim=-1)
        assert o.outputs.data.shape == (len(o.prompt_token_ids), n_labels)
        _close(o.outputs.data, act)
        _close(r.outputs.data, logits)
        _close(o.outputs.data[-1], c.outputs.probs, 1e-5)  # LAST pooling: the last row
    with pytest.raises(ValueError, match=r"'token_embed' is not supported by this model "
                                         r"\(supported: classify, token_classify\)"):
        llm.encode("hi", pooling_task="token_embed", use_tqdm=False)
    del llm
    # the engine's pooler_config use_activation=False is every request's default
    raw_llm = LLM(str(path), pooler_config={"use_activation": False}, **SMALL)
    o = raw_llm.encode(PROMPTS[0], pooling_task="token_classify", use_tqdm=False)[0]
    _close(o.outputs.data, raw[0].outputs.data, 1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_token_embed_and_token_classify(tmp_path, family):
    tok_path, ref = _make(tmp_path / "emb", family, seed=1)
    tok = _tokenizer(tok_path)
    llm = LLM(str(tok_path), kv_cache_memory=8 << 20)
    texts = ["hello world", "a somewhat longer sentence for every token"]
    outs = llm.encode(texts, pooling_task="token_embed", use_tqdm=False)
    for text, o in zip(texts, outs):
        with torch.no_grad():
            h = ref(**tok(text, return_tensors="pt")).last_hidden_state[0]
        _close(o.outputs.data, F.normalize(h, dim=-1))
    del llm
    n_labels = 3 if family == "bert" else 1
    cls_path, cref = _make(tmp_path / "cls", family, head=True, n_labels=n_labels, seed=2)
    llm = LLM(str(cls_path), kv_cache_memory=8 << 20)
    outs = llm.encode(texts, pooling_task="token_classify", use_tqdm=False)
    for text, o in zip(texts, outs):
        with torch.no_grad():
            base = getattr(cref, family)
            h = base(**tok(text, return_tensors="pt")).last_hidden_state[0]
            if family == "bert":  # the linear classifier on every row (no [CLS] pooler)
                logits = cref.classifier(h)
            else:  # RoBERTa's head: dense + tanh + out_proj on every row
                head = cref.classifier
                logits = head.out_proj(torch.tanh(head.dense(h)))
        act = torch.softmax(logits, dim=-1) if n_labels > 1 else torch.sigmoid(logits)
        assert o.outputs.data.shape == (len(o.prompt_token_ids), n_labels)
        _close(o.outputs.data, act)


@pytest.fixture(scope="module")
def embed_server(llama, tmp_path_factory):
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(llama[0]),
            "--served-model-name", "tiny", "--runner", "pooling", "--max-model-len", "256",
            "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "32"]
    with serving(argv, tmp_path_factory.mktemp("tokpoolsrv") / "server.log",
                 timeout=180) as url:
        yield url


def test_server_token_embed_on_a_chunked_decoder(embed_server, embed_llm, llama):
    ids = embed_llm.get_tokenizer().encode(LONG)
    want = F.normalize(_decoder_hidden(llama[1], ids), dim=-1)
    r = _ok(_post(embed_server, "/pooling", {"input": [LONG, "x"], "task": "token_embed"}))
    _close(r["data"][0]["data"], want)
    assert len(r["data"][1]["data"]) == len(embed_llm.get_tokenizer().encode("x"))
    r = _ok(_post(embed_server, "/pooling", {"input": LONG, "task": "token_embed",
                                             "encoding_format": "base64"}))
    raw = base64.b64decode(r["data"][0]["data"])
    _close(torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)).view(-1, 64), want)
    err = _error(_post(embed_server, "/pooling", {"input": "x", "task": "token_classify"}))
    assert "needs a classification model" in err["message"] and err["param"] == "task"


def test_server_token_classify_on_a_classifier(tmp_path_factory):
    path, ref = _make_seq_cls(tmp_path_factory.mktemp("tokclssrv") / "cls", 3)
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(path),
            "--served-model-name", "tiny", "--max-model-len", "256",
            "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "32"]
    with serving(argv, tmp_path_factory.mktemp("tokclslog") / "server.log",
                 timeout=180) as url:
        r = _ok(_post(url, "/pooling", {"input": LONG, "task": "token_classify"}))
        h = _decoder_hidden(ref, _ids_of(path, LONG))
        _close(r["data"][0]["data"], torch.softmax(h @ ref.score.weight.float().T, dim=-1))
        err = _error(_post(url, "/pooling", {"input": "x"}))  # embed: a classifier does not
        assert err["message"] == "The model does not support Pooling API"


def _ids_of(path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True).encode(text)
