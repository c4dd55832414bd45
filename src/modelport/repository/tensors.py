"""Triton data types and the protocol-neutral request/response carried through the repository.

Tensors are numpy arrays everywhere inside the repository; BYTES/TYPE_STRING tensors are
numpy object arrays of `bytes` (what Triton's python backend hands to model.py).

BF16 (TYPE_BF16), which numpy has no dtype for, is carried as numpy arrays of
`ml_dtypes.bfloat16`: the dtype tritonclient itself uses for BF16 (ml_dtypes is one of its
requirements), 2 bytes an element, so raw wire bytes, concatenation for dynamic batching,
slicing and pickling to python-backend processes all work as for any other dtype. Torch-based
code crosses over with `to_torch` / `from_torch` (torch.from_numpy and .numpy() know no
bfloat16; the bits are reinterpreted, never converted).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from modelport.repository.errors import InvalidArgument

# config enum name (TYPE_*) <-> wire name (KServe v2 datatype) <-> numpy dtype
_TABLE: list[tuple[str, str, Any]] = [
    ("TYPE_BOOL", "BOOL", np.bool_),
    ("TYPE_UINT8", "UINT8", np.uint8),
    ("TYPE_UINT16", "UINT16", np.uint16),
    ("TYPE_UINT32", "UINT32", np.uint32),
    ("TYPE_UINT64", "UINT64", np.uint64),
    ("TYPE_INT8", "INT8", np.int8),
    ("TYPE_INT16", "INT16", np.int16),
    ("TYPE_INT32", "INT32", np.int32),
    ("TYPE_INT64", "INT64", np.int64),
    ("TYPE_FP16", "FP16", np.float16),
    ("TYPE_FP32", "FP32", np.float32),
    ("TYPE_FP64", "FP64", np.float64),
    ("TYPE_STRING", "BYTES", np.object_),
    ("TYPE_BF16", "BF16", ml_dtypes.bfloat16),
]
BF16 = np.dtype(ml_dtypes.bfloat16)
CONFIG_TO_WIRE = {c: w for c, w, _ in _TABLE}
WIRE_TO_CONFIG = {w: c for c, w, _ in _TABLE}
WIRE_TO_NUMPY = {w: np.dtype(n) for _, w, n in _TABLE}
WIRE_DTYPES = frozenset(WIRE_TO_NUMPY)


def wire_of_config(type_name: str) -> str:
    """TYPE_FP32 -> FP32, TYPE_STRING -> BYTES."""
    return CONFIG_TO_WIRE.get(type_name, type_name.removeprefix("TYPE_"))


def numpy_dtype(wire: str) -> np.dtype:
    try:
        return WIRE_TO_NUMPY[wire]
    except KeyError:
        raise InvalidArgument(f"data type {wire} is not supported by this server") from None


def wire_of_numpy(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    for w, d in WIRE_TO_NUMPY.items():
        if d == dtype:
            return w
    raise InvalidArgument(f"numpy dtype {dtype} has no Triton data type")


def to_torch(arr: np.ndarray) -> Any:
    """A numpy array as a torch tensor sharing its memory where it can (BF16 -> torch.bfloat16)."""
    import torch

    arr = np.ascontiguousarray(arr)
    if arr.dtype == BF16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def from_torch(t: Any) -> np.ndarray:
    """A torch tensor (any device) as a numpy array (torch.bfloat16 -> ml_dtypes.bfloat16)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BF16)
    return t.numpy()


def as_bytes_array(arr: np.ndarray) -> np.ndarray:
    """Normalise str/bytes/object arrays to an object array of bytes."""
    out = np.empty(arr.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, x in enumerate(arr.reshape(-1)):
        if isinstance(x, bytes):
            flat[i] = x
        elif isinstance(x, str):
            flat[i] = x.encode("utf-8")
        elif isinstance(x, np.bytes_):
            flat[i] = bytes(x)
        else:
            flat[i] = str(x).encode("utf-8")
    return out


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor -> 4-byte little-endian length-prefixed elements (row-major)."""
    parts = []
    for x in as_bytes_array(arr).reshape(-1):
        parts.append(struct.pack("<I", len(x)))
        parts.append(x)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    view = memoryview(buf)
    if count * 4 > len(view):  # every element has its 4-byte length: never allocate for more
        raise InvalidArgument(
            f"unexpected total byte size {len(view)} for a BYTES tensor of shape {list(shape)} "
            f"({count} elements need at least {count * 4} bytes)"
        )
    out = np.empty(count, dtype=np.object_)
    off = 0
    for i in range(count):
        if off + 4 > len(view):
            raise InvalidArgument("unexpected end of BYTES tensor data")
        (n,) = struct.unpack_from("<I", view, off)
        off += 4
        if off + n > len(view):
            raise InvalidArgument("BYTES element length exceeds the tensor data")
        out[i] = bytes(view[off : off + n])
        off += n
    if off != len(view):
        raise InvalidArgument(
            f"BYTES tensor data has {len(view) - off} trailing bytes for shape {list(shape)}"
        )
    return out.reshape(shape)


def to_raw(arr: np.ndarray, wire: str) -> bytes:
    if wire == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=numpy_dtype(wire)).tobytes()


def from_raw(buf: bytes | memoryview, wire: str, shape: tuple[int, ...]) -> np.ndarray:
    if wire == "BYTES":
        return deserialize_bytes(buf, shape)
    dtype = numpy_dtype(wire)
    count = math.prod(shape)
    if len(buf) != count * dtype.itemsize:
        raise InvalidArgument(
            f"unexpected total byte size {len(buf)} for input, expecting "
            f"{count * dtype.itemsize} for shape {list(shape)} of {wire}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


@dataclass
class InferTensor:
    name: str
    datatype: str  # wire name
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


@dataclass
class InferRequest:
    """One inference request as the repository sees it, whatever protocol brought it."""

    model_name: str
    model_version: int = -1  # -1: the policy's newest ready version
    inputs: dict[str, InferTensor] = field(default_factory=dict)
    requested_outputs: list[str] | None = None  # None: every output
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k
    # sequence batching (Triton's correlation id and START / END flags); 0 / "": none
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False
    # the repository.trace.Trace of the ensemble this request is a step of (its child trace)
    trace_parent: Any = None


@dataclass
class InferResponse:
    model_name: str
    model_version: int
    outputs: dict[str, InferTensor] = field(default_factory=dict)
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = True  # decoupled streams: the last response of a request


SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")


def sequence_fields(params: dict[str, Any]) -> dict[str, Any]:
    """A request's sequence parameters (as tritonclient sends them over HTTP and gRPC) as
    InferRequest fields: sequence_id a uint64 or a string, sequence_start / sequence_end."""
    sid = params.get("sequence_id", 0)
    if sid is None:
        sid = 0
    if isinstance(sid, bool) or not isinstance(sid, (int, str)):
        raise InvalidArgument(
            f"sequence_id must be an unsigned integer or a string, got {type(sid).__name__}"
        )
    if isinstance(sid, int) and not 0 <= sid < 2**64:
        if -(2**63) <= sid < 0:  # an int64 parameter carrying a uint64
            sid += 2**64
        else:
            raise InvalidArgument(f"sequence_id {sid} is out of the uint64 range")
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        v = params.get(key, False)
        if not isinstance(v, bool):
            raise InvalidArgument(f"'{key}' must be a boolean, got {v!r}")
        flags[key] = v
    return {"sequence_id": sid, **flags}
