"""TorchServe's config.properties and the per-model YAML config, parsed into frozen dataclasses.

Only keys that change modelport's behaviour are read; unknown keys are kept in `extra` so
nothing a user wrote is silently mistaken for something else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Only archives inside the model store, unless the operator lists more (regexes, TorchServe style)
DEFAULT_ALLOWED_URLS: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSettings:
    """How one model version is served (TorchServe's registration parameters)."""

    batch_size: int = 1
    max_batch_delay_ms: int = 100
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: float = 120.0
    job_queue_size: int = 100

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay must be >= 0, got {self.max_batch_delay_ms}")
        if self.min_workers < 0 or self.max_workers < 0:
            raise ValueError("min_worker and max_worker must be >= 0")
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_worker ({self.max_workers}) must be >= min_worker ({self.min_workers})"
            )
        if self.response_timeout_s <= 0:
            raise ValueError("responseTimeout must be > 0")


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties: `k=v` or `k: v`, #/! comments, backslash line continuation."""
    out: dict[str, str] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.strip() if not logical else raw.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            logical += line[:-1]
            continue
        logical += line
        m = re.match(r"\s*([^=:\s]+)\s*[=:]?\s*(.*)$", logical)
        if m:
            # Java's escapes (`\:`, `\=`, `\n`, ...), as in the snapshots TorchServe writes
            out[m.group(1)] = unescape_java(m.group(2).strip())
        logical = ""
    return out


_JAVA_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
DEFAULT_MAX_SIZE = 6553500  # TorchServe's max_request_size / max_response_size, bytes


def unescape_java(value: str) -> str:
    """java.util.Properties.load's escapes: \\t \\n \\r \\f, \\uXXXX, and `\\x` is `x`."""
    if "\\" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c != "\\" or i + 1 == len(value):
            out.append(c)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", value[i + 2 : i + 6]):
            out.append(chr(int(value[i + 2 : i + 6], 16)))
            i += 6
            continue
        out.append(_JAVA_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(out)


def _bool(v: str | None, default: bool) -> bool:
    if v is None:
        return default
    return v.strip().lower() in ("true", "1", "yes")


def _host_port(address: str | None) -> tuple[str, int] | None:
    if not address:
        return None
    u = urlsplit(address if "://" in address else f"http://{address}")
    if u.port is None:
        raise ValueError(f"address {address!r} has no port")
    return (u.hostname or "127.0.0.1", u.port)


@dataclass(frozen=True)
class ModelEntry:
    """One version listed in config.properties `models=` JSON."""

    name: str
    version: str | None
    mar_name: str
    default: bool
    overrides: dict[str, Any]


@dataclass(frozen=True)
class GrpcSettings:
    """config.properties' gRPC keys; None where a key is not set (TorchServe's ConfigManager
    then serves 127.0.0.1:7070 inference and 127.0.0.1:7071 management)."""

    inference_address: str | None = None
    management_address: str | None = None
    inference_port: int | None = None
    management_port: int | None = None
    ssl: bool = False  # enable_grpc_ssl: certificate_file + private_key_file
    certificate_file: str | None = None
    private_key_file: str | None = None


def _grpc_settings(props: dict[str, str]) -> GrpcSettings:
    def port(key: str) -> int | None:
        raw = props.get(key)
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"config.properties {key}={raw!r} is not a port number") from None

    return GrpcSettings(
        inference_address=props.get("grpc_inference_address") or None,
        management_address=props.get("grpc_management_address") or None,
        inference_port=port("grpc_inference_port"),
        management_port=port("grpc_management_port"),
        ssl=_bool(props.get("enable_grpc_ssl"), False),
        certificate_file=props.get("certificate_file") or None,
        private_key_file=props.get("private_key_file") or None,
    )


