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
