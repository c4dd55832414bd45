"""README statements checked against what the code does (a user reads the README first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM

README = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())


def test_readme_classification_errors_are_the_ones_raised(tmp_path: Path) -> None:
    """The README once said score/classify were ValueErrors 'no classification heads' and that
    /classify, /score and /rerank were 404s; they are served (vLLM's shapes) and on a
    generative model are vLLM's errors, which the README quotes."""
    assert "are 404s saying so" not in README
    assert "(no classification heads)" not in README
    llm = LLM(str(make_tiny_llama_dir(tmp_path / "m")), kv_cache_memory=8 << 20,
              max_model_len=256)
    with pytest.raises(ValueError) as err:
        llm.classify("hello", use_tqdm=False)
    assert str(err.value) in README
    assert '"The model does not support Classification API"' in README


def test_readme_names_a_gguf_model_by_its_file_stem() -> None:
    """`--model path/to/file.gguf`: clients may send the path or the file stem (not the file
    name), which the README says."""
    import argparse

    from modelport.entrypoints.openai.api_server import served_names
    from modelport.loader import resolve_model

    path = str(resolve_model(None).path)  # the embedded default, a .gguf file
    assert path.endswith(".gguf")
    src = resolve_model(path)
    stem = Path(path).stem
    assert served_names(argparse.Namespace(model=path), src.name) == [path, stem]
    assert f"a `.gguf` file: its file stem, e.g. `{stem}`" in README
