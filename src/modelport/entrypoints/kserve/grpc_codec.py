"""gRPC ModelInferRequest / ModelInferResponse <-> repository requests and responses.

Tensors arrive either as `raw_input_contents` (what tritonclient sends) or in the typed
`contents` fields (other clients), or name a system shared memory region.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelport.entrypoints.kserve import http_codec
from modelport.entrypoints.kserve.http_codec import int_param, request_scalars, shm_params
from modelport.entrypoints.kserve.shared_memory import SharedMemoryRegistry
from modelport.repository.errors import InvalidArgument, Unsupported
from modelport.repository.tensors import (
    SEQUENCE_PARAMS,
    WIRE_DTYPES,
    InferRequest,
    InferResponse,
    InferTensor,
    from_raw,
    numpy_dtype,
    to_raw,
)

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_version(v: str) -> int:
    if not v:
        return -1
    return http_codec.parse_version(v)


def _shm(params: Any, what: str) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor's parameters name a shared memory region."""
    if "shared_memory_region" not in params:
        return None
    values = {k: param_value(v) for k, v in params.items()}
    return shm_params(values, what)


def decode_request(
    msg: pb.ModelInferRequest, shm: SharedMemoryRegistry | None = None
) -> tuple[InferRequest, dict[str, tuple[str, int, int]]]:
    """The request, and the outputs to be written to shared memory regions."""
    params = {k: param_value(v) for k, v in msg.parameters.items()}
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise InvalidArgument(f"expected {len(msg.inputs)} raw input contents, got {len(raw)}")
    inputs: dict[str, InferTensor] = {}
    for i, t in enumerate(msg.inputs):
        if t.datatype not in WIRE_DTYPES:
            raise InvalidArgument(f"invalid datatype '{t.datatype}' for input '{t.name}'")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"invalid shape {list(shape)} for input '{t.name}'")
        if t.name in inputs:
            raise InvalidArgument(f"input '{t.name}' is given more than once")
        has_contents = t.HasField("contents") and t.contents.ByteSize() > 0
        region = _shm(t.parameters, f"input '{t.name}'")
        if (region is not None or raw) and has_contents:
            # Triton's rule: one source of data per input
            raise InvalidArgument(
                f"contents field must not be specified for input '{t.name}' when using "
                "raw_input_contents or shared memory"
            )
        if region is not None:
            if shm is None:
                raise Unsupported("shared memory is not available on this endpoint")
            data = from_raw(shm.read(*region), t.datatype, shape)
        elif raw:
            data = from_raw(raw[i], t.datatype, shape)
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise InvalidArgument(
                    f"{t.datatype} input '{t.name}' must be sent in raw_input_contents"
                )
            values = list(getattr(t.contents, field))
            count = math.prod(shape)
            if len(values) != count:
                raise InvalidArgument(
                    f"unexpected number of elements {len(values)} for input '{t.name}', "
                    f"expecting {count}"
                )
            if t.datatype == "BYTES":
                data = np.array(values, dtype=np.object_).reshape(shape)
            else:
                try:
                    data = np.array(values, dtype=numpy_dtype(t.datatype)).reshape(shape)
                except OverflowError:
                    raise InvalidArgument(
                        f"a value in the contents of input '{t.name}' is out of range for "
                        f"{t.datatype}"
                    ) from None
        inputs[t.name] = InferTensor(t.name, t.datatype, data)
    requested = [o.name for o in msg.outputs] or None
    if requested is not None and len(set(requested)) != len(requested):
        dup = next(n for n in requested if requested.count(n) > 1)
        raise InvalidArgument(f"output '{dup}' is requested more than once")
    shm_outputs = {}
    for o in msg.outputs:
        region = _shm(o.parameters, f"output '{o.name}'")
        if region is not None:
            shm_outputs[o.name] = region
    classification = {
        o.name: int_param(
            param_value(o.parameters["classification"]),
            f"classification count for output '{o.name}'",
            1,
        )
        for o in msg.outputs
        if "classification" in o.parameters
    }
    return InferRequest(
        model_name=msg.model_name,
        model_version=parse_version(msg.model_version),
        inputs=inputs,
        requested_outputs=requested,
        id=msg.id,
        parameters={
            k: v
            for k, v in params.items()
            if k
            not in ("priority", "timeout", "triton_enable_empty_final_response", *SEQUENCE_PARAMS)
        },
        classification=classification,
        **request_scalars(params),
    ), shm_outputs


def _set_param(target: Any, key: str, value: Any) -> None:
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def encode_response(
    resp: InferResponse,
    final: bool | None = None,
    shm_outputs: dict[str, tuple[str, int, int]] | None = None,
    shm: SharedMemoryRegistry | None = None,
) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=str(resp.model_version), id=resp.id
    )
    for name, t in resp.outputs.items():
        tensor = out.outputs.add(name=name, datatype=t.datatype, shape=t.shape)
        raw = to_raw(t.data, t.datatype)
        if shm_outputs and name in shm_outputs and shm is not None:
            region, offset, size = shm_outputs[name]
            shm.write(region, offset, size, raw)
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_byte_size"].int64_param = len(raw)
            raw = b""  # keeps raw_output_contents aligned with outputs
        out.raw_output_contents.append(raw)
    for k, v in resp.parameters.items():
        _set_param(out.parameters, k, v)
    if final is not None:
        out.parameters["triton_final_response"].bool_param = final
    return out
