"""tritonserver's other command-line flags, so `tritonserver ...` becomes `modelport serve ...`.

Why one table: every flag tritonserver takes parses here, and each is one of three things,
said in its help: implemented (the frontend reads it), accepted because modelport already
does what it asks (a no-op), or refused at start-up, naming what to do instead, when it asks
for something modelport does not do. A flag given at Triton's own default is never refused.
Flags left out default to None: not given, modelport's behaviour unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def triton_bool(value: str) -> bool:
    """Triton's boolean option values: `--exit-on-error=false`, `--strict-readiness 0`, ..."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, on/off, 1/0), got {value!r}")


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    type: Callable[[str], Any] = str
    metavar: str = "VALUE"
    boolean: bool = False  # Triton's `--flag[=BOOL]`
    repeat: bool = False  # may be given more than once (a list)
    # value -> why it is refused (None: accepted); checked at start-up
    refuse: Callable[[Any], str | None] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def _when_true(why: str) -> Callable[[Any], str | None]:
    return lambda v: why if v else None


def _always(why: str) -> Callable[[Any], str | None]:
    return lambda v: why


def _unless(default: str, why: str) -> Callable[[Any], str | None]:
    return lambda v: None if v.rstrip("/") == default else why


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _non_negative(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v!r}")
    return n


# --backend-config [BACKEND,]KEY=VALUE: what modelport's built-in backends take. Keys name
# their backend ("" for Triton's global settings); the check returns why a value is refused.
_SHM = "modelport's python models pass tensors without a fixed shared-memory pool"
BACKEND_CONFIG: dict[tuple[str, str], Callable[[str], str | None]] = {
    ("python", "shm-default-byte-size"): lambda v: None,
    ("python", "shm-growth-byte-size"): lambda v: None,
    ("python", "shm-message-queue-size"): lambda v: None,
    ("python", "shm-region-prefix-name"): lambda v: None,
    ("", "default-max-batch-size"): lambda v: (
        None
        if v.strip() == "4"
        else "modelport's ONNX auto-complete uses Triton's default max_batch_size 4; "
        "set max_batch_size in the model's config.pbtxt instead"
    ),
}


def backend_config_problem(item: str) -> str | None:
    """Why a --backend-config item is refused (None: accepted)."""
    setting, sep, value = item.partition("=")
    if not sep:
        return "expected [BACKEND,]KEY=VALUE"
    backend, comma, key = setting.partition(",")
    if not comma:
        backend, key = "", setting
    check = BACKEND_CONFIG.get((backend.strip(), key.strip()))
    if check is None:
        known = ", ".join(f"{b},{k}" if b else k for b, k in BACKEND_CONFIG)
        return (
            f"modelport's built-in backends take no setting {setting!r} (accepted: {known}); "
            "per-model settings go in config.pbtxt parameters"
        )
    return check(value)


def _backend_config(items: list[str]) -> str | None:
    for item in items:
        why = backend_config_problem(item)
        if why is not None:
            return f"{item!r}: {why}"
    return None


# --metrics-config KEY=VALUE: counter_latencies is implemented (false drops Triton's
# cumulative *_duration_us counters); modelport has no summaries or histograms.
METRICS_KEYS = (
    "counter_latencies",
    "summary_latencies",
    "histogram_latencies",
    "summary_quantiles",
)


