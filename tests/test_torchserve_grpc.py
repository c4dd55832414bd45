"""TorchServe's gRPC APIs end to end: one `modelport serve` with real .mar archives, token
auth on and the gRPC ports set in config.properties, driven by the client stubs a TorchServe
user would use (same service paths and messages as TorchServe's published protos)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from modelport.entrypoints.torchserve.grpc_api import GrpcEndpoint, GrpcPlan, GrpcServers, grpc_plan
from modelport.torchserve import protos
from modelport.torchserve.protos.stubs import inference_stub, management_stub
from modelport.torchserve.ts_config import TSConfig, load_ts_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "torchserve"))
import ts_archives  # noqa: E402

from helpers.server_proc import free_port as _free_port

HERE = Path(__file__).parent / "fixtures" / "torchserve"
AUTH_FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided"


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.mport = _free_port(), _free_port()
        self.grpc_inference, self.grpc_management = _free_port(), _free_port()
        self.key_file = root / "key_file.json"
        self.channels: list[grpc.Channel] = []

    def key(self, kind: str) -> list[tuple[str, str]]:
        keys = json.loads(self.key_file.read_text())
        return [("authorization", f"Bearer {keys[kind]['key']}")]

    def _channel(self, port: int) -> grpc.Channel:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(ch)
        return ch

    def inference(self):  # noqa: ANN201
        return inference_stub(self._channel(self.grpc_inference))

    def management(self):  # noqa: ANN201
        return management_stub(self._channel(self.grpc_management))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts_grpc")
    store, work = root / "model_store", root / "work"
    ts_archives.echo_archive(store, work / "echo1", greeting="hello from v1")
    ts_archives.echo_archive(
        store, work / "echo2", name="echo_v2", version="2.0", greeting="hello from v2"
    )
    ts_archives.archive(store, "stream", HERE / "stream_handler.py")
    s = Server(root)
    cfg = root / "config.properties"
    cfg.write_text(
        f"grpc_inference_port={s.grpc_inference}\ngrpc_management_port={s.grpc_management}\n"
    )
    cmd = [
        sys.executable, "-m", "modelport", "serve",
        "--port", str(s.port), "--log-level", "warning",
        "--model-store", str(store), "--models", "echo=echo.mar", "stream=stream.mar",
        "--ts-config", str(cfg), "--management-port", str(s.mport),
        "--ts-key-file", str(s.key_file),
        "--ts-workers", "1",  # not one per CPU, TorchServe's default
    ]  # fmt: skip
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-4000:])
        try:
            if s.key_file.exists():
                stub = s.inference()
                stub.Ping(protos.Empty(), metadata=s.key("inference"), timeout=2)
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + (root / "server.log").read_text())
        time.sleep(0.3)
    yield s
    for ch in s.channels:
        ch.close()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _rpc_error(call, *args, **kw) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kw)
        if not hasattr(result, "SerializeToString"):
            list(result)  # a server stream: errors come while reading it
    return info.value


# ---- inference ---------------------------------------------------------------------------------


def test_ping_and_predictions(server):
    stub, md = server.inference(), server.key("inference")
    health = stub.Ping(protos.Empty(), metadata=md, timeout=10).health
    assert json.loads(health) == {"status": "Healthy"}

    r = stub.Predictions(
        protos.PredictionsRequest(model_name="echo", input={"data": b"hi"}),
        metadata=md,
        timeout=30,
    )
    doc = json.loads(r.prediction)
    # gRPC inputs reach the handler by name, as bytes (no content type), as in TorchServe
    assert doc["echo"] == "hi" and doc["keys"] == ["data"] and doc["version"] == "1.0"
    assert doc["greeting"] == "hello from v1"

    # TorchServe's InferenceImpl: an unknown model is INTERNAL, its description the message
    # and the exception class
    err = _rpc_error(
        stub.Predictions,
        protos.PredictionsRequest(model_name="nope", input={"data": b"x"}),
        metadata=md,
        timeout=10,
    )
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == (
        "Model not found: nope\norg.pytorch.serve.archive.model.ModelNotFoundException"
    )
    err = _rpc_error(
        stub.Predictions,
        protos.PredictionsRequest(model_name="echo", model_version="9.9"),
        metadata=md,
        timeout=10,
    )
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ModelVersionNotFoundException" in err.details()
    err = _rpc_error(stub.Predictions, protos.PredictionsRequest(), metadata=md, timeout=10)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details().startswith("Parameter model_name is required.")

    # a handler's PredictionException(message, 429): GRPCUtils maps the status
    err = _rpc_error(
        stub.Predictions,
        protos.PredictionsRequest(model_name="echo", input={"data": b"predict_error:429:slow"}),
        metadata=md,
        timeout=30,
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("slow")


def test_stream_predictions(server):
    stub, md = server.inference(), server.key("inference")
    t0 = time.monotonic()
    stream = stub.StreamPredictions(
        protos.PredictionsRequest(model_name="stream", input={"body": b"3"}),
        metadata=md,
        timeout=30,
    )
    chunks, times = [], []
    for r in stream:
        chunks.append(r.prediction.decode())
        times.append(time.monotonic() - t0)
    assert chunks == ["tok0 ", "tok1 ", "tok2 ", "[end]"]
    # each intermediate response is sent when the handler sends it, not all at the end
    assert times[-1] - times[0] > 0.5

    # a client that leaves mid-stream costs the server nothing but that request
    stream = stub.StreamPredictions(
        protos.PredictionsRequest(model_name="stream", input={"body": b"2"}),
        metadata=md,
        timeout=30,
    )
    assert next(stream).prediction == b"tok0 "
    stream.cancel()
    r = stub.Predictions(
        protos.PredictionsRequest(model_name="stream", input={"body": b"1"}),
        metadata=md,
        timeout=30,
    )
    assert r.prediction == b"[end]"  # Predictions answers the final response

    err = _rpc_error(
        stub.StreamPredictions,
        protos.PredictionsRequest(model_name="nope"),
        metadata=md,
        timeout=10,
    )
    assert err.code() == grpc.StatusCode.INTERNAL and "Model not found: nope" in err.details()


def test_stream_predictions2_bidirectional(server):
    stub, md = server.inference(), server.key("inference")
    requests = [
        protos.PredictionsRequest(model_name="echo", input={"data": b"a"}, sequenceId="s1"),
        protos.PredictionsRequest(model_name="nope", sequenceId="s1"),
        protos.PredictionsRequest(model_name="stream", input={"body": b"1"}, sequenceId="s1"),
    ]
    out = list(stub.StreamPredictions2(iter(requests), metadata=md, timeout=30))
    assert [r.sequenceId for r in out] == ["s1"] * 4
    assert json.loads(out[0].prediction)["echo"] == "a" and not out[0].HasField("status")
    # an error is in-band (the stream goes on), with the code and TorchServe's reason
    assert out[1].HasField("status") and out[1].status.code == grpc.StatusCode.INTERNAL.value[0]
    assert out[1].status.message == "Model not found: nope"
    info = protos.ErrorInfo()
    assert out[1].status.details[0].Unpack(info)
    assert info.reason == "org.pytorch.serve.archive.model.ModelNotFoundException"
    assert [r.prediction for r in out[2:]] == [b"tok0 ", b"[end]"]


# ---- management --------------------------------------------------------------------------------


def test_management_round_trip(server):
    m, md = server.management(), server.key("management")
    doc = json.loads(m.ListModels(protos.ListModelsRequest(), metadata=md, timeout=10).msg)
    assert [x["modelName"] for x in doc["models"]] == ["echo", "stream"]
    page = json.loads(m.ListModels(protos.ListModelsRequest(limit=1), metadata=md).msg)
    assert [x["modelName"] for x in page["models"]] == ["echo"] and page["nextPageToken"] == "1"

    # a second version of "echo", from an archive of another name in the store
    r = m.RegisterModel(
        protos.RegisterModelRequest(
            url="echo_v2.mar", model_name="echo", initial_workers=1, synchronous=True
        ),
        metadata=md,
        timeout=60,
    )
    assert r.msg == 'Model "echo" Version: 2.0 registered with 1 initial workers'
    desc = json.loads(
        m.DescribeModel(
            protos.DescribeModelRequest(model_name="echo", model_version="all"), metadata=md
        ).msg
    )
    assert sorted(d["modelVersion"] for d in desc) == ["1.0", "2.0"]
    # one registry behind both protocols: the REST management API sees the gRPC registration
    rest = httpx.get(
        f"http://127.0.0.1:{server.mport}/models/echo/all",
        headers={"Authorization": md[0][1]},
        timeout=10,
    )
    assert sorted(d["modelVersion"] for d in rest.json()) == ["1.0", "2.0"]

    r = m.SetDefault(protos.SetDefaultRequest(model_name="echo", model_version="2.0"), metadata=md)
    assert r.msg == 'Default version successfully updated for model "echo" to "2.0"'
    pred = server.inference().Predictions(
        protos.PredictionsRequest(model_name="echo", input={"data": b"x"}),
        metadata=server.key("inference"),
        timeout=30,
    )
    assert json.loads(pred.prediction)["greeting"] == "hello from v2"

    r = m.ScaleWorker(
        protos.ScaleWorkerRequest(
            model_name="echo", model_version="2.0", min_worker=2, synchronous=True
        ),
        metadata=md,
        timeout=60,
    )
    assert r.msg == "Workers scaled to 2 for model: echo, version: 2.0"
    (d,) = json.loads(
        m.DescribeModel(protos.DescribeModelRequest(model_name="echo"), metadata=md).msg
    )
    assert d["modelVersion"] == "2.0" and len(d["workers"]) == 2 and d["minWorkers"] == 2
    (d,) = json.loads(
        m.DescribeModel(
            protos.DescribeModelRequest(model_name="echo", customized=True), metadata=md
        ).msg
    )
    assert d["customizedMetadata"] == {"handler": "EchoHandler", "greeting": "hello from v2"}

    r = m.UnregisterModel(
        protos.UnregisterModelRequest(model_name="echo", model_version="1.0"), metadata=md
    )
    assert r.msg == 'Model "echo" unregistered'
    desc = json.loads(
        m.DescribeModel(
            protos.DescribeModelRequest(model_name="echo", model_version="all"), metadata=md
        ).msg
    )
    assert [d["modelVersion"] for d in desc] == ["2.0"]


def test_management_errors(server):
    m, md = server.management(), server.key("management")
    err = _rpc_error(m.DescribeModel, protos.DescribeModelRequest(model_name="nope"), metadata=md)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == (
        "Model not found: nope\norg.pytorch.serve.archive.model.ModelNotFoundException"
    )
    err = _rpc_error(
        m.SetDefault, protos.SetDefaultRequest(model_name="stream", model_version="9.9"),
        metadata=md,
    )  # fmt: skip
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == (  # torchserve 0.12's
        "Model version 9.9 does not exist for model stream"
        "\norg.pytorch.serve.archive.model.ModelVersionNotFoundException"
    )
    err = _rpc_error(m.ScaleWorker, protos.ScaleWorkerRequest(model_name="nope"), metadata=md)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = _rpc_error(m.RegisterModel, protos.RegisterModelRequest(), metadata=md)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("Parameter url is required.")
    err = _rpc_error(
        m.RegisterModel, protos.RegisterModelRequest(url="missing.mar"), metadata=md, timeout=30
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and "missing.mar" in err.details()
    err = _rpc_error(m.UnregisterModel, protos.UnregisterModelRequest(), metadata=md)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_token_authorization(server):
    inf, m = server.inference(), server.management()
    req = protos.PredictionsRequest(model_name="echo", input={"data": b"x"})
    bad = [("authorization", "Bearer incorrect-token")]
    for call, arg, md in (
        (inf.Predictions, req, None),  # no token
        (inf.Predictions, req, bad),
        (inf.Ping, protos.Empty(), bad),
        (inf.Predictions, req, server.key("management")),  # the other port's key
        (inf.StreamPredictions, req, bad),
        (m.ListModels, protos.ListModelsRequest(), server.key("inference")),
        (m.UnregisterModel, protos.UnregisterModelRequest(model_name="stream"), bad),
    ):
        err = _rpc_error(call, arg, metadata=md, timeout=10)
        assert err.code() == grpc.StatusCode.CANCELLED, (call, err)
        assert err.details().startswith(AUTH_FAILED)
    # nothing was unregistered by the refused call
    doc = json.loads(
        m.ListModels(protos.ListModelsRequest(), metadata=server.key("management")).msg
    )
    assert "stream" in [x["modelName"] for x in doc["models"]]


# ---- protos, config, ports (no server) ---------------------------------------------------------


def test_proto_files_say_what_the_descriptors_say():
    """The shipped .proto files (for users' own codegen) and the descriptors the server is
    built from name the same packages, messages, field numbers and RPCs."""
    root = Path(protos.__file__).parent
    for fname, package in (
        ("inference.proto", protos.INFERENCE_PACKAGE),
        ("management.proto", protos.MANAGEMENT_PACKAGE),
    ):
        text = re.sub(r"//[^\n]*", "", (root / fname).read_text())
        assert f"package {package};" in text
        for name, body in re.findall(r"message (\w+) \{(.*?)\n\}", text, re.S):
            fields = {
                n: (int(num), t, bool(opt))
                for opt, t, n, num in re.findall(
                    r"(optional )?(map<\w+, \w+>|[\w.]+) (\w+) = (\d+);", body
                )
            }
            desc = protos.POOL.FindMessageTypeByName(f"{package}.{name}")
            assert fields == {
                f.name: (f.number, _proto_type(f), f.containing_oneof is not None)
                for f in desc.fields
            }, name
        for svc, body in re.findall(r"service (\w+) \{(.*?)\n\}", text, re.S):
            rpcs = re.findall(r"rpc (\w+)\((stream )?[\w.]+\) returns \((stream )?[\w.]+\)", body)
            methods = protos.methods(f"{package}.{svc}")
            assert {n: (bool(cs), bool(ss)) for n, cs, ss in rpcs} == {
                n: (cs, ss) for n, (_, _, cs, ss) in methods.items()
            }


def _proto_type(f) -> str:  # noqa: ANN001
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        k, v = f.message_type.fields
        return f"map<{_proto_type(k)}, {_proto_type(v)}>"
    if f.message_type is not None:
        return f.message_type.full_name
    return {f.TYPE_STRING: "string", f.TYPE_BYTES: "bytes", f.TYPE_INT32: "int32",
            f.TYPE_BOOL: "bool"}[f.type]  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    from modelport.entrypoints.torchserve import frontend

    parser = argparse.ArgumentParser()
    frontend.add_serve_args(parser)
    return parser.parse_args(list(argv))


def test_grpc_plan_from_config_and_cli(tmp_path):
    plan = grpc_plan(_args(), TSConfig())
    assert plan.inference == GrpcEndpoint("127.0.0.1", 7070, explicit=False)
    assert plan.management == GrpcEndpoint("127.0.0.1", 7071, explicit=False)
    assert grpc_plan(_args("--disable-grpc"), TSConfig()) is None

    cfg = tmp_path / "config.properties"
    cfg.write_text(
        "grpc_inference_port=9070\ngrpc_management_address=0.0.0.0\ngrpc_management_port=9071\n"
    )
    plan = grpc_plan(_args("--grpc-inference-port", "9999"), load_ts_config(cfg))
    assert plan.inference == GrpcEndpoint("127.0.0.1", 9999, explicit=True)  # CLI wins
    assert plan.management == GrpcEndpoint("0.0.0.0", 9071, explicit=True)

    cfg.write_text("enable_grpc_ssl=true\n")
    with pytest.raises(SystemExit, match="certificate_file and private_key_file"):
        grpc_plan(_args(), load_ts_config(cfg))


def test_busy_port_fails_when_configured_and_is_skipped_when_default():
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port, free = busy.getsockname()[1], _free_port()
            plan = GrpcPlan(
                GrpcEndpoint("127.0.0.1", port, explicit=True),
                GrpcEndpoint("127.0.0.1", free, explicit=True),
            )
            with pytest.raises(OSError, match=f"gRPC inference API to 127.0.0.1:{port}"):
                await GrpcServers.start(None, plan)  # type: ignore[arg-type]
            plan = GrpcPlan(
                GrpcEndpoint("127.0.0.1", port, explicit=False),
                GrpcEndpoint("127.0.0.1", free, explicit=False),
            )
            servers = await GrpcServers.start(None, plan)  # type: ignore[arg-type]
            try:
                assert servers.inference_port is None and servers.management_port == free
            finally:
                await servers.stop()

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_grpc_ssl_with_certificate_and_key_files(tmp_path):
    """enable_grpc_ssl=true with certificate_file and private_key_file: TLS on both ports."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    cfg = tmp_path / "config.properties"
    iport, mport = _free_port(), _free_port()
    cfg.write_text(
        f"enable_grpc_ssl=true\ncertificate_file={cert}\nprivate_key_file={key}\n"
        f"grpc_inference_port={iport}\ngrpc_management_port={mport}\n"
    )
    plan = grpc_plan(_args(), load_ts_config(cfg))
    state = SimpleNamespace(auth=None, registry=SimpleNamespace(default_versions=lambda: []))

    async def main() -> None:
        servers = await GrpcServers.start(state, plan)  # type: ignore[arg-type]
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{iport}", creds) as ch:
                r = await inference_stub(ch).Ping(protos.Empty(), timeout=10)
                assert json.loads(r.health) == {"status": "Healthy"}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{iport}") as ch:
                with pytest.raises(grpc.RpcError):  # plaintext is refused
                    await inference_stub(ch).Ping(protos.Empty(), timeout=3)
        finally:
            await servers.stop()

    asyncio.run(main())


def test_model_api_disabled_is_permission_denied():
    """enable_model_api=false: TorchServe's gRPC answers PERMISSION_DENIED (REST: 405)."""
    state = SimpleNamespace(auth=None, model_api=False, registry=None)
    port = _free_port()
    plan = GrpcPlan(
        GrpcEndpoint("127.0.0.1", _free_port(), explicit=True),
        GrpcEndpoint("127.0.0.1", port, explicit=True),
    )

    async def main() -> None:
        servers = await GrpcServers.start(state, plan)  # type: ignore[arg-type]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                m = management_stub(ch)
                for call, req in (
                    (m.RegisterModel, protos.RegisterModelRequest(url="echo.mar")),
                    (m.UnregisterModel, protos.UnregisterModelRequest(model_name="echo")),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(req, timeout=10)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert info.value.details() == (
                        "Model API disabled\norg.pytorch.serve.archive.model.ModelException"
                    )
        finally:
            await servers.stop()

    asyncio.run(main())
