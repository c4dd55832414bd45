"""TorchServe's gRPC messages and services, built at import time without protoc.

Why by hand: grpcio-tools (protoc) is a build dependency we do not want, and generated
`_pb2` files would be code we did not write. The descriptors below say exactly what
inference.proto and management.proto (next to this file) say, so the wire format, the
package names and the method paths are TorchServe's and its published clients work.

They live in a private descriptor pool: a user's own `google/rpc/status.proto` (from
googleapis-common-protos) or TorchServe-generated `inference_pb2` in the default pool can
never clash with ours.
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, empty_pb2, message_factory

INFERENCE_PACKAGE = "org.pytorch.serve.grpc.inference"
MANAGEMENT_PACKAGE = "org.pytorch.serve.grpc.management"
INFERENCE_SERVICE = f"{INFERENCE_PACKAGE}.InferenceAPIsService"
MANAGEMENT_SERVICE = f"{MANAGEMENT_PACKAGE}.ManagementAPIsService"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "int32": _F.TYPE_INT32,
    "bool": _F.TYPE_BOOL,
}


def _message(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    fields: list[tuple[str, int, str]],
    optional: tuple[str, ...] = (),
    maps: dict[str, tuple[int, str, str]] | None = None,
    repeated: tuple[str, ...] = (),
) -> None:
    """Add one message: `fields` are (name, number, scalar type or .full.MessageName).

    `optional` fields are proto3 `optional` (a synthetic oneof each, as protoc makes);
    `maps` are name -> (number, key type, value type), built as protoc builds map fields.
    """
    msg = file.message_type.add(name=name)
    for fname, number, ftype in fields:
        f = msg.field.add(name=fname, number=number, json_name=_json_name(fname))
        f.label = _F.LABEL_REPEATED if fname in repeated else _F.LABEL_OPTIONAL
        if ftype in _SCALARS:
            f.type = _SCALARS[ftype]
        else:
            f.type, f.type_name = _F.TYPE_MESSAGE, ftype
        if fname in optional:
            f.proto3_optional = True
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name=f"_{fname}")
    for fname, (number, ktype, vtype) in (maps or {}).items():
        entry = msg.nested_type.add(name=_camel(fname) + "Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_SCALARS[ktype], label=_F.LABEL_OPTIONAL,
                        json_name="key")  # fmt: skip
        entry.field.add(name="value", number=2, type=_SCALARS[vtype], label=_F.LABEL_OPTIONAL,
                        json_name="value")  # fmt: skip
        msg.field.add(
            name=fname,
            number=number,
            json_name=_json_name(fname),
            label=_F.LABEL_REPEATED,
            type=_F.TYPE_MESSAGE,
            type_name=f".{file.package}.{name}.{entry.name}",
        )


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_"))


def _json_name(name: str) -> str:
    c = _camel(name)
    return c[:1].lower() + c[1:]


def _service(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    methods: list[tuple[str, str, str, bool, bool]],
) -> None:
    svc = file.service.add(name=name)
    for mname, req, resp, client_streaming, server_streaming in methods:
        svc.method.add(
            name=mname,
            input_type=req,
            output_type=resp,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )


def _file(
    name: str, package: str, deps: tuple[str, ...] = ()
) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto(
        name=name, package=package, syntax="proto3", dependency=list(deps)
    )


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (any_pb2, empty_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)

    status = _file("google/rpc/status.proto", "google.rpc", ("google/protobuf/any.proto",))
    _message(status, "Status",
             [("code", 1, "int32"), ("message", 2, "string"),
              ("details", 3, ".google.protobuf.Any")],
             repeated=("details",))  # fmt: skip
    pool.Add(status)
    details = _file("google/rpc/error_details.proto", "google.rpc")
    _message(details, "ErrorInfo", [("reason", 1, "string"), ("domain", 2, "string")],
             maps={"metadata": (3, "string", "string")})  # fmt: skip
    pool.Add(details)

    inf = _file(
        "inference.proto",
        INFERENCE_PACKAGE,
        ("google/protobuf/empty.proto", "google/rpc/status.proto"),
    )
    p = f".{INFERENCE_PACKAGE}."
    _message(inf, "PredictionsRequest",
             [("model_name", 1, "string"), ("model_version", 2, "string"),
              ("sequenceId", 4, "string")],
             optional=("sequenceId",), maps={"input": (3, "string", "bytes")})  # fmt: skip
    _message(inf, "PredictionResponse",
             [("prediction", 1, "bytes"), ("sequenceId", 2, "string"),
              ("status", 3, ".google.rpc.Status")],
             optional=("sequenceId", "status"))  # fmt: skip
    _message(inf, "TorchServeHealthResponse", [("health", 1, "string")])
    _service(inf, "InferenceAPIsService", [
        ("Ping", ".google.protobuf.Empty", p + "TorchServeHealthResponse", False, False),
        ("Predictions", p + "PredictionsRequest", p + "PredictionResponse", False, False),
        ("StreamPredictions", p + "PredictionsRequest", p + "PredictionResponse", False, True),
        ("StreamPredictions2", p + "PredictionsRequest", p + "PredictionResponse", True, True),
    ])  # fmt: skip
    pool.Add(inf)

    mgmt = _file("management.proto", MANAGEMENT_PACKAGE)
    m = f".{MANAGEMENT_PACKAGE}."
    _message(mgmt, "ManagementResponse", [("msg", 1, "string")])
    _message(mgmt, "DescribeModelRequest",
             [("model_name", 1, "string"), ("model_version", 2, "string"),
              ("customized", 3, "bool")])  # fmt: skip
    _message(mgmt, "ListModelsRequest", [("limit", 1, "int32"), ("next_page_token", 2, "int32")])
    _message(mgmt, "RegisterModelRequest",
             [("batch_size", 1, "int32"), ("handler", 2, "string"),
              ("initial_workers", 3, "int32"), ("max_batch_delay", 4, "int32"),
              ("model_name", 5, "string"), ("response_timeout", 6, "int32"),
              ("runtime", 7, "string"), ("synchronous", 8, "bool"), ("url", 9, "string"),
              ("s3_sse_kms", 10, "bool"), ("queue_timeout", 11, "int32")])  # fmt: skip
    _message(mgmt, "ScaleWorkerRequest",
             [("model_name", 1, "string"), ("model_version", 2, "string"),
              ("max_worker", 3, "int32"), ("min_worker", 4, "int32"),
              ("number_gpu", 5, "int32"), ("synchronous", 6, "bool"),
              ("timeout", 7, "int32")])  # fmt: skip
    _message(
        mgmt, "SetDefaultRequest", [("model_name", 1, "string"), ("model_version", 2, "string")]
    )
    _message(mgmt, "UnregisterModelRequest",
             [("model_name", 1, "string"), ("model_version", 2, "string")])  # fmt: skip
    _service(mgmt, "ManagementAPIsService", [
        (name, m + req, m + "ManagementResponse", False, False)
        for name, req in (
            ("DescribeModel", "DescribeModelRequest"),
            ("ListModels", "ListModelsRequest"),
            ("RegisterModel", "RegisterModelRequest"),
            ("ScaleWorker", "ScaleWorkerRequest"),
            ("SetDefault", "SetDefaultRequest"),
            ("UnregisterModel", "UnregisterModelRequest"),
        )
    ])  # fmt: skip
    pool.Add(mgmt)
    return pool


POOL = _build_pool()


def message_class(full_name: str) -> type:
    """The Python class of one message of POOL, e.g. "google.rpc.Status"."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


