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
import math
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


def _show(value: Any, limit: int = 60) -> str:
    """A client's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_param(value: Any, what: str, minimum: int = 0) -> int:
    """An integer request parameter (never a bool, float or string), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{what} must be an integer, got {_show(value)}")
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def bool_param(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a boolean, got {_show(value)}")
    return value


def _json_leaves(data: Any) -> list[Any]:
    """The elements of nested JSON arrays in row-major order (iterative: no recursion limit)."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _check_nesting(name: str, data: Any, shape: list[int]) -> None:
    """'data' is flat, or nested exactly as `shape` (never ragged or of another depth)."""
    if not isinstance(data, list) or not any(isinstance(x, list) for x in data):
        return
    level = [data]
    for depth, dim in enumerate(shape):
        nxt: list[Any] = []
        for x in level:
            if not isinstance(x, list) or len(x) != dim:
                raise InvalidArgument(
                    f"'data' of input '{name}' is nested unlike its shape {shape} (at depth "
                    f"{depth}); send it flat or nested as the shape"
                )
            nxt.extend(x)
        level = nxt
    if any(isinstance(x, list) for x in level):
        raise InvalidArgument(
            f"'data' of input '{name}' is nested deeper than its shape {shape}; send it flat "
            "or nested as the shape"
        )


def _json_numeric(name: str, wire: str, data: Any) -> np.ndarray:
    """JSON numbers as a flat array of `wire`, by Triton's rules: numbers only (never strings
    or null), booleans only for BOOL, integers only for integer types, each in range."""
    leaves = _json_leaves(data)
    if wire == "BOOL":
        ok, what = {bool}, "booleans"
    elif wire[0] in "IU":
        ok, what = {int}, "integers"
    else:
        ok, what = {int, float}, "numbers"
    if not set(map(type, leaves)) <= ok:
        bad = next(x for x in leaves if type(x) not in ok)
        raise InvalidArgument(f"'data' of {wire} input '{name}' must hold {what}, got {_show(bad)}")
    try:
        with np.errstate(over="ignore"):
            arr = np.array(leaves, dtype=numpy_dtype(wire))
    except OverflowError:
        arr = None
    # JSON has no NaN or Infinity (parse_json refuses them): an infinite element is a finite
    # number too large for FP16 / FP32, which the cast made inf
    if arr is None or (wire[0] == "F" and not np.isfinite(arr).all()):
        raise InvalidArgument(
            f"a value in 'data' of input '{name}' is out of range for {wire}"
        )
    return arr


def _json_tensor(name: str, wire: str, shape: list[int], data: Any) -> np.ndarray:
    count = math.prod(shape)
    if wire == "BF16":  # Triton's words (http_server.cc)
        raise InvalidArgument(
            "receiving BF16 data via JSON is not supported. Please use the binary data "
            f"format for input {name}"
        )
    _check_nesting(name, data, shape)
    if wire == "BYTES":
        flat = _json_leaves(data)
        arr = np.empty(len(flat), dtype=np.object_)
        for i, x in enumerate(flat):
            if not isinstance(x, str):
                raise InvalidArgument(
                    f"'data' of BYTES input '{name}' must hold strings, got {_show(x)}"
                )
            try:
                arr[i] = x.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"'data' of input '{name}' holds a string that is not valid Unicode "
                    "(a lone surrogate escape)"
                ) from None
    else:
        arr = _json_numeric(name, wire, data)
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
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise InvalidArgument(f"{what}: 'shared_memory_region' must be a string")
    return (
        region,
        int_param(params.get("shared_memory_offset", 0), f"{what}: 'shared_memory_offset'"),
        int_param(params["shared_memory_byte_size"], f"{what}: 'shared_memory_byte_size'"),
    )


def _params(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"'parameters' of {what} must be a JSON object")
    return value


def request_scalars(params: dict[str, Any]) -> dict[str, Any]:
    """priority / timeout (uint64 parameters, 0: the model's default) and the sequence
    fields of a request's parameters, checked, as InferRequest fields (HTTP and gRPC)."""
    out = {}
    for key, field_name in (("priority", "priority"), ("timeout", "timeout_us")):
        value = params.get(key)
        out[field_name] = 0 if value is None else int_param(value, f"parameter '{key}'")
    return {**out, **sequence_fields(params)}


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
    doc = parse_json(head or b"{}")
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
        if not isinstance(name, str):
            raise InvalidArgument(f"the name of an input must be a string, got {_show(name)}")
        wire = spec.get("datatype")
        shape = spec.get("shape")
        if not isinstance(wire, str) or wire not in WIRE_DTYPES:
            raise InvalidArgument(f"invalid datatype {_show(wire)} for input '{name}'")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidArgument(f"invalid shape {_show(shape)} for input '{name}'")
        if name in inputs:
            raise InvalidArgument(f"input '{name}' is given more than once")
        iparams = _params(spec.get("parameters"), f"input '{name}'")
        region = shm_params(iparams, f"input '{name}'")
        if region is not None:
            if shm is None:
                raise Unsupported("shared memory is not available on this endpoint")
            data = from_raw(shm.read(region[0], region[1], region[2]), wire, tuple(shape))
        elif "binary_data_size" in iparams:
            size = int_param(iparams["binary_data_size"], f"'binary_data_size' of input '{name}'")
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
        if not isinstance(doc["outputs"], list):
            raise InvalidArgument("'outputs' must be an array")
        requested = []
        for spec in doc["outputs"]:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise InvalidArgument("every output must be an object with a string 'name'")
            name = spec["name"]
            if name in requested:
                raise InvalidArgument(f"output '{name}' is requested more than once")
            requested.append(name)
            oparams = _params(spec.get("parameters"), f"output '{name}'")
            if "classification" in oparams:
                classification[name] = int_param(
                    oparams["classification"], f"classification count for output '{name}'", 1
                )
            region = shm_params(oparams, f"output '{name}'")
            if region is not None:
                shm_outputs[name] = region
            elif bool_param(oparams.get("binary_data", False), f"'binary_data' of output '{name}'"):
                binary_outputs.add(name)
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidArgument(f"request 'id' must be a string, got {_show(rid)}")
    req = InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        requested_outputs=requested,
        id=rid,
        parameters={
            k: v
            for k, v in params.items()
            if k not in ("binary_data_output", "priority", "timeout", *SEQUENCE_PARAMS)
        },
        classification=classification,
        **request_scalars(params),
    )
    all_binary = bool_param(params.get("binary_data_output", False), "'binary_data_output'")
    return HttpInfer(req, binary_outputs, all_binary, shm_outputs)


