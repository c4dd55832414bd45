"""Fill an ONNX model's missing config from the graph itself (Triton's auto-complete).

Why: Triton serves a bare `model.onnx` with a config that names only the backend (or with
no config.pbtxt at all); users rely on that. Inputs and outputs come from the graph; when
every tensor's first dimension is dynamic and max_batch_size was not given, the model is
taken as batching with Triton's default max_batch_size of 4 and dynamic batching on.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError

DEFAULT_MAX_BATCH_SIZE = 4

_ORT_TYPES = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(string)": mc.TYPE_STRING,
    "tensor(bfloat16)": mc.TYPE_BF16,
}


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def autocomplete_onnx(cfg: mc.ModelConfig, model_dir: Path, versions: list[int]) -> mc.ModelConfig:
    """Return `cfg` with inputs/outputs (and batching) filled from the newest version's graph."""
    if cfg.input and cfg.output:
        return cfg
    path = model_dir / str(max(versions)) / (cfg.default_model_filename or "model.onnx")
    if not path.is_file():
        return cfg  # the backend reports the missing file
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelConfigError(
            f"model '{cfg.name}': onnxruntime failed to load {path}: {e}"
        ) from None
    graph_in, graph_out = session.get_inputs(), session.get_outputs()
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    batching = cfg.max_batch_size > 0
    if cfg.max_batch_size == 0 and not cfg.input and not cfg.output:
        shapes = [t.shape for t in [*graph_in, *graph_out]]
        if shapes and all(s and _dims(s)[0] == -1 for s in shapes):
            batching = True
            out.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not out.HasField("dynamic_batching"):
                out.dynamic_batching.SetInParent()
    for field, tensors in (("input", graph_in), ("output", graph_out)):
        target = getattr(out, field)
        if len(target):
            continue
        for t in tensors:
            dtype = _ORT_TYPES.get(t.type)
            if dtype is None:
                raise ModelConfigError(
                    f"model '{cfg.name}': {field} '{t.name}' has unsupported type {t.type}"
                )
            dims = _dims(t.shape)
            if batching:
                dims = dims[1:]
            target.add(name=t.name, data_type=dtype, dims=dims or [1])
    return out
