"""BGE-M3 (BAAI/bge-m3): which architecture serves a checkpoint, and which extra heads it has.

Pure Python (no torch), so the engine config can ask it. BGE-M3 is an ``XLMRobertaModel``
checkpoint whose two retrieval heads live beside ``model.safetensors`` as plain torch state
dicts: ``sparse_linear.pt`` (hidden -> 1: per-token lexical weights) and
``colbert_linear.pt`` (hidden -> colbert dim: per-token ColBERT vectors). vLLM serves it as
``BgeM3EmbeddingModel`` when ``hf_overrides={"architectures": ["BgeM3EmbeddingModel"]}`` says
so; here that works too, and an ``XLMRobertaModel`` folder holding either file is served
that way without being told (config.json cannot say it: the heads are not in it).

Pooling tasks: "embed" (the dense CLS vector, as any XLM-R encoder), "token_classify" (with
sparse_linear.pt) and "token_embed" (with colbert_linear.pt).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelport.config import ModelConfig, merge_rope_overrides

logger = logging.getLogger(__name__)

BGE_M3_ARCHITECTURE = "BgeM3EmbeddingModel"
# head file -> (module name in the model, the pooling task it serves)
HEAD_FILES = {
    "sparse_linear.pt": ("sparse_linear", "token_classify"),
    "colbert_linear.pt": ("colbert_linear", "token_embed"),
}


def head_files(model_dir: Path | None) -> list[str]:
    """The BGE-M3 head files present in a checkpoint folder, in HEAD_FILES order."""
    if model_dir is None:
        return []
    return [f for f in HEAD_FILES if (Path(model_dir) / f).is_file()]


def token_tasks(model_dir: Path | None) -> tuple[str, ...]:
    """The per-token pooling tasks the folder's heads serve ("token_classify", "token_embed")."""
    return tuple(HEAD_FILES[f][1] for f in head_files(model_dir))


def apply_hf_overrides(model_config: ModelConfig, overrides: dict[str, Any] | None
                       ) -> ModelConfig:
    """vLLM's ``hf_overrides``: config.json's keys replaced by the given ones (ValueError
    for a value the config cannot take)."""
    if not overrides:
        return model_config
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides must be a dict, got {type(overrides).__name__}")
    archs = overrides.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not archs
                              or not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"hf_overrides['architectures'] must be a non-empty list of names, "
                         f"got {archs!r}")
    try:
        return ModelConfig.from_hf_dict(merge_rope_overrides(model_config.hf_config, overrides))
    except (TypeError, KeyError) as e:
        raise ValueError(f"hf_overrides: invalid model config ({e})") from None


def select_bge_m3(model_config: ModelConfig, model_dir: Path | None) -> ModelConfig:
    """An ``XLMRobertaModel`` folder with BGE-M3 head files becomes ``BgeM3EmbeddingModel``;
    logs which heads the served model has."""
    arch = model_config.architecture
    files = head_files(model_dir)
    if arch == "XLMRobertaModel" and files:
        hf = {**model_config.hf_config, "architectures": [BGE_M3_ARCHITECTURE]}
        model_config = replace(model_config, architecture=BGE_M3_ARCHITECTURE, hf_config=hf)
        logger.info("%s holds %s: serving it as %s", model_dir, ", ".join(files),
                    BGE_M3_ARCHITECTURE)
    elif arch != BGE_M3_ARCHITECTURE:
        return model_config
    if files:
        logger.info("%s heads: %s (pooling tasks embed, %s)", BGE_M3_ARCHITECTURE,
                    ", ".join(HEAD_FILES[f][0] for f in files),
                    ", ".join(HEAD_FILES[f][1] for f in files))
    else:
        logger.warning("%s: no sparse_linear.pt / colbert_linear.pt in %s: only the dense "
                       "embedding (task embed) is served", BGE_M3_ARCHITECTURE, model_dir)
    return model_config