def parse_version(v: str) -> int:
    """A model version from a URL or request ("" means the newest: the caller's job)."""
    try:
        version = int(v)
    except ValueError:
        raise InvalidArgument(f"failed to parse model version '{v}'") from None
    if version < 0:
        raise InvalidArgument(f"invalid model version '{v}': a version is an integer >= 0")
    return version


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity, which Python's json reads but JSON (and Triton's
    parser) does not have."""
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, or a 400 saying why it is not."""
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise InvalidArgument(f"failed to parse the request JSON buffer: {e}") from None
    except RecursionError:
        raise InvalidArgument(
            "failed to parse the request JSON buffer: nested too deeply"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return doc


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
    """Triton's generate extension: JSON fields named like inputs become tensors, top-level
    ones and those inside "parameters" alike (Triton maps both levels the same way, so
    `"parameters": {"stream": false}` fills a model's `stream` input)."""
    params = doc.get("parameters")
    nested = params if isinstance(params, dict) else {}
    inputs = {}
    for io in cfg.input:
        if io.name in doc and io.name in nested:
            raise InvalidArgument(f"input '{io.name}' is given both as a field and in "
                                  "'parameters'")
        if io.name not in doc and io.name not in nested:
            continue
        wire = wire_of_config(mc.DataType.Name(io.data_type))
        value = doc[io.name] if io.name in doc else nested[io.name]
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
    return {**extra, **{k: v for k, v in params.items() if k not in inputs}}


def generate_output(resp: InferResponse) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": str(resp.model_version)}
    for name, t in resp.outputs.items():
        data = _json_data(t)
        doc[name] = data[0] if len(data) == 1 else data
    return doc
