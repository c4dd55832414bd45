"""KServe benchmark: requests/s and p50/p99 latency of a small ONNX model, batching off vs on.

    .venv/bin/python bench/kserve_bench.py [--concurrency 64] [--duration 15] [--protocol grpc]

Builds an ONNX MLP (512 -> 4096 -> 512, fp32: 16 MB of weights read per execution) into a temporary repository twice: `mlp_plain`
(no dynamic_batching: every request runs alone) and `mlp_batched` (dynamic_batching, max
batch 64, max_queue_delay 2 ms). Both have the same instance count. `modelport serve` runs
as a child process (`--server embedded`: the KServe frontend alone, for machines that lack
the other frontends' packages); the clients are tritonclient's asyncio gRPC (or HTTP) client, each of
`--concurrency` coroutines sending one [1, 256] request at a time in a closed loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from modelport.repository.testing import build_onnx_mlp

CONFIG = """
name: "{name}"
backend: "onnxruntime"
max_batch_size: 64
input [{{ name: "INPUT" data_type: TYPE_FP32 dims: [ {width} ] }}]
output [{{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {width} ] }}]
instance_group [{{ count: {instances} kind: KIND_CPU }}]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}
{batching}
"""


def make_repo(
    root: Path, instances: int, threads: int, delay_us: int, width: int, hidden: int
) -> Path:
    repo = root / "models"
    for name, batching in (
        ("mlp_plain", ""),
        ("mlp_batched", f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}"),
    ):
        d = repo / name
        build_onnx_mlp(d / "1" / "model.onnx", width=width, hidden=hidden)
        (d / "config.pbtxt").write_text(
            CONFIG.format(
                name=name, instances=instances, threads=threads, batching=batching, width=width
            )
        )
    return repo


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready") as r:
            return r.status == 200
    except OSError:
        return False


def http_json(http_port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}") as r:
        return json.loads(r.read())


def serve_only(repo: str, http_port: str, grpc_port: str) -> int:
    """The KServe frontend alone, until SIGTERM."""
    from modelport.entrypoints.kserve.embedded import EmbeddedServer

    server = EmbeddedServer(
        [repo], http_port=int(http_port), grpc_port=int(grpc_port), metrics_port=-1
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_clients(
    url: str, protocol: str, model: str, concurrency: int, duration: float, width: int
):
    if protocol == "grpc":
        import tritonclient.grpc.aio as client_mod
    else:
        import tritonclient.http.aio as client_mod
    client = client_mod.InferenceServerClient(url)
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    latencies: list[float] = []
    errors = 0

    async def worker(stop_at: float) -> None:
        nonlocal errors
        inp = client_mod.InferInput("INPUT", [1, width], "FP32")
        inp.set_data_from_numpy(x)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await client.infer(model, [inp])
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    # warm-up, then the measured window
    await asyncio.gather(*(worker(time.perf_counter() + 1.0) for _ in range(concurrency)))
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + duration) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads per instance"
    )
    ap.add_argument("--delay-us", type=int, default=2000, help="max_queue_delay_microseconds")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--server", choices=["serve", "embedded"], default="serve")
    ap.add_argument(
        "--serve-only", nargs=3, metavar=("REPO", "HTTP", "GRPC"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.serve_only:
        return serve_only(*args.serve_only)

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(
            Path(tmp), args.instances, args.threads, args.delay_us, args.width, args.hidden
        )
        http_port, grpc_port = free_port(), free_port()
        if args.server == "serve":
            cmd = [sys.executable, "-m", "modelport", "serve", "--model-repository", str(repo),
                   "--port", str(http_port), "--grpc-port", str(grpc_port),
                   "--metrics-port", "-1", "--log-level", "warning"]  # fmt: skip
        else:
            cmd = [
                sys.executable,
                __file__,
                "--serve-only",
                str(repo),
                str(http_port),
                str(grpc_port),
            ]
        proc = subprocess.Popen(cmd)
        try:
            deadline = time.time() + 120
            while not ready(http_port):
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            url = f"127.0.0.1:{grpc_port if args.protocol == 'grpc' else http_port}"
            rows = []
            for model in ("mlp_plain", "mlp_batched"):
                r = asyncio.run(
                    run_clients(
                        url, args.protocol, model, args.concurrency, args.duration, args.width
                    )
                )
                stats = http_json(http_port, f"/v2/models/{model}/stats")["model_stats"][0]
                execs, infers = stats["execution_count"], stats["inference_count"]
                r["mean_batch"] = infers / max(execs, 1)
                rows.append((model, r))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.protocol}, {args.concurrency} concurrent clients, {args.duration:.0f} s, "
        f"{args.instances} instance(s) x {args.threads} ort thread(s), delay {args.delay_us} us, "
        f"MLP {args.width}-{args.hidden}-{args.width}"
    )
    print("| model | dynamic batching | requests/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|")
    for model, r in rows:
        on = "on" if model == "mlp_batched" else "off"
        print(
            f"| {model} | {on} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['mean_batch']:.1f} | {r['errors']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
