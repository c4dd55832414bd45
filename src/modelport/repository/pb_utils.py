"""The `triton_python_backend_utils` API, so Triton python models run unchanged.

A model.py does `import triton_python_backend_utils as pb_utils`; inside an instance
process that name is this module. It is deliberately numpy-only (torch only for dlpack)
so an instance process starts fast. Talking to the server (decoupled response senders,
BLS requests) goes through a runtime object the instance process installs with
`_install_runtime`; without one (plain unit tests of a model.py) those calls raise.

TYPE_BF16 tensors, as in Triton, have no numpy form for the model: `as_numpy()` raises, and
`to_dlpack()` / `Tensor.from_dlpack(name, ...)` (or `torch.from_dlpack(tensor)`, a Tensor
being a DLPack producer) carry them as torch.bfloat16. Internally they are numpy arrays of
`ml_dtypes.bfloat16` (see repository/tensors.py); `Tensor(name, ml_dtypes_bf16_array)` is
accepted too.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "InferenceRequest",
    "InferenceResponse",
    "Logger",
    "Metric",
    "MetricFamily",
    "MetricKind",
    "ModelConfig",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END",
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "deserialize_bytes_tensor",
    "is_model_ready",
    "load_model",
    "numpy_to_triton_type",
    "serialize_byte_tensor",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "unload_model",
    "using_decoupled_model_transaction_policy",
]

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2

_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
    "TYPE_BF16": ml_dtypes.bfloat16,  # numpy has none; ml_dtypes' is what tritonclient uses
}
_BF16 = np.dtype(ml_dtypes.bfloat16)

_runtime: Any = None  # set in an instance process: send_response(), bls()


def _install_runtime(runtime: Any) -> None:
    global _runtime
    _runtime = runtime


def triton_string_to_numpy(triton_type: str) -> Any:
    """'TYPE_FP32' (or 'FP32') -> numpy.float32; strings map to object arrays of bytes."""
    key = triton_type if triton_type.startswith("TYPE_") else "TYPE_" + triton_type
    if key == "TYPE_BYTES":
        key = "TYPE_STRING"
    return _NUMPY[key]


# TRITONSERVER_DataType values, in _NUMPY's order: what Triton's pb_utils functions and
# Tensor.triton_dtype() use (TYPE_BOOL is 1, ..., TYPE_STRING / BYTES is 13, TYPE_BF16 14)
_TRITON_CODES = {name: code for code, name in enumerate(_NUMPY, start=1)}


def numpy_to_triton_type(dtype: Any) -> int | None:
    """numpy dtype -> Triton's data type number (numpy.float32 -> 11), None if it has none."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return _TRITON_CODES["TYPE_STRING"]
    for k, v in _NUMPY.items():
        if np.dtype(v) == dtype:
            return _TRITON_CODES[k]
    return None


def triton_to_numpy_type(data_type: int) -> Any:
    """Triton's data type number -> numpy type (11 -> numpy.float32), None if unknown."""
    for name, code in _TRITON_CODES.items():
        if code == data_type:
            return _NUMPY[name]
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    """A BYTES tensor as Triton lays it out: each element's 4-byte little-endian length,
    then its bytes, in C order (None for a non-bytes tensor)."""
    if input_tensor.size == 0:
        return b""
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts = []
    for x in input_tensor.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode("utf-8")
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    """The inverse of serialize_byte_tensor: a 1-D object array of bytes."""
    view = memoryview(encoded_tensor)
    out, offset = [], 0
    while offset < len(view):
        (n,) = struct.unpack_from("<I", view, offset)
        offset += 4
        out.append(bytes(view[offset : offset + n]))
        offset += n
    return np.array(out, dtype=np.object_)


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    """Whether a model config (the JSON dict of args["model_config"]) is decoupled."""
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


class TritonError:
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r})"


