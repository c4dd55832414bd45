"""Tied-embedding checkpoints load whichever copy of the shared matrix they store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny_models import TINY_PROMPT, make_tiny_llama_dir, run_one_sequence
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _load(path: Path) -> torch.nn.Module:
    src = resolve_model(str(path))
    return load_model(src, load_model_config(src), LoadConfig(), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tied") / "tiny", with_tokenizer=False,
                               tie_word_embeddings=True)


def _rewrite(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors")
    return dst


def test_tied_checkpoint_storing_only_the_head_loads_it_as_the_embedding(
    tied: Path, tmp_path: Path
) -> None:
    def only_head(t: dict) -> dict:
        t[HEAD] = t.pop(EMBED)
        return t

    head_only = _rewrite(tied, tmp_path / "head-only", only_head)
    assert EMBED not in load_file(head_only / "model.safetensors")
    ref, got = _load(tied), _load(head_only)
    assert torch.equal(got.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(run_one_sequence(got, TINY_PROMPT), run_one_sequence(ref, TINY_PROMPT))


def test_tied_checkpoint_with_both_copies_keeps_the_embedding(tied: Path, tmp_path: Path) -> None:
    def both(t: dict) -> dict:  # a head copy that disagrees: the embedding wins, as in HF
        t[HEAD] = t[EMBED] + 1.0
        return t

    ref, got = _load(tied), _load(_rewrite(tied, tmp_path / "both", both))
    assert torch.equal(got.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_tied_checkpoint_with_neither_copy_names_the_embedding(tied: Path, tmp_path: Path) -> None:
    def neither(t: dict) -> dict:
        t.pop(EMBED)
        return t

    with pytest.raises(ValueError, match="missing weights for model.embed_tokens.weight"):
        _load(_rewrite(tied, tmp_path / "neither", neither))
