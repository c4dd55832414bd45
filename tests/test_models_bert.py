"""BERT-family encoders (models/bert.py) against transformers, on tiny random checkpoints
built here with tokenizers made here (a WordPiece for BERT, a byte-level BPE for RoBERTa).

- ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel`` embed as vLLM does by default (CLS,
  L2-normalized), equal to transformers' last hidden state, for a batch of texts of
  different lengths (each request attends only to itself);
- a sentence-transformers folder (modules.json, 1_Pooling MEAN, Normalize) gives the mean
  of transformers' hidden states, normalized; pooler_config overrides it;
- ``*ForSequenceClassification`` cross-encoders: LLM.score is transformers' sigmoid of the
  pair (BERT: token types 0 / 1 from the tokenizer's pair template), LLM.classify its
  softmax; the server's /score and /rerank give the same numbers;
- errors: a text longer than the model's positions (400 on the server), generate() of an
  encoder, an unsupported config option (ValueError naming it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.openai_http import error as _error
from helpers.openai_http import ok as _ok
from helpers.openai_http import post as _post
from helpers.server_proc import serving
from modelport import LLM, SamplingParams

TEXTS = ["hello world", "a much longer text to embed, with words; and more words! " * 2,
         "x", "short one"]
QUERY = "what is the capital of france?"
DOCS = ["paris is the capital of france", "bananas are yellow", "the sky", "berlin, germany"]
SMALL = dict(kv_cache_memory=8 << 20)
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
PUNCT = ".,;:!?'\"-()"


def _wordpiece(path: Path):
    """A real BERT-style WordPiece tokenizer: one piece per character ([CLS] / [SEP] pair
    template with token types 0 / 1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + list(LETTERS + PUNCT) + [f"##{c}" for c in LETTERS + PUNCT]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids",
                                                      "attention_mask"])
    fast.save_pretrained(path)
    return len(vocab)


def _byte_bpe(path: Path):
    """A RoBERTa-style byte-level BPE (no merges): <s> A </s></s> B </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from helpers.tiny_models import _byte_to_char

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b, ch in _byte_to_char().items():
        vocab[ch] = len(specials) + b
    vocab["<mask>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(path)
    return len(vocab)


def _make(path: Path, family: str, head: bool = False, n_labels: int = 1, seed: int = 0,
          **extra):
    """A tiny random encoder (hidden 64, 2 layers, 4 heads) saved with its tokenizer."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        vocab = _wordpiece(path)
        cfg = transformers.BertConfig(vocab_size=vocab, pad_token_id=0, **_shape(), **extra)
    else:
        vocab = _byte_bpe(path)
        conf = transformers.RobertaConfig if family == "roberta" else \
            transformers.XLMRobertaConfig
        cfg = conf(vocab_size=vocab, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                   type_vocab_size=1, **{**_shape(), "max_position_embeddings": 130}, **extra)
    cfg.num_labels = n_labels
    prefix = {"bert": "Bert", "roberta": "Roberta", "xlm": "XLMRoberta"}[family]
    cls = getattr(transformers, f"{prefix}ForSequenceClassification" if head else
                  f"{prefix}Model")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random weights of a visible size (the default init is tiny)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _shape() -> dict:
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=128)


def _hf_hidden(model, tok, text) -> torch.Tensor:
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state[0]