Empty = message_class("google.protobuf.Empty")
Any = message_class("google.protobuf.Any")
RpcStatus = message_class("google.rpc.Status")
ErrorInfo = message_class("google.rpc.ErrorInfo")

PredictionsRequest = message_class(f"{INFERENCE_PACKAGE}.PredictionsRequest")
PredictionResponse = message_class(f"{INFERENCE_PACKAGE}.PredictionResponse")
TorchServeHealthResponse = message_class(f"{INFERENCE_PACKAGE}.TorchServeHealthResponse")

ManagementResponse = message_class(f"{MANAGEMENT_PACKAGE}.ManagementResponse")
DescribeModelRequest = message_class(f"{MANAGEMENT_PACKAGE}.DescribeModelRequest")
ListModelsRequest = message_class(f"{MANAGEMENT_PACKAGE}.ListModelsRequest")
RegisterModelRequest = message_class(f"{MANAGEMENT_PACKAGE}.RegisterModelRequest")
ScaleWorkerRequest = message_class(f"{MANAGEMENT_PACKAGE}.ScaleWorkerRequest")
SetDefaultRequest = message_class(f"{MANAGEMENT_PACKAGE}.SetDefaultRequest")
UnregisterModelRequest = message_class(f"{MANAGEMENT_PACKAGE}.UnregisterModelRequest")


def methods(service: str) -> dict[str, tuple[type, type, bool, bool]]:
    """Method name -> (request class, response class, client streaming, server streaming)."""
    svc = POOL.FindServiceByName(service)
    return {
        md.name: (
            message_factory.GetMessageClass(md.input_type),
            message_factory.GetMessageClass(md.output_type),
            md.client_streaming,
            md.server_streaming,
        )
        for md in svc.methods
    }