class TritonModelException(Exception):
    """Raised by pb_utils calls (and by a failed BLS request when the model wants that)."""

    def message(self) -> str:
        return str(self)


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        if array.dtype.kind in "SU":
            array = np.array(
                [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1)],
                dtype=np.object_,
            ).reshape(array.shape)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if self._array.dtype == _BF16:
            raise TritonModelException(
                f"tensor '{self._name}' is BF16, which has no numpy data type: use to_dlpack() "
                "and Tensor.from_dlpack() (e.g. with torch) to read and write BF16 tensors"
            )
        return self._array

    def _numpy(self) -> np.ndarray:
        """The data whatever its type (BF16 as ml_dtypes.bfloat16): for the server side."""
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int | None:
        return numpy_to_triton_type(self._array.dtype)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        import torch

        from modelport.repository.tensors import to_torch

        if self._array.dtype == np.object_:
            raise TritonModelException("DLPack does not support BYTES (string) tensors")
        return torch.utils.dlpack.to_dlpack(to_torch(self._array))

    def __dlpack__(self, stream: Any = None) -> Any:
        return self.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: instance processes hold tensors in host memory

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """A DLPack capsule, or an object with __dlpack__ (a torch tensor), as a Tensor."""
        import torch

        from modelport.repository.tensors import from_torch

        return Tensor(name, from_torch(torch.utils.dlpack.from_dlpack(capsule)))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self.shape()}, dtype={self._array.dtype})"