def _close(a, b, tol=1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm"])
def test_embeddings_equal_transformers_cls(tmp_path, family) -> None:
    path, ref = _make(tmp_path / family, family)
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)  # runner auto: an encoder is a pooling model
    outs = llm.embed(TEXTS, use_tqdm=False)
    lens = {len(o.prompt_token_ids) for o in outs}
    assert len(lens) == len(TEXTS)  # different lengths in one batch
    for text, o in zip(TEXTS, outs):
        assert o.prompt_token_ids == tok(text)["input_ids"]
        _close(o.outputs.embedding, F.normalize(_hf_hidden(ref, tok, text)[0], dim=-1))
    one = llm.embed(TEXTS[1], use_tqdm=False)[0]  # alone == in the batch
    _close(one.outputs.embedding, outs[1].outputs.embedding, 1e-5)
    # truncate_prompt_tokens keeps [CLS] and the closing separator: the tokenizer's own
    # right-side truncation
    cut = llm.embed(TEXTS[1], truncate_prompt_tokens=20, use_tqdm=False)[0]
    enc = tok(TEXTS[1], truncation=True, max_length=20)["input_ids"]
    assert cut.prompt_token_ids == enc and len(enc) == 20
    with torch.no_grad():
        first = ref(input_ids=torch.tensor([enc])).last_hidden_state[0, 0]
    _close(cut.outputs.embedding, F.normalize(first, dim=-1))
    cfg = llm.llm_engine.config
    assert not cfg.cache_config.enable_prefix_caching
    assert not cfg.scheduler_config.enable_chunked_prefill
    assert cfg.scheduler_config.max_model_len == 128  # RoBERTa: 130 positions - offset 2
    assert llm.llm_engine.core.runner.kv_caches == []  # an encoder keeps no KV cache


def test_sentence_transformers_folder_mean_and_normalize(tmp_path) -> None:
    path, ref = _make(tmp_path / "st", "bert")
    tok = _tokenizer(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    llm = LLM(str(path), **SMALL)
    assert llm.llm_engine.config.scheduler_config.max_model_len == 40
    outs = llm.embed(TEXTS[:1] + TEXTS[2:], use_tqdm=False)
    for text, o in zip(TEXTS[:1] + TEXTS[2:], outs):
        want = F.normalize(_hf_hidden(ref, tok, text).mean(dim=0), dim=-1)
        _close(o.outputs.embedding, want)
    with pytest.raises(ValueError, match="maximum model length of 40"):
        llm.embed(TEXTS[1], use_tqdm=False)
    # the user's pooler_config wins over the folder's
    raw = LLM(str(path), pooler_config={"pooling_type": "CLS", "normalize": False}, **SMALL)
    _close(raw.embed("hello world", use_tqdm=False)[0].outputs.embedding,
           _hf_hidden(ref, tok, "hello world")[0])
    # a module we cannot reproduce is refused, by name
    mods = json.loads((path / "modules.json").read_text())
    mods.append({"idx": 3, "name": "3", "path": "3_Dense",
                 "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(ValueError, match="Dense.*not supported"):
        LLM(str(path), **SMALL)


# ---------------------------------------------------------------- cross-encoders


def _hf_logits(model, tok, a, b=None) -> torch.Tensor:
    enc = tok(a, b, return_tensors="pt") if b is not None else tok(a, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0]


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm"])
def test_cross_encoder_score_equals_transformers_sigmoid(tmp_path, family) -> None:
    path, ref = _make(tmp_path / family, family, head=True)
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)
    outs = llm.score(QUERY, DOCS, use_tqdm=False)
    for doc, o in zip(DOCS, outs):
        assert o.prompt_token_ids == tok(QUERY, doc)["input_ids"]
        _close(o.outputs.score, torch.sigmoid(_hf_logits(ref, tok, QUERY, doc))[0], 1e-5)
    if family == "bert":  # the second segment's token types matter: they differ from all-0
        enc = tok(QUERY, DOCS[0], return_tensors="pt")
        assert enc["token_type_ids"].sum() > 0
        with torch.no_grad():
            untyped = ref(input_ids=enc["input_ids"]).logits[0, 0]
        assert abs(torch.sigmoid(untyped).item() - outs[0].outputs.score) > 1e-4
    n_n = llm.score(DOCS[:2], DOCS[2:], use_tqdm=False)
    for a, b, o in zip(DOCS[:2], DOCS[2:], n_n):
        _close(o.outputs.score, torch.sigmoid(_hf_logits(ref, tok, a, b))[0], 1e-5)


def test_classifier_softmax_and_generate_refused(tmp_path) -> None:
    path, ref = _make(tmp_path / "cls3", "bert", head=True, n_labels=3)
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)
    for text, o in zip(TEXTS, llm.classify(TEXTS, use_tqdm=False)):
        _close(o.outputs.probs, torch.softmax(_hf_logits(ref, tok, text), -1), 1e-5)
    with pytest.raises(ValueError, match="num_labels == 1"):
        llm.score(QUERY, DOCS[0], use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    emb_path, _ = _make(tmp_path / "emb", "bert")
    with pytest.raises(ValueError, match="encoder .*cannot generate"):
        LLM(str(emb_path), runner="generate", **SMALL)
    emb = LLM(str(emb_path), **SMALL)
    with pytest.raises(ValueError, match="pooling model|generat"):
        emb.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)


def test_unsupported_config_option_is_named(tmp_path) -> None:
    path, _ = _make(tmp_path / "rel", "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'.*absolute"):
        LLM(str(path), **SMALL)
    cfg["position_embedding_type"] = "absolute"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not supported"):
        LLM(str(path), tensor_parallel_size=2, **SMALL)
    with pytest.raises(ValueError, match="quantization is not supported"):
        LLM(str(path), quantization="fp8", **SMALL)


def test_cross_encoder_identity_activation_scores_raw_logits(tmp_path) -> None:
    """sentence-transformers' CrossEncoder with activation_fn Identity scores by the logit."""
    path, ref = _make(tmp_path / "id", "bert", head=True)
    tok = _tokenizer(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (path / "config.json").write_text(json.dumps(cfg))
    o = LLM(str(path), **SMALL).score(QUERY, DOCS[0], use_tqdm=False)[0]
    _close(o.outputs.score, _hf_logits(ref, tok, QUERY, DOCS[0])[0], 1e-5)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("bertsrv") / "cross", "bert", head=True, seed=1)


@pytest.fixture(scope="module")
def base(cross, tmp_path_factory):
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(cross[0]),
            "--served-model-name", "tiny-bert", "--kv-cache-memory", "8MiB"]
    with serving(argv, tmp_path_factory.mktemp("bertlog") / "server.log", timeout=180) as url:
        yield url


