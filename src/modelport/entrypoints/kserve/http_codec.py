"""KServe v2 REST bodies <-> repository requests, including Triton's binary tensor extension.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes
followed by raw tensors, in input order, for every input whose parameters carry
`binary_data_size`. Responses do the same for outputs asked for with `binary_data: true`
(or request parameter `binary_data_output`). BYTES elements are 4-byte little-endian
length-prefixed in binary form and UTF-8 strings in JSON form. BF16 travels only as binary
data (or shared memory): as in Triton, BF16 JSON `data` in a request and a BF16 output asked
for as JSON are 400s.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

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
    sequence_fields,
    to_raw,
    wire_of_config,
)

HEADER_LENGTH = "Inference-Header-Content-Length"


def decompress(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error) as e:
        raise InvalidArgument(f"failed to decompress the request body ({encoding}): {e}") from None
    raise Unsupported(f"unsupported Content-Encoding '{encoding}'")


def _json_tensor(name: str, wire: str, shape: list[int], data: Any) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    if wire == "BF16":  # Triton's words (http_server.cc)
        raise InvalidArgument(
            "receiving BF16 data via JSON is not supported. Please use the binary data "
            f"format for input {name}"
        )
    if wire == "BYTES":
        flat = np.array(data, dtype=np.object_).reshape(-1)
        arr = np.empty(flat.shape, dtype=np.object_)
        for i, x in enumerate(flat):
            if isinstance(x, str):
                arr[i] = x.encode("utf-8")
            elif isinstance(x, (bytes, bytearray)):
                arr[i] = bytes(x)
            else:
                arr[i] = json.dumps(x).encode("utf-8")
    else:
        try:
            arr = np.asarray(data, dtype=numpy_dtype(wire)).reshape(-1)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(
                f"unable to parse 'data' of input '{name}' as {wire}: {e}"
            ) from None
    if arr.size != count:
        raise InvalidArgument(
            f"unexpected number of elements {arr.size} in 'data' of input '{name}', "
            f"expecting {count} for shape {shape}"
        )
    return arr.reshape(shape)


@dataclass
class HttpInfer:
    """A parsed infer body: the request plus how each output wants to travel back."""

    request: InferRequest
    binary_outputs: set[str] = field(default_factory=set)
    all_binary: bool = False
    shm_outputs: dict[str, tuple[str, int, int]] = field(
        default_factory=dict
    )  # region, offset, size


def shm_params(params: dict[str, Any], what: str) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor names a shared memory region."""
    if "shared_memory_region" not in params:
        return None
    if "shared_memory_byte_size" not in params:
        raise InvalidArgument(f"{what}: 'shared_memory_byte_size' is required with a region")
    return (
        str(params["shared_memory_region"]),
        int(params.get("shared_memory_offset", 0)),
        int(params["shared_memory_byte_size"]),
    )


def parse_infer_request(
    model_name: str,
    model_version: int,
    body: bytes,
    header_length: str | None,
    shm: SharedMemoryRegistry | None = None,
) -> HttpInfer:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument(f"invalid {HEADER_LENGTH} '{header_length}'") from None
        if n < 0 or n > len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} {n} exceeds the body size {len(body)}")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    inputs: dict[str, InferTensor] = {}
    offset = 0
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgument("the request must have an 'inputs' array")
    for spec in raw_inputs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise InvalidArgument("every input must be an object with a 'name'")
        name = spec["name"]
        wire = spec.get("datatype")
        shape = spec.get("shape")
        if wire not in WIRE_DTYPES:
            raise InvalidArgument(f"invalid datatype '{wire}' for input '{name}'")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidArgument(f"invalid shape {shape!r} for input '{name}'")
        if name in inputs:
            raise InvalidArgument(f"input '{name}' is given more than once")
        iparams = spec.get("parameters") or {}
        region = shm_params(iparams, f"input '{name}'")
        if region is not None:
            if shm is None:
                raise Unsupported("shared memory is not available on this endpoint")
            data = from_raw(shm.read(region[0], region[1], region[2]), wire, tuple(shape))
        elif "binary_data_size" in iparams:
            size = int(iparams["binary_data_size"])
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"unexpected end of the binary data for input '{name}' "
                    f"(needs {size} bytes at offset {offset}, have {len(binary)})"
                )
            data = from_raw(binary[offset : offset + size], wire, tuple(shape))
            offset += size
        elif "data" in spec:
            data = _json_tensor(name, wire, shape, spec["data"])
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs[name] = InferTensor(name, wire, data)
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input"
        )
    requested = None
    binary_outputs: set[str] = set()
    shm_outputs: dict[str, tuple[str, int, int]] = {}
    classification: dict[str, int] = {}
    if doc.get("outputs") is not None:
        requested = []
        for spec in doc["outputs"]:
            name = spec.get("name")
            requested.append(name)
            oparams = spec.get("parameters") or {}
            if oparams.get("classification"):
                classification[name] = int(oparams["classification"])
            region = shm_params(oparams, f"output '{name}'")
            if region is not None:
                shm_outputs[name] = region
            elif oparams.get("binary_data"):
                binary_outputs.add(name)
    req = InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        requested_outputs=requested,
        id=str(doc.get("id", "")),
        parameters={
            k: v
            for k, v in params.items()
            if k not in ("binary_data_output", "priority", "timeout", *SEQUENCE_PARAMS)
        },
        priority=int(params.get("priority", 0) or 0),
        timeout_us=int(params.get("timeout", 0) or 0),
        classification=classification,
        **sequence_fields(params),
    )
    return HttpInfer(
        req, binary_outputs, bool(params.get("binary_data_output", False)), shm_outputs
    )