class InferenceResponse:
    def __init__(
        self,
        output_tensors: list[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        if isinstance(parameters, str):
            parameters = json.loads(parameters or "{}")
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class ResponseSender:
    """Decoupled models send any number of responses, then a final flag, per request."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._closed = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise TritonModelException("the response sender of this request is already closed")
        if _runtime is None:
            raise TritonModelException("response senders need a running modelport server")
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        _runtime.send_response(self._key, response, final)
        if final:
            self._closed = True

    def is_cancelled(self) -> bool:
        """Whether the client went away (a cancelled gRPC call, a closed stream): a model
        may stop sending then; its final flag is still expected."""
        return _runtime is not None and _runtime.is_cancelled(self._key)


class InferenceRequest:
    """A request handed to execute(), or, built by the model, a BLS request to run."""

    def __init__(
        self,
        model_name: str = "",
        inputs: list[Tensor] | None = None,
        requested_output_names: list[str] | None = None,
        model_version: int = -1,
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        parameters: dict[str, Any] | str | None = None,
        timeout: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
    ) -> None:
        self._model_name = model_name
        self._inputs = list(inputs or [])
        self._requested = list(requested_output_names or [])
        self._model_version = model_version
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        if isinstance(parameters, str):
            parameters = json.loads(parameters or "{}")
        self._parameters = dict(parameters or {})
        self._timeout = timeout
        self._sender: ResponseSender | None = None
        self._key: Any = None  # (batch id, index) of a request handed to execute()

    # -- as seen inside execute() --
    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def requested_output_names(self) -> list[str]:
        return self._requested

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def timeout(self) -> int:
        return self._timeout

    def get_response_sender(self) -> ResponseSender:
        if self._sender is None:
            raise TritonModelException("this request has no response sender (a BLS request?)")
        return self._sender

    def is_cancelled(self) -> bool:
        """Whether the client went away while execute() runs (a cancelled gRPC call, a
        closed stream); always False for a BLS request the model built."""
        return _runtime is not None and _runtime.is_cancelled(self._key)

    # -- BLS --
    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on another model of the server and wait for its response(s)."""
        if _runtime is None:
            raise TritonModelException("BLS requests need a running modelport server")
        responses = _runtime.bls(self, decoupled)
        if decoupled:
            return responses  # an iterator: each response as it comes, then an empty final one
        return responses[0] if responses else InferenceResponse(error=TritonError("no response"))

    async def async_exec(self, decoupled: bool = False) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.exec, decoupled)


# ---- model loading API (Triton's python_backend "Model Loading API") --------------------------


def _model_control(what: str, op: str, **args: Any) -> Any:
    """Ask the server (explicit model control) to load / unload a model or for its readiness.

    As in Triton, a refusal raises TritonModelException with the server's reason after
    "Failed to load model: " / "Failed to unload model: " / "Failed to check model readiness: ".
    """
    if _runtime is None:
        raise TritonModelException(f"{what}the model loading API needs a running modelport server")
    return _runtime.model_control(what, op, args)


def load_model(model_name: str, config: str = "", files: dict[str, bytes] | None = None) -> None:
    """Load (or reload) `model_name` through the server, as the repository load API does.

    `config`: a model config in JSON that replaces config.pbtxt. `files`: {"file:<path>":
    bytes} forming the model directory to load from instead of the repository's (then
    `config` must be given). Only in explicit model control mode; returns once loaded."""
    what = "Failed to load model: "
    if files is not None:
        if not isinstance(files, dict):
            raise TritonModelException(
                f"{what}failed to load model '{model_name}', files should be a dictionary of "
                "file paths and file contents"
            )
        checked = {}
        for k, v in files.items():
            if not isinstance(k, str):
                raise TypeError(f"load_model(): file path {k!r} must be str")
            if not isinstance(v, (bytes, bytearray, memoryview)):
                raise TypeError(f"load_model(): content of '{k}' must be bytes")
            checked[k] = bytes(v)
        files = checked
    _model_control(what, "load", name=str(model_name), config=config or "", files=files or {})


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    """Unload `model_name` (explicit model control mode). As in Triton this does not wait for
    the model's instances to finish unloading: it returns once the model stopped serving."""
    _model_control(
        "Failed to unload model: ",
        "unload",
        name=str(model_name),
        unload_dependents=bool(unload_dependents),
    )


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    """Whether `model_name` (the version the server would pick, or `model_version`, a string
    as in Triton) is loaded and ready."""
    return bool(
        _model_control(
            "Failed to check model readiness: ",
            "ready",
            name=str(model_name),
            version=str(model_version),
        )
    )


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    for t in request.inputs():
        if t.name() == name:
            return t
    return None


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    for t in response.output_tensors():
        if t.name() == name:
            return t
    return None


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict | None:
    for c in model_config.get("input", []):
        if c.get("name") == name:
            return c
    return None


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict | None:
    for c in model_config.get("output", []):
        if c.get("name") == name:
            return c
    return None


class LogLevel:
    """Triton's `pb_utils.Logger.LogLevel` (also `Logger.INFO`, ...)."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    VERBOSE = "VERBOSE"


class Logger:
    """pb_utils.Logger.log_info(...), `Logger.log(msg, Logger.WARNING)`; goes to the
    instance process's stderr."""

    LogLevel = LogLevel
    INFO = LogLevel.INFO
    WARNING = LogLevel.WARNING
    ERROR = LogLevel.ERROR
    VERBOSE = LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: str = LogLevel.INFO) -> None:
        import sys

        print(f"[{level}] {message}", file=sys.stderr, flush=True)

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.log(message, "INFO")

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.log(message, "WARNING")

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.log(message, "ERROR")

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls.log(message, "VERBOSE")


