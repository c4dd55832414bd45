"""Client stubs for TorchServe's gRPC APIs, without generated code.

    import grpc
    from modelport.torchserve import protos
    from modelport.torchserve.protos.stubs import inference_stub, management_stub

    with grpc.insecure_channel("127.0.0.1:7070") as ch:
        stub = inference_stub(ch)
        print(stub.Ping(protos.Empty()).health)
        r = stub.Predictions(protos.PredictionsRequest(model_name="m", input={"data": b"1"}))

The stubs have one attribute per RPC, as a `*_pb2_grpc.*Stub` has, and take a `grpc.Channel`
or a `grpc.aio.Channel` alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc

from modelport.torchserve.protos import INFERENCE_SERVICE, MANAGEMENT_SERVICE, methods


def _serialize(message: object) -> bytes:
    # any message with this wire format: ours, or a TorchServe-generated one
    return message.SerializeToString()  # type: ignore[attr-defined]


def _stub(channel: grpc.Channel | grpc.aio.Channel, service: str) -> SimpleNamespace:
    calls = {}
    for name, (_, resp, client_streaming, server_streaming) in methods(service).items():
        kind = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(client_streaming, server_streaming)]
        calls[name] = kind(
            f"/{service}/{name}",
            request_serializer=_serialize,
            response_deserializer=resp.FromString,
        )
    return SimpleNamespace(**calls)


def inference_stub(channel: grpc.Channel | grpc.aio.Channel) -> SimpleNamespace:
    """Ping, Predictions, StreamPredictions, StreamPredictions2."""
    return _stub(channel, INFERENCE_SERVICE)


def management_stub(channel: grpc.Channel | grpc.aio.Channel) -> SimpleNamespace:
    """DescribeModel, ListModels, RegisterModel, ScaleWorker, SetDefault, UnregisterModel."""
    return _stub(channel, MANAGEMENT_SERVICE)