def _json_data(t: InferTensor) -> list:
    if t.datatype == "BF16":  # Triton's words (http_server.cc)
        raise InvalidArgument(
            "sending BF16 data via JSON is not supported. Please use the binary data format "
            "for output"
        )
    flat = t.data.reshape(-1)
    if t.datatype == "BYTES":
        out = []
        for x in flat:
            b = x if isinstance(x, bytes) else str(x).encode()
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output '{t.name}' holds non-UTF-8 bytes; request it as binary data"
                ) from None
        return out
    return flat.tolist()


def encode_infer_response(
    resp: InferResponse, parsed: HttpInfer, shm: SharedMemoryRegistry | None = None
) -> tuple[bytes, int | None]:
    """Body bytes and, when binary tensors follow the JSON, the JSON header length."""
    outputs = []
    blobs: list[bytes] = []
    for name, t in resp.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": t.datatype, "shape": t.shape}
        if name in parsed.shm_outputs and shm is not None:
            region, offset, size = parsed.shm_outputs[name]
            raw = to_raw(t.data, t.datatype)
            shm.write(region, offset, size, raw)
            entry["parameters"] = {
                "shared_memory_region": region,
                "shared_memory_byte_size": len(raw),
            }
        elif parsed.all_binary or name in parsed.binary_outputs:
            raw = to_raw(t.data, t.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(t)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": resp.model_name,
        "model_version": str(resp.model_version),
        "outputs": outputs,
    }
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def tensor_metadata(cfg: mc.ModelConfig, ios: Any) -> list[dict[str, Any]]:
    batch = [-1] if cfg.max_batch_size > 0 else []
    return [
        {
            "name": io.name,
            "datatype": wire_of_config(mc.DataType.Name(io.data_type)),
            "shape": batch + list(io.dims),
        }
        for io in ios
    ]


def model_metadata(cfg: mc.ModelConfig, versions: list[int]) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "versions": [str(v) for v in versions],
        "platform": cfg.platform or cfg.backend,
        "inputs": tensor_metadata(cfg, cfg.input),
        "outputs": tensor_metadata(cfg, cfg.output),
    }


def generate_inputs(cfg: mc.ModelConfig, doc: dict[str, Any]) -> dict[str, InferTensor]:
    """Triton's generate extension: top-level JSON fields named like inputs become tensors."""
    inputs = {}
    for io in cfg.input:
        if io.name not in doc:
            continue
        wire = wire_of_config(mc.DataType.Name(io.data_type))
        value = doc[io.name]
        flat = value if isinstance(value, list) else [value]
        dims = [len(flat) if d == -1 else d for d in io.dims]
        if int(np.prod(dims)) != len(flat):
            dims = [len(flat)]
        shape = ([1] if cfg.max_batch_size > 0 else []) + dims
        inputs[io.name] = InferTensor(io.name, wire, _json_tensor(io.name, wire, shape, flat))
    return inputs


def generate_parameters(cfg: mc.ModelConfig, doc: dict[str, Any]) -> dict[str, Any]:
    """Triton's generate extension: the request's "parameters", plus every other top-level
    field that is not an input (Triton passes those "as parameters or tensors based on model
    specification"); a key in "parameters" wins over the same top-level field."""
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be a JSON object")
    inputs = {io.name for io in cfg.input}
    extra = {}
    for key, value in doc.items():
        if key in ("parameters", "id") or key in inputs:
            continue
        if isinstance(value, (dict, list)) or value is None:
            raise InvalidArgument(
                f"field '{key}' is not an input of model '{cfg.name}', and a parameter must be "
                "a string, a number or a boolean"
            )
        extra[key] = value
    return {**extra, **params}


def generate_output(resp: InferResponse) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": str(resp.model_version)}
    for name, t in resp.outputs.items():
        data = _json_data(t)
        doc[name] = data[0] if len(data) == 1 else data
    return doc