class ModelConfig:
    """What `TritonPythonModel.auto_complete_config(config)` receives and returns.

    Holds the config as Triton's JSON dict; the setters refuse to contradict what the
    config.pbtxt already says, as Triton's do.
    """

    def __init__(self, model_config: dict[str, Any] | str) -> None:
        if isinstance(model_config, str):
            model_config = json.loads(model_config)
        self._config = dict(model_config)

    def as_dict(self) -> dict[str, Any]:
        return self._config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        # Triton's rule: the model may raise the configured max_batch_size, not lower it
        current = int(self._config.get("max_batch_size", 0) or 0)
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config "
                f"function for model '{self._config.get('name')}' specified max_batch_size "
                f"{max_batch_size}"
            )
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, policy: dict[str, Any]) -> None:
        current = self._config.setdefault("model_transaction_policy", {})
        for key, value in policy.items():
            if key in current and current[key] not in (value, False):
                raise ValueError(f"model_transaction_policy.{key} is already {current[key]}")
            current[key] = value

    def _add_io(self, field: str, spec: dict[str, Any]) -> None:
        if "name" not in spec:
            raise ValueError(f"{field} in auto-complete-config function must have a name")
        items = self._config.setdefault(field, [])
        for item in items:
            if item.get("name") == spec["name"]:
                for key in ("data_type", "dims"):
                    if key in spec and item.get(key) not in (None, [], spec[key]):
                        raise ValueError(
                            f"{field} '{spec['name']}' {key} {spec[key]} conflicts with the "
                            f"configuration's {item.get(key)}"
                        )
                    item.setdefault(key, spec.get(key))
                return
        items.append(dict(spec))

    def add_input(self, input: dict[str, Any]) -> None:  # noqa: A002 - Triton's name
        self._add_io("input", input)

    def add_output(self, output: dict[str, Any]) -> None:
        self._add_io("output", output)

    def add_model_warmup(self, model_warmup: dict[str, Any]) -> None:
        self._config.setdefault("model_warmup", []).append(dict(model_warmup))


# ---- custom metrics ---------------------------------------------------------------------------


class MetricKind(int):
    """Triton's `pb_utils.MetricKind` (an enum there): COUNTER, GAUGE, HISTOGRAM."""

    _names = ("COUNTER", "GAUGE", "HISTOGRAM")

    def __repr__(self) -> str:
        return f"<MetricKind.{self._names[int(self)]}: {int(self)}>"

    @property
    def name(self) -> str:
        return self._names[int(self)]


MetricKind.COUNTER = COUNTER = MetricKind(0)  # type: ignore[attr-defined]
MetricKind.GAUGE = GAUGE = MetricKind(1)  # type: ignore[attr-defined]
MetricKind.HISTOGRAM = HISTOGRAM = MetricKind(2)  # type: ignore[attr-defined]

_KIND_WORD = {0: "COUNTER", 1: "GAUGE", 2: "HISTOGRAM"}
_CLEARED = (
    "Invalid metric operation as the corresponding 'MetricFamily' has been deleted. The "
    "'MetricFamily' object should be deleted AFTER its corresponding 'Metric' objects have "
    "been deleted."
)


def _metrics_runtime() -> Any:
    if _runtime is None:
        raise TritonModelException("custom metrics need a running modelport server")
    return _runtime


class Metric:
    """One series of a MetricFamily (`family.Metric(labels=..., buckets=...)`).

    increment / set / observe are queued to the server in order (several per pipe message);
    value() asks the server, after everything queued before it, so it returns what the
    metrics endpoint shows. The kind checks are made here, with Triton's messages, so a
    misuse raises at the call as it does in Triton.
    """

    def __init__(self, family: MetricFamily, key: tuple, buckets: list[float] | None) -> None:
        self._family_name = family._name
        self._kind = family._kind
        self._key = key
        self._cleared = False
        _metrics_runtime().metric_op(("metric_new", self._family_name, key, buckets))

    def _check(self, what: str, op: str, value: Any = 0.0) -> float:
        prefix = f"Failed to {what} metric value: "
        if self._cleared:
            raise TritonModelException(prefix + _CLEARED)
        kind = _KIND_WORD[self._kind]
        allowed = {"increment": (0, 1), "set": (1,), "observe": (2,), "value": (0, 1)}[op]
        if self._kind not in allowed:
            verb = {"increment": "Increment", "set": "Set", "observe": "Observe"}.get(op, "Value")
            raise TritonModelException(
                f"{prefix}TRITONSERVER_METRIC_KIND_{kind} does not support {verb}"
            )
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{op}(): value must be a number, got {type(value).__name__}") from None
        if op == "increment" and self._kind == 0 and v < 0.0:
            raise TritonModelException(
                prefix + "TRITONSERVER_METRIC_KIND_COUNTER can only be incremented "
                "monotonically by non-negative values."
            )
        return v

    def increment(self, value: float) -> None:
        v = self._check("increment", "increment", value)
        _metrics_runtime().metric_op(("increment", self._family_name, self._key, v))

    def set(self, value: float) -> None:
        v = self._check("set", "set", value)
        _metrics_runtime().metric_op(("set", self._family_name, self._key, v))

    def observe(self, value: float) -> None:
        v = self._check("observe", "observe", value)
        _metrics_runtime().metric_op(("observe", self._family_name, self._key, v))

    def value(self) -> float:
        self._check("get", "value")
        try:
            return float(_metrics_runtime().metric_call("value", self._family_name, self._key))
        except TritonModelException as e:
            raise TritonModelException(f"Failed to get metric value: {e}") from None

    def _clear(self) -> None:
        if not self._cleared:
            self._cleared = True
            rt = _runtime
            if rt is not None:
                rt.metric_op(("metric_delete", self._family_name, self._key, None))