def metrics_config(items: list[str]) -> dict[str, str]:
    """The --metrics-config items as {key: value}; ValueError for a refused one."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in METRICS_KEYS:
            raise ValueError(
                f"--metrics-config {item!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(METRICS_KEYS)}"
            )
        if key in ("counter_latencies", "summary_latencies", "histogram_latencies"):
            try:
                on = triton_bool(value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--metrics-config {item!r}: {e}") from None
            if on and key != "counter_latencies":
                raise ValueError(
                    f"--metrics-config {item!r}: modelport exports latencies as Triton's "
                    "cumulative counters (nv_inference_*_duration_us) only, no summaries or "
                    "histograms; compute quantiles from the counters' rates in Prometheus"
                )
            value = "true" if on else "false"
        out[key] = value
    return out


def _metrics_config(items: list[str]) -> str | None:
    try:
        metrics_config(items)
    except ValueError as e:
        return str(e).split(": ", 1)[1]
    return None


# Help texts start with what modelport does: [implemented], [no-op] or [refused ...].
FLAGS: tuple[Flag, ...] = (
    # -- endpoints --
    Flag("--http-address", "[implemented] address the HTTP port binds (all frontends share "
         "it; Triton's default 0.0.0.0, modelport's --host)", metavar="ADDR"),
    Flag("--grpc-address", "[implemented] address the gRPC port binds (default: --host)",
         metavar="ADDR"),
    Flag("--metrics-address", "[implemented] address the metrics port binds (default: "
         "--http-address, else --host)", metavar="ADDR"),
    Flag("--allow-http", "[implemented] false: no HTTP endpoint (gRPC and metrics only; "
         "refused with the OpenAI or TorchServe frontends, which only speak HTTP)",
         boolean=True),
    Flag("--allow-grpc", "[implemented] false: no gRPC endpoint (as --grpc-port -1)",
         boolean=True),
    Flag("--allow-metrics", "[implemented] false: no metrics endpoint (as --metrics-port -1)",
         boolean=True),
    Flag("--allow-gpu-metrics", "[no-op] modelport exports no GPU utilization / memory "
         "metrics (nv_gpu_*), on or off", boolean=True),
    Flag("--allow-cpu-metrics", "[no-op] modelport exports no CPU utilization / memory "
         "metrics (nv_cpu_*), on or off", boolean=True),
    Flag("--allow-sagemaker", "[refused when true] modelport has no SageMaker endpoint",
         boolean=True, refuse=_when_true("modelport has no SageMaker endpoint (/invocations, "
                                         "/ping); serve the KServe v2 API behind your own "
                                         "adapter, or drop the flag")),
    Flag("--allow-vertex-ai", "[refused when true] modelport has no Vertex AI endpoint",
         boolean=True, refuse=_when_true("modelport has no Vertex AI endpoint; use the KServe "
                                         "v2 HTTP API (/v2/models/<name>/infer), or drop the "
                                         "flag")),
    Flag("--id", "[implemented] server name in GET /v2 and gRPC ServerMetadata (Triton's "
         "default: triton; modelport's: modelport)", metavar="NAME"),
    Flag("--exit-timeout-secs", "[implemented] at shutdown, seconds to wait for in-flight "
         "HTTP and gRPC requests before cancelling them (Triton's default 30; without the "
         "flag HTTP waits for them, gRPC 1 s)", type=_non_negative, metavar="SECS"),
    # -- model repository --
    Flag("--strict-model-config", "[implemented] deprecated (as in Triton): true is "
         "--disable-auto-complete-config", boolean=True),
    Flag("--model-config-name", "[implemented] load <model>/configs/NAME.pbtxt where it "
         "exists, else config.pbtxt (Triton's custom model configuration)", metavar="NAME"),
    Flag("--model-load-thread-count", "[implemented] load at most N models at a time "
         "(Triton's default 4; without the flag all at once)", type=_positive, metavar="N"),
    Flag("--model-namespacing", "[refused when true] a model name in two repositories is "
         "ambiguous (not loaded) as without namespacing", boolean=True,
         refuse=_when_true("modelport does not namespace models by repository; give each "
                           "model a unique name across the --model-repository folders")),
    Flag("--backend-directory", "[no-op at Triton's default /opt/tritonserver/backends; "
         "other folders refused] modelport's backends are built in", metavar="PATH",
         refuse=_unless("/opt/tritonserver/backends",
                        "modelport's backends are built in (python, pytorch, onnxruntime, "
                        "llm, ensemble) and none is loaded from a folder; drop the flag")),
    Flag("--repoagent-directory", "[no-op at Triton's default /opt/tritonserver/repoagents; "
         "other folders refused] modelport runs no repository agents", metavar="PATH",
         refuse=_unless("/opt/tritonserver/repoagents",
                        "modelport runs no repository agents (model_repository_agents is "
                        "not supported); decrypt / fetch the models before serving")),
    Flag("--backend-config", "[partly no-op] python,shm-default-byte-size / "
         "shm-growth-byte-size / shm-message-queue-size / shm-region-prefix-name (no fixed "
         "shared-memory pool here) and default-max-batch-size=4 (the ONNX auto-complete's) "
         "are accepted; other settings are refused naming the accepted ones",
         metavar="[BACKEND,]KEY=VALUE", repeat=True, refuse=_backend_config),
    # -- memory and threads: modelport allocates as needed and serves on its event loop --
    Flag("--pinned-memory-pool-byte-size", "[no-op] modelport keeps no pinned-memory pool: "
         "host buffers are allocated as needed", type=_non_negative, metavar="BYTES"),
    Flag("--cuda-memory-pool-byte-size", "[no-op] modelport keeps no CUDA memory pool: "
         "device buffers come from PyTorch's caching allocator as needed",
         metavar="GPU:BYTES", repeat=True),
    Flag("--min-supported-compute-capability", "[implemented as a check] refused when a "
         "visible GPU is below it (hide it with CUDA_VISIBLE_DEVICES); no GPU: no-op",
         type=float, metavar="CC"),
    Flag("--http-thread-count", "[no-op] HTTP requests are served on the event loop, not a "
         "thread pool of fixed size", type=_positive, metavar="N"),
    Flag("--grpc-infer-allocation-pool-size", "[no-op] gRPC messages are allocated per "
         "request (no pool)", type=_non_negative, metavar="N"),
    Flag("--buffer-manager-thread-count", "[no-op] inputs are gathered on the request path "
         "(no buffer-manager threads)", type=_non_negative, metavar="N"),
    Flag("--host-policy", "[refused] modelport sets no NUMA node or CPU affinity",
         metavar="NAME,SETTING=VALUE", repeat=True,
         refuse=_always("modelport sets no NUMA node or CPU affinity per device; start it "
                        "under numactl / taskset instead")),
    # -- metrics --
    Flag("--metrics-interval-ms", "[no-op] every metric is read at scrape time, never older "
         "than the scrape", type=_positive, metavar="MS"),
    Flag("--metrics-config", "[implemented] counter_latencies=false drops the "
         "nv_inference_*_duration_us counters; summary_latencies / histogram_latencies=false "
         "and summary_quantiles are accepted (no summaries or histograms here), true refused",
         metavar="KEY=VALUE", repeat=True, refuse=_metrics_config),
    # -- gRPC --
    Flag("--grpc-use-ssl", "[refused when true] modelport's gRPC port is plaintext",
         boolean=True, refuse=_when_true("modelport's gRPC port has no TLS; terminate TLS in "
                                         "a proxy (e.g. Envoy, nginx) in front of it")),
    Flag("--grpc-use-ssl-mutual", "[refused when true] modelport's gRPC port is plaintext",
         boolean=True, refuse=_when_true("modelport's gRPC port has no TLS; terminate mutual "
                                         "TLS in a proxy in front of it")),
    Flag("--grpc-server-cert", "[no-op] read only with --grpc-use-ssl (as in Triton)",
         metavar="PATH"),
    Flag("--grpc-server-key", "[no-op] read only with --grpc-use-ssl (as in Triton)",
         metavar="PATH"),
    Flag("--grpc-root-cert", "[no-op] read only with --grpc-use-ssl (as in Triton)",
         metavar="PATH"),
    Flag("--grpc-keepalive-time", "[implemented] gRPC keepalive ping interval (ms; gRPC's "
         "and Triton's default 7200000)", type=_positive, metavar="MS"),
    Flag("--grpc-keepalive-timeout", "[implemented] gRPC keepalive ping ack timeout (ms; "
         "default 20000)", type=_positive, metavar="MS"),
    Flag("--grpc-keepalive-permit-without-calls", "[implemented] allow keepalive pings "
         "without calls in flight (default false)", boolean=True),
    Flag("--grpc-http2-max-pings-without-data", "[implemented] pings sent without data "
         "(default 2; 0: no limit)", type=_non_negative, metavar="N"),
    Flag("--grpc-http2-min-recv-ping-interval-without-data", "[implemented] least time "
         "between received pings without data (ms; default 300000)", type=_non_negative,
         metavar="MS"),
    Flag("--grpc-http2-max-ping-strikes", "[implemented] bad pings before the connection "
         "is closed (default 2; 0: no limit)", type=_non_negative, metavar="N"),
    Flag("--grpc-max-connection-age", "[implemented] close connections older than this (ms; "
         "default: never)", type=_positive, metavar="MS"),
    Flag("--grpc-max-connection-age-grace", "[implemented] grace after max connection age "
         "(ms; default: no limit)", type=_positive, metavar="MS"),
    Flag("--reuse-grpc-port", "[implemented] SO_REUSEPORT on the gRPC port (default false: "
         "a second server on the port fails to start)", boolean=True),
    Flag("--reuse-http-port", "[no-op when false, refused when true] the HTTP port is "
         "bound without SO_REUSEPORT", boolean=True,
         refuse=_when_true("modelport binds its HTTP port without SO_REUSEPORT; run one "
                           "server per port (or a load balancer in front)")),
    Flag("--grpc-header-forward-pattern", "[refused] modelport passes no request headers "
         "to models", metavar="REGEX",
         refuse=_always("modelport passes no request headers to models; send the values "
                        "as request parameters instead")),
    Flag("--http-header-forward-pattern", "[refused] modelport passes no request headers "
         "to models", metavar="REGEX",
         refuse=_always("modelport passes no request headers to models; send the values "
                        "as request parameters instead")),
    Flag("--grpc-restricted-protocol", "[refused] modelport restricts no protocol groups",
         metavar="GROUPS:KEY=VALUE", repeat=True,
         refuse=_always("modelport has no restricted protocol groups (every RPC is open); "
                        "restrict access in a proxy in front of the gRPC port")),
    Flag("--http-restricted-api", "[refused] modelport restricts no API groups",
         metavar="APIS:KEY=VALUE", repeat=True,
         refuse=_always("modelport has no restricted API groups (every endpoint is open); "
                        "restrict access in a proxy in front of the HTTP port")),
)  # fmt: skip

GRPC_OPTIONS = {  # flag dest -> the grpc core channel argument it sets
    "grpc_keepalive_time": "grpc.keepalive_time_ms",
    "grpc_keepalive_timeout": "grpc.keepalive_timeout_ms",
    "grpc_keepalive_permit_without_calls": "grpc.keepalive_permit_without_calls",
    "grpc_http2_max_pings_without_data": "grpc.http2.max_pings_without_data",
    "grpc_http2_min_recv_ping_interval_without_data": (
        "grpc.http2.min_ping_interval_without_data_ms"
    ),
    "grpc_http2_max_ping_strikes": "grpc.http2.max_ping_strikes",
    "grpc_max_connection_age": "grpc.max_connection_age_ms",
    "grpc_max_connection_age_grace": "grpc.max_connection_age_grace_ms",
}


class _HttpPort(argparse.Action):
    """--http-port: tritonserver's name of --port (the shared HTTP port)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        namespace.port = values
        namespace.port_given = True


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "tritonserver's other flags (help: [implemented], [no-op]: modelport already does "
        "what it asks, or [refused]: start-up stops naming what to do instead)"
    )
    g.add_argument(
        "--http-port",
        type=int,
        action=_HttpPort,
        metavar="PORT",
        help="[implemented] tritonserver's name of --port: the HTTP port, which the OpenAI "
        "and TorchServe frontends share (default 8000)",
    )
    g.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        default=None,
        help="[implemented] models' configs are not completed from the model itself (the "
        "ONNX graph's inputs and outputs, a python model's auto_complete_config)",
    )
    for f in FLAGS:
        kw: dict[str, Any] = {"dest": f.dest, "default": None, "help": f.help}
        if f.boolean:
            kw.update(type=triton_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw.update(type=f.type, metavar=f.metavar)
        if f.repeat:
            kw["action"] = "append"
        g.add_argument(f.name, **kw)


def refusals(args: argparse.Namespace) -> list[str]:
    """Why the given flags cannot be served as asked (empty: all fine)."""
    out = []
    for f in FLAGS:
        value = getattr(args, f.dest, None)
        if value is None or f.refuse is None:
            continue
        why = f.refuse(value)
        if why is not None:
            if isinstance(value, bool):
                shown = f"{f.name}={str(value).lower()}"
            else:
                shown = " ".join(f"{f.name} {v}" for v in (value if f.repeat else [value]))
            out.append(f"{shown}: {why}")
    if getattr(args, "allow_http", None) is False:
        # the OpenAI frontend rides along for a repository's llm models (/v1, off with HTTP);
        # asked for in its own right (--model), or TorchServe's, it would serve nothing
        asked = [m.rsplit(".", 2)[-2] for m in getattr(args, "serve_frontends", ())
                 if (".torchserve." in m or (".openai." in m and getattr(args, "model", None)))]  # fmt: skip
        if asked:
            out.append(
                f"--allow-http=false: the {', '.join(asked)} frontend only speaks HTTP; serve "
                "it from another `modelport serve`, or keep HTTP on"
            )
    cc = getattr(args, "min_supported_compute_capability", None)
    if cc is not None:
        low = _gpus_below(cc)
        if low:
            out.append(
                f"--min-supported-compute-capability {cc}: GPU {', '.join(low)} is below it "
                "and modelport would use it; hide it with CUDA_VISIBLE_DEVICES"
            )
    return out


def _gpus_below(cc: float) -> list[str]:
    from modelport.repository.manager import gpu_count

    if gpu_count() == 0:
        return []
    import torch

    low = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if float(f"{major}.{minor}") < cc:
            low.append(f"{i} ({major}.{minor})")
    return low


def check(args: argparse.Namespace) -> None:
    """End `modelport serve` with every refused flag and why."""
    problems = refusals(args)
    if problems:
        raise SystemExit("modelport serve: " + "\n  ".join(["unsupported flags:", *problems]))


def auto_complete(args: argparse.Namespace) -> bool:
    return not (
        getattr(args, "disable_auto_complete_config", None)
        or getattr(args, "strict_model_config", None)
    )


def grpc_options(args: argparse.Namespace) -> list[tuple[str, int]]:
    """gRPC server channel arguments from the --grpc-keepalive-* / --grpc-http2-* /
    --reuse-grpc-port flags (only those given; --reuse-grpc-port defaults to off)."""
    opts = [(option, int(getattr(args, dest))) for dest, option in GRPC_OPTIONS.items()
            if getattr(args, dest, None) is not None]  # fmt: skip
    opts.append(("grpc.so_reuseport", int(bool(getattr(args, "reuse_grpc_port", None)))))
    return opts