def test_server_score_and_rerank_equal_transformers(base, cross) -> None:
    path, ref = cross
    tok = _tokenizer(path)
    want = [torch.sigmoid(_hf_logits(ref, tok, QUERY, d))[0].item() for d in DOCS]
    r = _ok(_post(base, "/score", {"model": "tiny-bert", "text_1": QUERY, "text_2": DOCS}))
    _close([d["score"] for d in r["data"]], want, 1e-5)
    r = _ok(_post(base, "/v1/rerank", {"model": "tiny-bert", "query": QUERY, "documents": DOCS}))
    order = sorted(range(len(DOCS)), key=lambda i: want[i], reverse=True)
    assert [x["index"] for x in r["results"]] == order
    _close([x["relevance_score"] for x in r["results"]], [want[i] for i in order], 1e-5)


def test_server_too_long_is_a_400_and_it_keeps_serving(base) -> None:
    long = "word " * 200  # ~1000 pieces > 128 positions
    err = _error(_post(base, "/rerank", {"query": long, "documents": DOCS}))
    assert "128" in err["message"]
    err = _error(_post(base, "/score", {"text_1": QUERY, "text_2": long}))
    assert "128" in err["message"]
    err = _error(_post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2}))
    assert "Completions" in err["message"]
    assert _post(base, "/rerank", {"query": QUERY, "documents": DOCS[:1]}).status_code == 200
    cut = _ok(_post(base, "/rerank", {"query": long, "documents": DOCS[:1],
                                      "truncate_prompt_tokens": 100}))
    assert cut["usage"]["prompt_tokens"] == 100


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_embeddings_and_scores_equal_transformers(tmp_path) -> None:
    path, ref = _make(tmp_path / "g", "bert")
    tok = _tokenizer(path)
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=8 << 20)
    for text, o in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False)):
        _close(o.outputs.embedding, F.normalize(_hf_hidden(ref, tok, text)[0], dim=-1), 1e-3)
    cpath, cref = _make(tmp_path / "gc", "bert", head=True)
    cllm = LLM(str(cpath), device="cuda", dtype="float32", kv_cache_memory=8 << 20)
    for doc, o in zip(DOCS, cllm.score(QUERY, DOCS, use_tqdm=False)):
        _close(o.outputs.score, torch.sigmoid(_hf_logits(cref, tok, QUERY, doc))[0], 1e-3)
