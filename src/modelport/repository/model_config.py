"""Reading config.pbtxt into Triton's own ModelConfig schema, and writing it back as JSON.

Why tritonclient's generated `model_config_pb2`: the schema (field names, enums, defaults)
is exactly Triton's, so configs written for Triton parse unchanged and unknown fields fail
the way users expect. protobuf's text_format does the parsing; we add only the defaults
Triton fills in (name, backend from platform or files, instance count, version policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError

ModelConfig = mc.ModelConfig

# platform -> backend, as Triton maps them
PLATFORM_BACKENDS = {
    "pytorch_libtorch": "pytorch",
    "onnxruntime_onnx": "onnxruntime",
    "ensemble": "ensemble",
}
BACKEND_PLATFORMS = {v: k for k, v in PLATFORM_BACKENDS.items()}
# default model file per backend (default_model_filename overrides)
DEFAULT_FILENAMES = {"python": "model.py", "pytorch": "model.pt", "onnxruntime": "model.onnx"}


def parse_config_text(text: str, where: str = "config.pbtxt") -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise ModelConfigError(f"failed to parse {where}: {e}") from None
    return cfg


def config_path(model_dir: Path, config_name: str = "") -> Path:
    """`<model_dir>/configs/<config_name>.pbtxt` where it exists (Triton's
    --model-config-name), else `<model_dir>/config.pbtxt`."""
    if config_name:
        custom = model_dir / "configs" / f"{config_name}.pbtxt"
        if custom.is_file():
            return custom
    return model_dir / "config.pbtxt"


def read_config(model_dir: Path, config_name: str = "") -> mc.ModelConfig:
    """Parse the model's config file (see `config_path`; missing: an empty config to
    autocomplete)."""
    path = config_path(model_dir, config_name)
    if not path.is_file():
        return mc.ModelConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"failed to read {path}: {e}") from None
    return parse_config_text(text, str(path))


def _detect_backend(model_dir: Path, cfg: mc.ModelConfig) -> str:
    names = set()
    for vdir in model_dir.iterdir():
        if vdir.is_dir() and vdir.name.isdigit():
            names.update(p.name for p in vdir.iterdir())
    if cfg.default_model_filename:
        fname = cfg.default_model_filename
        for backend, default in DEFAULT_FILENAMES.items():
            if Path(fname).suffix == Path(default).suffix:
                return backend
    for backend, default in DEFAULT_FILENAMES.items():
        if default in names:
            return backend
    return ""


def autocomplete(cfg: mc.ModelConfig, model_dir: Path, gpu_count: int = 0) -> mc.ModelConfig:
    """Fill the defaults Triton fills; returns a new message, the input is left unchanged."""
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    if not out.name:
        out.name = model_dir.name
    if not out.backend:
        if out.platform:
            out.backend = PLATFORM_BACKENDS.get(out.platform, "")
        else:
            out.backend = _detect_backend(model_dir, out)
    if not out.platform and out.backend in BACKEND_PLATFORMS:
        out.platform = BACKEND_PLATFORMS[out.backend]
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    elif out.version_policy.WhichOneof("policy_choice") == "latest":
        if out.version_policy.latest.num_versions == 0:
            out.version_policy.latest.num_versions = 1
    if out.backend != "ensemble":
        if not out.instance_group:
            out.instance_group.add()
        for i, group in enumerate(out.instance_group):
            if not group.name:
                group.name = f"{out.name}_{i}"
            if group.count == 0:
                group.count = 1
            if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
                wants_gpu = out.backend in ("pytorch", "onnxruntime") and gpu_count > 0
                group.kind = (
                    mc.ModelInstanceGroup.KIND_GPU if wants_gpu else mc.ModelInstanceGroup.KIND_CPU
                )
            if group.kind == mc.ModelInstanceGroup.KIND_GPU and not group.gpus:
                group.gpus.extend(range(gpu_count) if gpu_count else [0])
    return out


def _fix_int64(msg: Any, d: dict[str, Any]) -> None:
    """MessageToDict writes 64-bit ints as strings; Triton's JSON has numbers."""
    for fd in msg.DESCRIPTOR.fields:
        name = fd.name
        if name not in d:
            continue
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                value_fd = fd.message_type.fields_by_name["value"]
                for k, v in d[name].items():
                    if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                        _fix_int64(getattr(msg, name)[_map_key(fd, k)], v)
                    elif isinstance(v, str) and value_fd.cpp_type in _INT64:
                        d[name][k] = int(v)
            elif isinstance(d[name], list):
                for sub, sd in zip(getattr(msg, name), d[name]):
                    _fix_int64(sub, sd)
            else:
                _fix_int64(getattr(msg, name), d[name])
        elif fd.cpp_type in _INT64:
            v = d[name]
            d[name] = [int(x) for x in v] if isinstance(v, list) else int(v)


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _map_key(fd: FieldDescriptor, key: str) -> Any:
    key_fd = fd.message_type.fields_by_name["key"]
    return key if key_fd.cpp_type == FieldDescriptor.CPPTYPE_STRING else int(key)


def config_to_json(cfg: mc.ModelConfig) -> dict[str, Any]:
    """Triton's JSON rendering of a ModelConfig (proto field names, numeric int64s)."""
    d = json_format.MessageToDict(
        cfg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _fix_int64(cfg, d)
    return d


def config_from_json(data: dict[str, Any] | str) -> mc.ModelConfig:
    """A config override given as JSON (repository load with a "config" parameter)."""
    cfg = mc.ModelConfig()
    try:
        if isinstance(data, str):
            json_format.Parse(data, cfg)
        else:
            json_format.ParseDict(data, cfg)
    except json_format.ParseError as e:
        raise ModelConfigError(f"failed to parse the config override: {e}") from None
    return cfg


def is_decoupled(cfg: mc.ModelConfig) -> bool:
    return cfg.model_transaction_policy.decoupled


def string_parameters(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}
