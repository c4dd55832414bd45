"""BERT-family token types and pair truncation against transformers (tiny random checkpoints
and tokenizers built by tests/test_models_bert.py's helpers).

- a literal ``[SEP]`` typed inside one text is a separator id in the middle of the prompt,
  yet transformers gives the whole text token type 0: embeddings, classification and the
  first text of a scored pair equal transformers' (types come from the tokenizer's pair
  encoding, carried with the request, never from searching the ids);
- a pair longer than ``truncate_prompt_tokens`` (or max_model_len with -1) is truncated as
  transformers truncates it ('longest_first': the longer text loses a token at a time),
  for BERT and XLM-RoBERTa cross-encoders, the scores equal to transformers' on that
  encoding; bad values are clear errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelport import LLM, PoolingParams
from modelport.models.token_types import compress_token_types
from test_models_bert import SMALL, _make, _tokenizer

SEP_TEXTS = ["hello [SEP] world", "[SEP] starts here", "no separator at all",
             "two [SEP] in [SEP] one"]
SEP_ID = 3  # the WordPiece tokenizer's [SEP]


def _close(a, b, tol=1e-5) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def _hf(model, enc):
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in dict(enc).items()})


def test_literal_sep_inside_one_text_is_type_0_embeddings(tmp_path) -> None:
    path, ref = _make(tmp_path / "emb", "bert")
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)
    outs = llm.embed(SEP_TEXTS, use_tqdm=False)  # one batch: each request its own types
    for text, o in zip(SEP_TEXTS, outs):
        enc = tok(text)
        assert o.prompt_token_ids == enc["input_ids"]
        if "[SEP]" in text:  # the separator id inside the text, with type 0 from transformers
            assert SEP_ID in enc["input_ids"][1:-1] and not any(enc["token_type_ids"])
        want = F.normalize(_hf(ref, enc).last_hidden_state[0, 0], dim=-1)
        _close(o.outputs.embedding, want, 1e-4)
    # what the old rule (type 1 after the first inner [SEP]) would give differs: the test
    # can tell the two apart
    enc = tok(SEP_TEXTS[0])
    cut = enc["input_ids"].index(SEP_ID)
    wrong = dict(enc, token_type_ids=[0] * (cut + 1) + [1] * (len(enc["input_ids"]) - cut - 1))
    wrong_vec = F.normalize(_hf(ref, wrong).last_hidden_state[0, 0], dim=-1)
    assert (torch.tensor(outs[0].outputs.embedding) - wrong_vec).abs().max() > 1e-3


def test_literal_sep_classify_and_score_follow_the_tokenizers_types(tmp_path) -> None:
    path, ref = _make(tmp_path / "cls", "bert", head=True, n_labels=3)
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)
    for text, o in zip(SEP_TEXTS, llm.classify(SEP_TEXTS, use_tqdm=False)):
        _close(o.outputs.probs, torch.softmax(_hf(ref, tok(text)).logits[0], -1))
    cross_path, cross = _make(tmp_path / "cross", "bert", head=True)
    cross_llm = LLM(str(cross_path), **SMALL)
    firsts = ["hello [SEP] world", "plain query"]
    seconds = ["a doc [SEP] with a separator", "[SEP]"]
    outs = cross_llm.score(firsts, seconds, use_tqdm=False)
    for a, b, o in zip(firsts, seconds, outs):
        enc = tok(a, b)
        types = enc["token_type_ids"]
        assert o.prompt_token_ids == enc["input_ids"]
        assert types.index(1) == len(tok(a)["input_ids"])  # type 1 from the second text on
        _close(o.outputs.score, torch.sigmoid(_hf(cross, enc).logits[0, 0]))


def _long_pairs() -> list[tuple[str, str]]:
    short, long_a, long_b = "short query", "a long first text " * 6, "the longer second " * 8
    return [(long_a, short), (short, long_b), (long_a, long_b)]


@pytest.mark.parametrize("family", ["bert", "xlm"])
def test_pair_truncation_is_transformers_longest_first(tmp_path, family) -> None:
    path, ref = _make(tmp_path / family, family, head=True)
    tok = _tokenizer(path)
    llm = LLM(str(path), **SMALL)
    keep = 40
    for a, b in _long_pairs():
        o = llm.score(a, b, truncate_prompt_tokens=keep, use_tqdm=False)[0]
        enc = tok(a, b, truncation=True, max_length=keep)
        assert len(tok(a, b)["input_ids"]) > keep and len(enc["input_ids"]) == keep
        assert o.prompt_token_ids == enc["input_ids"]
        _close(o.outputs.score, torch.sigmoid(_hf(ref, enc).logits[0, 0]))
    # two long texts are cut to equal shares (not "drop the second text's tail")
    a, b = _long_pairs()[2]
    ids = llm.score(a, b, truncate_prompt_tokens=keep, use_tqdm=False)[0].prompt_token_ids
    sep, n_special = (3, 3) if family == "bert" else (2, 4)
    first_len = ids.index(sep) - 1
    second_len = keep - n_special - first_len
    assert first_len < len(tok(a)["input_ids"]) - 2
    assert abs(first_len - second_len) <= 1
    # -1: the model's length; a pair over it is truncated to exactly max_model_len
    huge_a, huge_b = "word " * 40, "other words " * 20
    o = llm.score(huge_a, huge_b, truncate_prompt_tokens=-1, use_tqdm=False)[0]
    enc = tok(huge_a, huge_b, truncation=True, max_length=128)
    assert o.prompt_token_ids == enc["input_ids"] and len(enc["input_ids"]) == 128
    _close(o.outputs.score, torch.sigmoid(_hf(ref, enc).logits[0, 0]))
    # without truncation a pair over max_model_len is refused (vLLM's behaviour)
    with pytest.raises(ValueError, match="maximum model length of 128"):
        llm.score(huge_a, huge_b, use_tqdm=False)
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens \(129\) is greater than "
                                         r"max_model_len \(128\)"):
        llm.score(a, b, truncate_prompt_tokens=129, use_tqdm=False)
    with pytest.raises(ValueError, match="must be -1 .* or >= 1, got 0"):
        llm.score(a, b, truncate_prompt_tokens=0, use_tqdm=False)
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens \(2\) is too small"):
        llm.score(a, b, truncate_prompt_tokens=2, use_tqdm=False)


def test_token_types_unit_rules() -> None:
    assert compress_token_types(None, 3) is None
    assert compress_token_types([0, 0, 0], 3) is None
    assert compress_token_types([0, 0, 1, 1], 4) == 2
    with pytest.raises(ValueError, match="0 for the first segment and 1 after"):
        compress_token_types([0, 1, 0], 3)
    with pytest.raises(ValueError, match="0 for the first segment and 1 after"):
        compress_token_types([0, 2, 2], 3)
    with pytest.raises(ValueError, match="3 entries for 4 tokens"):
        compress_token_types([0, 0, 1], 4)
    p = PoolingParams(token_type_start=5)
    assert PoolingParams.from_dict(p.to_dict()).token_type_start == 5
    assert p.clone().token_type_start == 5
    with pytest.raises(ValueError, match="token_type_start must be an integer >= 1"):
        PoolingParams(token_type_start=0)


@pytest.mark.gpu
def test_cuda_types_and_pair_truncation_equal_transformers(tmp_path) -> None:
    path, ref = _make(tmp_path / "g", "bert", head=True)
    tok = _tokenizer(path)
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=8 << 20)
    pairs = [("hello [SEP] world", "a doc"), *_long_pairs()]
    for a, b in pairs:
        o = llm.score(a, b, truncate_prompt_tokens=40, use_tqdm=False)[0]
        enc = tok(a, b, truncation=True, max_length=40)
        assert o.prompt_token_ids == enc["input_ids"]
        _close(o.outputs.score, torch.sigmoid(_hf(ref, enc).logits[0, 0]), 1e-3)
