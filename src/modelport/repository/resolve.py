"""From a model folder (or a load request's JSON override) to a complete, validated config.

The order is Triton's: parse, fill defaults, let the backend complete what the file left
out (ONNX graph, a python model's auto_complete_config), then validate the result.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.backends import backend_names
from modelport.repository.backends.vllm import autocomplete_vllm
from modelport.repository.errors import ServingError
from modelport.repository.model_config import autocomplete, config_from_json, read_config
from modelport.repository.onnx_autocomplete import autocomplete_onnx
from modelport.repository.python_autocomplete import python_auto_complete
from modelport.repository.validation import validate_config
from modelport.repository.versions import select_versions


def _versions(cfg: mc.ModelConfig, path: Path) -> list[int]:
    try:
        return select_versions(cfg, path)
    except ServingError:
        return []  # the caller's own version check reports it


async def resolve_config(
    path: Path,
    config_json: str | None,
    gpus: int,
    auto_complete: bool = True,
    config_name: str = "",
) -> mc.ModelConfig:
    """auto_complete False (--disable-auto-complete-config): the backend completes nothing
    (Triton's defaults are still filled); config_name: --model-config-name."""
    raw = config_from_json(config_json) if config_json else read_config(path, config_name)
    cfg = autocomplete(raw, path, gpus)
    versions = _versions(cfg, path) if auto_complete else []
    if versions and cfg.backend == "onnxruntime" and not (cfg.input and cfg.output):
        cfg = autocomplete_onnx(cfg, path, versions)
    if auto_complete and cfg.backend == "vllm":  # as Triton's vLLM backend completes it
        cfg = autocomplete(autocomplete_vllm(cfg), path, gpus)
    if versions and cfg.backend == "python":
        cfg = autocomplete(await python_auto_complete(cfg, path, max(versions)), path, gpus)
    validate_config(cfg, path.name, backend_names(), gpus)
    return cfg
