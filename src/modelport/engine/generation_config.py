"""Sampling defaults from a model's generation_config.json, as vLLM's `--generation-config`.

"auto" (the default, as vLLM's for `vllm serve` and `LLM(...)`) reads the model folder's
generation_config.json; "vllm" reads nothing (the neutral defaults: temperature 1, no top-k,
...); any other value is a folder whose generation_config.json is read instead.
`override_generation_config` is merged over what was read (with "vllm" too, as vLLM does).

Of the file's keys only the sampling ones count: temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens (a request's default max_tokens, and as vLLM's a cap
on the server's max_tokens). HF's do_sample is ignored, as vLLM ignores it: a file with
``{"do_sample": false, "temperature": 0.6}`` gives temperature 0.6. These defaults apply to
the fields a request leaves out, on every path that builds SamplingParams from a request
(``with_sampling_defaults``: the OpenAI server, the KServe / Triton ``llm`` backend,
``modelport generate``), and to ``LLM.generate`` / ``LLM.chat`` without SamplingParams
(``LLM.get_default_sampling_params()``). A GGUF file has no
generation config: nothing changes for it, nor for a file of bos / eos ids only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json keys that become sampling defaults (max_new_tokens: max_tokens)
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p",
                 "max_new_tokens")


def read_generation_config(folder: Path) -> dict[str, Any]:
    """folder/generation_config.json as a dict; {} when there is none, or (with a warning)
    when it is not a JSON object, as vLLM falls back to no generation config."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        logger.warning("ignoring %s: not readable JSON (%s)", path, e)
        return {}
    if not isinstance(data, dict):
        logger.warning("ignoring %s: not a JSON object", path)
        return {}
    return data


def default_sampling_params(model_source: Any, generation_config: str = "auto",
                            override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampling defaults (SamplingParams field names) the generation config gives: vLLM's
    ``ModelConfig.get_diff_sampling_param``. {} when it gives none."""
    if override is not None and not isinstance(override, dict):
        raise ValueError(f"override_generation_config must be a dict (JSON object), got "
                         f"{type(override).__name__}")
    if generation_config is None or generation_config == "vllm":
        config: dict[str, Any] = {}
    elif generation_config == "auto":
        # a GGUF file carries no generation_config.json
        config = read_generation_config(model_source.path) if model_source.kind == "hf" else {}
    else:
        folder = Path(generation_config).expanduser()
        if not folder.is_dir():
            raise ValueError(f"generation_config {generation_config!r}: not 'auto', 'vllm' or "
                             "a folder holding a generation_config.json")
        config = read_generation_config(folder)
        if not config:
            logger.warning("generation_config %s: no generation_config.json there; no "
                           "sampling defaults from it", folder)
    config = {**config, **(override or {})}
    found = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
    if "max_new_tokens" in found:  # HF's name for vLLM's max_tokens
        found["max_tokens"] = found.pop("max_new_tokens")
    if found:
        from modelport.sampling_params import SamplingParams

        where = _where(model_source, generation_config)
        if override and generation_config != "vllm":
            where += " with override_generation_config"

        try:  # a bad value is the start-up's error, not every request's 400
            SamplingParams(**found)
        except (ValueError, TypeError) as e:
            raise ValueError(f"generation config ({where}): {e}") from None
        logger.warning(
            "Default sampling parameters have been overridden by the model's Hugging Face "
            "generation config recommended from the model creator (%s): %s. If this is not "
            "intended, relaunch with --generation-config vllm (LLM(generation_config='vllm')).",
            where, found)
    return found


def with_sampling_defaults(given: dict[str, Any],
                           defaults: dict[str, Any] | None) -> dict[str, Any]:
    """SamplingParams keywords for a request: the fields it sends (``given``; None is "not
    sent", as in vLLM), the generation config's defaults for those it leaves out, and the
    defaults' max_tokens as a cap on a larger max_tokens sent (vLLM's get_max_tokens). The
    one merge every frontend uses, so they cannot drift apart."""
    defaults = defaults or {}
    out = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    cap, sent = defaults.get("max_tokens"), given.get("max_tokens")
    if cap is not None and isinstance(sent, int) and not isinstance(sent, bool):
        out["max_tokens"] = min(sent, cap)
    return out


def _where(model_source: Any, generation_config: str | None) -> str:
    if generation_config in (None, "vllm"):
        return "override_generation_config"
    if generation_config == "auto":
        return str(Path(model_source.path) / "generation_config.json")
    return str(Path(generation_config) / "generation_config.json")
