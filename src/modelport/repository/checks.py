"""Request checks against a model's config, with Triton's error messages.

Run once, before a request is queued, so a bad request never reaches a batch where it
could fail its neighbours.
"""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import InvalidArgument
from modelport.repository.tensors import InferRequest, wire_of_config


def _shape_ok(expected: list[int], got: list[int]) -> bool:
    return len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got))


def check_request(cfg: mc.ModelConfig, req: InferRequest) -> int:
    """Validate inputs and requested outputs; return the batch size (1 for non-batching)."""
    rid = f"[request id: {req.id}] " if req.id else ""
    declared = {i.name: i for i in cfg.input}
    for name in req.inputs:
        if name not in declared:
            raise InvalidArgument(
                f"{rid}unexpected inference input '{name}' for model '{cfg.name}'"
            )
    required = [i.name for i in cfg.input if not i.optional]
    missing = [n for n in required if n not in req.inputs]
    if missing:
        raise InvalidArgument(
            f"{rid}expected {len(required)} inputs but got {len(req.inputs)} inputs for model "
            f"'{cfg.name}'. Got input(s) {sorted(req.inputs)}, but missing required input(s) "
            f"{missing}. Please provide all required input(s)."
        )
    outputs = {o.name for o in cfg.output}
    for name in req.requested_outputs or []:
        if outputs and name not in outputs:
            raise InvalidArgument(
                f"{rid}unexpected inference output '{name}' for model '{cfg.name}'"
            )
    batch: int | None = None
    for name, tensor in req.inputs.items():
        io = declared[name]
        want = wire_of_config(mc.DataType.Name(io.data_type))
        if tensor.datatype != want:
            raise InvalidArgument(
                f"{rid}unexpected datatype TYPE_{tensor.datatype} for inference input "
                f"'{name}', expecting {mc.DataType.Name(io.data_type)} for model '{cfg.name}'"
            )
        shape = list(tensor.data.shape)
        dims = list(io.dims)
        if cfg.max_batch_size > 0:
            if not shape:
                raise InvalidArgument(
                    f"{rid}input '{name}' for model '{cfg.name}' has no batch dimension"
                )
            b = shape[0]
            if batch is None:
                batch = b
            elif b != batch:
                raise InvalidArgument(
                    f"{rid}input '{name}' batch size {b} does not match other inputs' batch "
                    f"size {batch} for model '{cfg.name}'"
                )
            if b < 1 or b > cfg.max_batch_size:
                raise InvalidArgument(
                    f"{rid}inference request batch-size must be <= {cfg.max_batch_size} for "
                    f"'{cfg.name}'"
                )
            expected, got = [-1, *dims], shape
        else:
            expected, got = dims, shape
        if io.HasField("reshape") and not _shape_ok(expected, got):
            # a reshape lets clients send the reshaped form too
            alt = ([-1] if cfg.max_batch_size > 0 else []) + list(io.reshape.shape)
            if _shape_ok(alt, got):
                continue
        if not _shape_ok(expected, got):
            shown = ([-1] if cfg.max_batch_size > 0 else []) + dims
            raise InvalidArgument(
                f"{rid}unexpected shape for input '{name}' for model '{cfg.name}'. Expected "
                f"{_fmt(shown)}, got {_fmt(got)}"
            )
        if tensor.datatype == "BYTES" and tensor.data.dtype != np.object_:
            raise InvalidArgument(f"{rid}input '{name}' must hold bytes elements")
    return batch if batch is not None else 1


def _fmt(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
