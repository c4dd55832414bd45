"""Notes on how a plan sized a model where that is not the obvious way (shown under the table
and in the JSON): sliding-window layers counted as full attention, MoE GGUF files that load
dequantized (on a GPU)."""

from __future__ import annotations

from modelport.config import ModelConfig
from modelport.planner.model_source import ModelSource


def sliding_layers(model: ModelConfig) -> int:
    """How many layers attend through a window shorter than the model's context, from the
    config as the model files read it (``layer_types``, else ``sliding_window`` on every
    layer; Qwen only with ``use_sliding_window``)."""
    hf = model.hf_config
    window = hf.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool):
        return 0
    if window >= model.max_position_embeddings:
        return 0
    if model.architecture.startswith("Qwen") and not hf.get("use_sliding_window"):
        return 0
    types = hf.get("layer_types")
    if isinstance(types, list):
        return sum(t == "sliding_attention" for t in types)
    return model.num_hidden_layers


def plan_notes(source: ModelSource, act_dtype: str, kept: bool = False) -> tuple[str, ...]:
    model, out = source.config, []
    n = sliding_layers(model)
    if n == model.num_hidden_layers:
        out.append(
            f"every layer attends through a {model.hf_config['sliding_window']}-token sliding "
            "window; the KV cache is sized as full attention, and the engine gives back a "
            "request's blocks as they leave the window while it runs"
        )
    elif n:
        out.append(
            f"{n} of {model.num_hidden_layers} layers attend through a "
            f"{model.hf_config['sliding_window']}-token sliding window; their KV cache is sized "
            "as full attention (with full-attention layers beside them, the engine keeps every "
            "layer's blocks for the whole sequence)"
        )
    if source.gguf_moe and not kept:
        out.append(
            f"mixture-of-experts GGUF: every expert counted; the file's "
            f"{source.quantization or 'quantized'} tensors load dequantized to {act_dtype} "
            "(GGUF experts stay in blocks on CPU only), so memory holds the dense size"
        )
    return tuple(out)
