"""Tokenizers from HF folders and GGUF files, and sandboxed chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_llama_gguf
from modelport.frontend.tokenizer import Tokenizer, load_tokenizer
from modelport.loader import resolve_model

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name two colours. 🎨"},
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tok") / "tiny")


def test_default_tokenizer_basics(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == (2,) and smol.bos_token_id == 1
    ids = smol.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314]  # SmolLM2 adds no BOS
    assert smol.encode(" Paris", add_special_tokens=False) == [7042]
    assert smol.convert_ids_to_tokens([7042]) == ["ĠParis"]
    for text in ("Hello, world!", "日本語 😀 naïve café", "  two  spaces\n\tand tabs . ,"):
        assert smol.decode(smol.encode(text)) == text
    assert smol.decode([1, 504, 2], skip_special_tokens=False) == "<|im_start|>The<|im_end|>"
    assert smol.decode([1, 504, 2]) == "The"


def test_default_chat_template_matches_transformers(smol: Tokenizer) -> None:
    prompt = smol.apply_chat_template(MESSAGES)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nName two colours. 🎨<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == smol.hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    # the template adds SmolLM's default system prompt when none is given
    assert "You are a helpful AI assistant named SmolLM" in smol.apply_chat_template(
        MESSAGES[1:], add_generation_prompt=False
    )


def test_text_parts_are_flattened(smol: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name two colours. 🎨"}]}]
    assert smol.apply_chat_template([MESSAGES[0], *parts]) == smol.apply_chat_template(MESSAGES)


def test_hf_folder_tokenizer(tiny_dir: Path) -> None:
    tok = load_tokenizer(resolve_model(str(tiny_dir)))
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.eos_token_ids == (257,) and tok.bos_token_id == 256
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|bos|>user\nhi<|eos|>\n<|bos|>assistant\n"
    )


def test_gguf_tokenizer_is_cached(tiny_dir: Path, tmp_path: Path) -> None:
    gguf_file = make_tiny_llama_gguf(tiny_dir, tmp_path / "tiny.gguf")
    src = resolve_model(str(gguf_file))
    first = load_tokenizer(src, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "gguf-tokenizer").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    second = load_tokenizer(src, cache_dir=tmp_path / "cache")
    text = "GGUF 字 😀"
    assert first.encode(text) == second.encode(text) == list(text.encode())
    assert second.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|bos|>user")


def test_no_chat_template_is_a_clear_error(tiny_dir: Path) -> None:
    tok = load_tokenizer(resolve_model(str(tiny_dir)))
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_is_sandboxed(tiny_dir: Path) -> None:
    tok = load_tokenizer(resolve_model(str(tiny_dir)))
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template error"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ValueError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ tools | tojson }}{{ messages[0]['content'] }}"
    rendered = tok.apply_chat_template([{"role": "user", "content": "é"}], tools=[{"n": "ü"}])
    assert rendered == '[{"n": "ü"}]é'


def test_tokenizer_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(resolve_model(str(tmp_path)))


def test_eos_ids_include_the_models_own(tiny_dir: Path, tmp_path: Path) -> None:
    import json

    d = tmp_path / "eos"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 10]}))
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = [257, 13]
    (d / "config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(resolve_model(str(d)))
    assert tok.eos_token_ids == (257, 13, 10)  # the tokenizer's own eos first


@pytest.mark.parametrize("which", ["smol", "tiny"])
def test_the_wrapper_is_also_the_hf_tokenizer(which: str, smol: Tokenizer, tiny_dir: Path) -> None:
    """vLLM's llm.get_tokenizer() is the HF tokenizer: whatever the wrapper lacks is HF's,
    for the GGUF-converted default tokenizer and an HF folder's alike."""
    tok = smol if which == "smol" else load_tokenizer(resolve_model(str(tiny_dir)))
    hf = tok.hf
    text = "The capital of France is"
    assert tok.eos_token_id == hf.eos_token_id == tok.eos_token_ids[0]
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token == hf.eos_token
    assert tok.pad_token_id == hf.pad_token_id and tok.all_special_ids == hf.all_special_ids
    assert tok(text)["input_ids"] == hf(text)["input_ids"] == tok.encode(text)
    assert tok([text, "hi"])["input_ids"] == hf([text, "hi"])["input_ids"]
    assert len(tok) == len(hf) == tok.vocab_size
    assert tok.get_vocab() == hf.get_vocab()
    assert tok.batch_decode([tok.encode(text)]) == [text]
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(tok.encode(text))) == tok.encode(text)
    assert tok.decode(tok.encode(text)[0]) == hf.decode(tok.encode(text)[0])  # one int
    assert tok.decode([tok.encode(text), tok.encode("hi")]) == [text, "hi"]
    assert tok.encode(text, return_tensors="pt").tolist() == [tok.encode(text)]
    assert tok.decode(tok.encode(text, return_tensors="pt")[0]) == text
    # HF's chat-template options: tokenize=False is our text, tokenize=True HF's ids
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert ids == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    out = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                  return_dict=True)
    assert out["input_ids"] == ids
    assert tok.apply_chat_template(MESSAGES, chat_template="{{ messages[0]['content'] }}") == (
        "Be brief."
    )


def test_hf_attribute_writes_reach_the_hf_tokenizer(tiny_dir: Path) -> None:
    import copy
    import pickle

    tok = load_tokenizer(resolve_model(str(tiny_dir)))
    tok.pad_token = tok.eos_token  # the usual "no pad token" fix reaches HF
    assert tok.hf.pad_token == "<|eos|>" and tok.pad_token_id == 257
    assert tok(["a", "abc"], padding=True)["input_ids"][0] == [97, 257, 257]
    tok.chat_template = "{{ 'x' }}"  # our own attributes stay ours
    assert tok.apply_chat_template([]) == "x" and tok.hf.chat_template != "{{ 'x' }}"
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode("hé") == [104, 195, 169] and clone.eos_token_id == 257
    with pytest.raises(AttributeError):
        tok.no_such_attribute  # noqa: B018