class MetricFamily:
    """`pb_utils.MetricFamily(name, description, kind)`: a metric family on the server's
    metrics endpoint (Triton's custom metrics API).

    As in Triton the family holds its Metric objects: they stay until the family object is
    deleted, which removes their series (a series shared with other holders stays until the
    last one goes) and leaves its Metric objects unusable.
    """

    COUNTER = COUNTER
    GAUGE = GAUGE
    HISTOGRAM = HISTOGRAM

    def __init__(self, name: str, description: str, kind: MetricKind) -> None:
        self._metrics: list[Metric] = []
        self._live = False
        for arg, v in (("name", name), ("description", description), ("kind", kind)):
            if v is None:
                raise TypeError(f"MetricFamily(): '{arg}' must not be None")
        if not isinstance(name, str) or not isinstance(description, str):
            raise TypeError("MetricFamily(): name and description must be str")
        if isinstance(kind, bool) or not isinstance(kind, int) or int(kind) not in _KIND_WORD:
            raise TypeError(
                "MetricFamily(): kind must be pb_utils.MetricFamily.COUNTER, GAUGE or HISTOGRAM"
            )
        self._name, self._description, self._kind = name, description, int(kind)
        try:
            _metrics_runtime().metric_call("family_new", name, description, self._kind)
        except TritonModelException as e:
            raise TritonModelException(f"Error when creating MetricFamily: {e}") from None
        self._live = True

    def Metric(
        self, labels: dict[str, str] | None = None, buckets: list[float] | None = None
    ) -> Metric:  # noqa: N802 - Triton's name
        from modelport.repository import custom_metrics as cm

        if labels is not None and not isinstance(labels, dict):
            raise TritonModelException("Failed to create metric. Labels must be a dictionary.")
        if buckets is not None:
            if not isinstance(buckets, list):
                raise TritonModelException("Failed to create metric. Buckets must be a list.")
            if self._kind != HISTOGRAM:
                raise TritonModelException("Failed to create metric. Unexpected buckets found.")
        elif self._kind == HISTOGRAM:
            raise TritonModelException("Failed to create metric. Missing required buckets.")
        try:
            key = cm.label_key(labels or {})
            bounds = None if buckets is None else list(cm.check_buckets(buckets))
        except cm.CustomMetricError as e:
            raise TritonModelException(f"Error when creating Metric: {e}") from None
        except (TypeError, ValueError) as e:
            raise TritonModelException(f"Error when creating Metric: {e}") from None
        metric = Metric(self, key, bounds)
        self._metrics.append(metric)
        return metric

    def __del__(self) -> None:
        if not getattr(self, "_live", False):
            return
        self._live = False
        try:
            for m in self._metrics:
                m._clear()
            self._metrics.clear()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the server releases anyway
            pass
