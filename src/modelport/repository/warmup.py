"""model_warmup: synthetic requests run at load, before the model reports ready.

Why: the first call of a model pays for lazy initialization (allocations, kernel
selection, JIT); Triton lets the config run warm-up samples so users never see that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError
from modelport.repository.tensors import InferRequest, InferTensor, from_raw, wire_of_config


def _tensor(cfg: mc.ModelConfig, model_dir: Path, w: mc.ModelWarmup, name: str) -> InferTensor:
    spec = w.inputs[name]
    wire = wire_of_config(mc.DataType.Name(spec.data_type))
    shape = ([max(w.batch_size, 1)] if cfg.max_batch_size > 0 else []) + list(spec.dims)
    if any(d < 0 for d in shape):
        raise ModelConfigError(
            f"model '{cfg.name}': warmup '{w.name}' input '{name}' needs concrete dims, got "
            f"{list(spec.dims)}"
        )
    source = spec.WhichOneof("input_data_type")
    count = int(np.prod(shape)) if shape else 1
    if source == "input_data_file":
        path = model_dir / "warmup" / spec.input_data_file
        if not path.is_file():
            raise ModelConfigError(f"model '{cfg.name}': warmup data file {path} not found")
        data = from_raw(path.read_bytes(), wire, tuple(shape))
    elif wire == "BYTES":
        rng = np.random.default_rng(0)
        fill = [b"" if source == "zero_data" else rng.bytes(8) for _ in range(count)]
        data = np.array(fill, dtype=np.object_).reshape(shape)
    else:
        from modelport.repository.tensors import numpy_dtype

        dtype = numpy_dtype(wire)
        if source == "zero_data":
            data = np.zeros(shape, dtype=dtype)
        else:
            data = np.random.default_rng(0).integers(0, 2, size=shape).astype(dtype)
    return InferTensor(name, wire, data)


def warmup_requests(
    cfg: mc.ModelConfig, model_dir: Path
) -> Iterator[tuple[str, InferRequest, int]]:
    for w in cfg.model_warmup:
        inputs = {name: _tensor(cfg, model_dir, w, name) for name in w.inputs}
        yield w.name, InferRequest(cfg.name, inputs=inputs, id=f"warmup:{w.name}"), max(w.count, 1)
