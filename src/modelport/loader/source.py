"""Where a model lives: resolve a user's ``--model`` string to a local source, offline only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelport.loader.default_model import default_model_path

# The embedded default's served name: `--model SmolLM2-135M-Instruct` (what clients send as
# "model") names it too, unless a folder or file of that name is here.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """A resolved, local model.

    kind: "hf" (a folder with config.json + *.safetensors) or "gguf" (one .gguf file).
    name: the display / served name (the folder name, the file stem, or the repo id).
    """

    kind: str
    path: Path
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "gguf"):
            raise ValueError(f"ModelSource.kind must be 'hf' or 'gguf', got {self.kind!r}")


def _not_found(model: str, why: str = "", hint: str = "") -> ValueError:
    return ValueError(
        f"model {model!r} not found{why}: expected a local folder with config.json, a .gguf "
        "file, or the id of a model already in the local Hugging Face cache (nothing is "
        f"downloaded){hint}"
    )


def _from_hf_cache(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The snapshot folder of repo_id in huggingface_hub's cache, without any network call."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        hit = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=str(cache_dir) if cache_dir else None
        )
    except Exception:  # an invalid repo id: not in the cache either way
        return None
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit).parent
    return None


def resolve_model(model: str | None) -> ModelSource:
    """None -> the embedded default GGUF; else a folder, a .gguf file or a cached repo id."""
    if model is None:
        path = default_model_path()
        return ModelSource("gguf", path, DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(model, " (the folder has no config.json)")
        return ModelSource("hf", path.resolve(), path.resolve().name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _not_found(model, f" (a file, but not a .gguf file: {path.name})")
        return ModelSource("gguf", path.resolve(), path.stem)
    cached = _from_hf_cache(model)
    if cached is not None:
        return ModelSource("hf", cached, model)
    if model == DEFAULT_MODEL_NAME:
        return resolve_model(None)
    raise _not_found(
        model,
        hint=f"; leave the model out (`LLM()`, `modelport serve` without --model) or name it "
        f"{DEFAULT_MODEL_NAME!r} for the embedded default",
    )
