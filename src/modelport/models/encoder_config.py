"""Encoder-only (BERT-family) models: what the engine must know before building one.

Pure Python (no torch), so the engine config can ask it: which architectures are encoders,
how many positions they really have (RoBERTa's position ids start after ``padding_idx``),
and how a sentence-transformers folder pools (``modules.json`` + ``1_Pooling/config.json``,
``sentence_bert_config.json``'s ``max_seq_length``), so a served folder gives the vectors
sentence-transformers would.

Defaults without a sentence-transformers config (vLLM's): CLS pooling, L2-normalized, for
embedding models; CLS for the classification heads (which read the first token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# BgeM3EmbeddingModel: XLM-R with BGE-M3's sparse / ColBERT heads (models/bge_m3.py)
ENCODER_EMBED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel",
                               "BgeM3EmbeddingModel")
ENCODER_CLS_ARCHITECTURES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
)
ENCODER_ARCHITECTURES = ENCODER_EMBED_ARCHITECTURES + ENCODER_CLS_ARCHITECTURES

# sentence-transformers module types we reproduce (modules.json "type", last dotted part)
_ST_MODULES = ("Transformer", "Pooling", "Normalize")
# 1_Pooling/config.json switch -> our pooling type
_ST_POOLING = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}
_ST_POOLING_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                           "pooling_mode_weightedmean_tokens")
_ST_POOLING_NAMES = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}


def is_encoder(architecture: str) -> bool:
    return architecture in ENCODER_ARCHITECTURES


def position_offset(hf_config: dict[str, Any]) -> int:
    """RoBERTa / XLM-R number positions from ``pad_token_id + 1`` (fairseq's convention);
    BERT from 0."""
    if hf_config.get("model_type") in ("roberta", "xlm-roberta") or any(
            "Roberta" in a or a == "BgeM3EmbeddingModel"
            for a in hf_config.get("architectures") or ()):
        return int(hf_config.get("pad_token_id", 1)) + 1
    return 0


@dataclass(frozen=True)
class EncoderSettings:
    """What an encoder checkpoint asks of the engine: its longest prompt and its pooling."""

    max_len: int  # positions the model can embed (sentence-transformers' max_seq_length)
    max_positions: int  # the model's own limit, whatever sentence-transformers says
    pooler_defaults: dict[str, Any]  # pooling_type / normalize, before the user's pooler_config

    def pooler_config(self, given: Any) -> Any:
        """The user's pooler_config (a dict or None) over the checkpoint's defaults."""
        if given is not None and not isinstance(given, dict):
            return given  # a PoolerConfig: the user's whole choice
        merged = dict(self.pooler_defaults)
        merged.update({k: v for k, v in (given or {}).items() if v is not None})
        return merged


def encoder_settings(model_dir: Path | None, hf_config: dict[str, Any]) -> EncoderSettings | None:
    """None for a decoder; ValueError for a sentence-transformers folder we cannot reproduce."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else ""
    if not is_encoder(arch):
        return None
    positions = int(hf_config.get("max_position_embeddings", 512)) - position_offset(hf_config)
    if positions < 1:
        raise ValueError(f"{arch}: max_position_embeddings leaves no positions after the "
                         f"padding offset ({position_offset(hf_config)})")
    classifier = arch in ENCODER_CLS_ARCHITECTURES
    defaults: dict[str, Any] = {"pooling_type": "CLS"}
    if not classifier:
        defaults["normalize"] = True
    elif not _cross_encoder_activation(hf_config):
        defaults["use_activation"] = False
    max_len = positions
    if model_dir is not None:
        st = _sentence_transformers_pooling(model_dir)
        if st is not None and not classifier:
            defaults = st
        seq = _st_max_seq_length(model_dir)
        if seq is not None:
            max_len = min(max_len, seq)
    return EncoderSettings(max_len=max_len, max_positions=positions, pooler_defaults=defaults)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _st_max_seq_length(model_dir: Path) -> int | None:
    path = model_dir / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = _read_json(path).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _sentence_transformers_pooling(model_dir: Path) -> dict[str, Any] | None:
    """{"pooling_type", "normalize"} from modules.json, or None without one."""
    path = model_dir / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list):
        raise ValueError(f"{path}: expected a list of modules")
    pooling: str | None = None
    normalize = False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _ST_MODULES:
            raise ValueError(f"{path}: sentence-transformers module {m.get('type')!r} is not "
                             f"supported; supported: {', '.join(_ST_MODULES)}")
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            pooling = _st_pooling_type(model_dir / str(m.get("path", "1_Pooling")))
    if pooling is None:
        raise ValueError(f"{path}: no Pooling module; sentence-transformers needs one")
    return {"pooling_type": pooling, "normalize": normalize}


def _st_pooling_type(folder: Path) -> str:
    cfg = _read_json(folder / "config.json")
    if cfg.get("include_prompt") is False:
        raise ValueError(f"{folder}/config.json: include_prompt=false is not supported")
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers spelling
        mode = cfg["pooling_mode"].lower()
        if mode not in _ST_POOLING_NAMES:
            raise ValueError(f"{folder}/config.json: pooling_mode {mode!r} is not supported; "
                             f"supported: {', '.join(_ST_POOLING_NAMES)}")
        return _ST_POOLING_NAMES[mode]
    bad = [k for k in _ST_POOLING_UNSUPPORTED if cfg.get(k)]
    on = [v for k, v in _ST_POOLING.items() if cfg.get(k)]
    if bad or len(on) != 1:
        raise ValueError(f"{folder}/config.json: pooling {bad or on or 'none'} is not supported; "
                         "supported: exactly one of pooling_mode_cls_token, "
                         "pooling_mode_mean_tokens, pooling_mode_lasttoken")
    return on[0]


def _cross_encoder_activation(hf_config: dict[str, Any]) -> bool:
    """Whether a sentence-transformers CrossEncoder applies its activation (config.json's
    ``sentence_transformers.activation_fn``): Sigmoid / Softmax or none named -> True (the
    runner's sigmoid for one label, softmax for several), Identity -> False (raw logits)."""
    st = hf_config.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    if not name:
        return True
    kind = str(name).rsplit(".", 1)[-1]
    if kind in ("Sigmoid", "Softmax"):
        return True
    if kind == "Identity":
        return False
    raise ValueError(f"config.json sentence_transformers.activation_fn {name!r} is not "
                     "supported; supported: Sigmoid, Softmax, Identity")