@dataclass(frozen=True)
class TSConfig:
    inference_address: tuple[str, int] | None = None
    management_address: tuple[str, int] | None = None
    metrics_address: tuple[str, int] | None = None
    model_store: str | None = None
    load_models: tuple[str, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    allowed_urls: tuple[str, ...] = DEFAULT_ALLOWED_URLS
    default_workers_per_model: int | None = None
    default_response_timeout: float = 120.0
    job_queue_size: int = 100
    disable_token_authorization: bool = False
    token_expiration_min: float = 60.0
    install_py_dep_per_model: bool = False
    # TorchServe >= 0.11 defaults this to false; modelport keeps the API on (it is bound to
    # 127.0.0.1 and token-protected by default) and honours an explicit false
    enable_model_api: bool = True
    # the most GPUs the workers may use (TorchServe: min(this, the GPUs there are)); None: all
    number_of_gpu: int | None = None
    # service_envelope: the request envelope every model's handler runs in (TorchServe's
    # ts.torch_handler.request_envelope: json, body, kserve, kservev2); it replaces the
    # archive's own, as TorchServe's ModelManager sets it on every manifest
    service_envelope: str | None = None
    # max_request_size / max_response_size in bytes (TorchServe's defaults): HTTP bodies are
    # bounded by the first, gRPC messages by the larger
    max_request_size: int = DEFAULT_MAX_SIZE
    max_response_size: int = DEFAULT_MAX_SIZE
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern in self.allowed_urls:
            re.compile(pattern)  # fail at startup, not at the first registration

    def entry_for_archive(self, url: str, name: str | None = None) -> ModelEntry | None:
        """The `models=` entry whose marName is this startup archive (`load_models=`, --models).

        A modelport addition to TorchServe's lookup by (name, version) (see entry_for_model):
        it ties an archive to its entry before the archive is opened, so the entry's name and
        version are served even where the manifest says otherwise (as with `models=` alone).
        A spec that names its model (`NAME=FILE`) only matches entries under that name. An
        exact marName wins over one that is equal only in its file name; several entries
        equally good match none, and the lookup by (name, version) decides.
        """
        candidates = [e for e in self.models if name is None or e.name == name]
        hits = [e for e in candidates if e.mar_name == url]
        if not hits:
            hits = [e for e in candidates if _file_name(e.mar_name) == _file_name(url)]
        return hits[0] if len(hits) == 1 else None

    def entry_for_model(self, name: str, version: str) -> ModelEntry | None:
        """The `models=` entry for a registered model, keyed as TorchServe keys it: the model's
        name (its manifest's, or the one the load spec gives) and its manifest version."""
        return next((e for e in self.models if (e.name, e.version) == (name, version)), None)


def _file_name(url: str) -> str:
    return Path(unquote(urlsplit(url).path)).name


_KNOWN = {
    "inference_address",
    "management_address",
    "metrics_address",
    "model_store",
    "load_models",
    "models",
    "allowed_urls",
    "default_workers_per_model",
    "default_response_timeout",
    "job_queue_size",
    "disable_token_authorization",
    "token_expiration",
    "install_py_dep_per_model",
    "enable_model_api",
    "number_of_gpu",
    "service_envelope",
    "max_request_size",
    "max_response_size",
    "grpc_inference_address",
    "grpc_management_address",
    "grpc_inference_port",
    "grpc_management_port",
    "enable_grpc_ssl",
    "certificate_file",
    "private_key_file",
}


def _model_entries(text: str) -> tuple[ModelEntry, ...]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"config.properties models= is not valid JSON: {e}") from e
    entries = []
    for name, versions in doc.items():
        for version, spec in versions.items():
            if "marName" not in spec:
                raise ValueError(f"models={name}/{version} has no marName")
            entries.append(
                ModelEntry(
                    name=name,
                    version=version,
                    mar_name=spec["marName"],
                    default=bool(spec.get("defaultVersion", False)),
                    overrides=model_overrides(spec),
                )
            )
    return tuple(entries)


def model_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """Map TorchServe camelCase keys (models= JSON, model YAML) to ModelSettings fields."""
    keys = {
        "batchSize": "batch_size",
        "maxBatchDelay": "max_batch_delay_ms",
        "minWorkers": "min_workers",
        "maxWorkers": "max_workers",
        "responseTimeout": "response_timeout_s",
        "jobQueueSize": "job_queue_size",
    }
    return {
        keys[k]: (float(v) if k == "responseTimeout" else int(v))
        for k, v in spec.items()
        if k in keys
    }


def load_ts_config(path: str | Path) -> TSConfig:
    props = parse_properties(Path(path).read_text())
    allowed = props.get("allowed_urls")
    expiration = props.get("token_expiration") or props.get("token_expiration_min")
    workers = props.get("default_workers_per_model")
    n_gpu = props.get("number_of_gpu")
    return TSConfig(
        inference_address=_host_port(props.get("inference_address")),
        management_address=_host_port(props.get("management_address")),
        metrics_address=_host_port(props.get("metrics_address")),
        model_store=props.get("model_store"),
        load_models=tuple(
            s.strip() for s in (props.get("load_models") or "").split(",") if s.strip()
        ),
        models=_model_entries(props["models"]) if props.get("models") else (),
        allowed_urls=tuple(a.strip() for a in allowed.split(",") if a.strip())
        if allowed
        else DEFAULT_ALLOWED_URLS,
        default_workers_per_model=int(workers) if workers else None,
        default_response_timeout=float(props.get("default_response_timeout") or 120),
        job_queue_size=int(props.get("job_queue_size") or 100),
        disable_token_authorization=_bool(props.get("disable_token_authorization"), False),
        token_expiration_min=float(expiration) if expiration else 60.0,
        install_py_dep_per_model=_bool(props.get("install_py_dep_per_model"), False),
        enable_model_api=_bool(props.get("enable_model_api"), True),
        number_of_gpu=max(int(n_gpu), 0) if n_gpu else None,
        service_envelope=_envelope(props.get("service_envelope")),
        max_request_size=_size(props.get("max_request_size")),
        max_response_size=_size(props.get("max_response_size")),
        grpc=_grpc_settings(props),
        extra={k: v for k, v in props.items() if k not in _KNOWN},
    )


ENVELOPES = ("json", "body", "kserve", "kservev2")  # ts.torch_handler.request_envelope


def _size(value: str | None) -> int:
    """A byte count from config.properties; not a positive integer: TorchServe's default."""
    value = (value or "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_SIZE


def _envelope(value: str | None) -> str | None:
    if not value:
        return None
    if value not in ENVELOPES:
        raise ValueError(
            f"service_envelope={value!r}: TorchServe's envelopes are {', '.join(ENVELOPES)}"
        )
    return value


def read_model_yaml(path: Path) -> dict[str, Any]:
    """The archive's model-config YAML (`torch-model-archiver --config-file`)."""
    import yaml

    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name} must be a YAML mapping")
    return doc
