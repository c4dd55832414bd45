"""Checks a ModelConfig must pass before any backend sees it.

Why up front: a bad config must leave only that model unavailable, with a reason a user can
act on, and never surface later as a confusing runtime error. Checks that need other
models (an ensemble's composing models) live in ensemble.py; checks that need the model
files live in the backends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import ModelConfigError
from modelport.repository.sequence import validate_sequence_batching

_KIND = mc.ModelInstanceGroup


# Triton platforms of frameworks this server has no runtime for (the message names the ways in)
OTHER_FRAMEWORKS = {
    "tensorrt_plan": "a TensorRT engine",
    "tensorflow_graphdef": "a TensorFlow GraphDef",
    "tensorflow_savedmodel": "a TensorFlow SavedModel",
    "openvino": "an OpenVINO model",
}


def _err(cfg: mc.ModelConfig, message: str) -> ModelConfigError:
    return ModelConfigError(f"model '{cfg.name}': {message}")


def _check_dims(cfg: mc.ModelConfig, what: str, name: str, dims: Sequence[int]) -> None:
    for d in dims:
        if d == 0 or d < -1:
            raise _err(
                cfg,
                f"{what} '{name}' dimension {d} is invalid: each dimension must be >= 1, "
                "or -1 for a variable-size dimension",
            )


def _check_reshape(cfg: mc.ModelConfig, what: str, io: mc.ModelInput | mc.ModelOutput) -> None:
    if not io.HasField("reshape"):
        return
    dims, shape = list(io.dims), list(io.reshape.shape)
    _check_dims(cfg, f"{what} reshape of", io.name, shape)
    fixed_dims = math.prod(d for d in dims if d != -1)
    fixed_shape = math.prod(d for d in shape if d != -1)
    if (-1 in dims) != (-1 in shape) or fixed_dims != fixed_shape:
        raise _err(
            cfg,
            f"{what} '{io.name}' has different number of elements in 'dims' {dims} and "
            f"'reshape' {shape}",
        )


def _check_io(
    cfg: mc.ModelConfig, what: str, ios: Iterable[mc.ModelInput | mc.ModelOutput]
) -> None:
    seen: set[str] = set()
    for io in ios:
        if not io.name:
            raise _err(cfg, f"every {what} must have a name")
        if io.name in seen:
            raise _err(cfg, f"{what} '{io.name}' is specified more than once")
        seen.add(io.name)
        if io.data_type == mc.TYPE_INVALID:
            raise _err(cfg, f"{what} '{io.name}' must specify 'data_type'")
        if not io.dims and not io.HasField("reshape"):
            raise _err(cfg, f"{what} '{io.name}' must specify 'dims'")
        _check_dims(cfg, what, io.name, io.dims)
        _check_reshape(cfg, what, io)
        if io.is_shape_tensor:
            raise _err(cfg, f"{what} '{io.name}': shape tensors are not supported by modelport")


def _check_batching(cfg: mc.ModelConfig) -> None:
    if cfg.max_batch_size < 0:
        raise _err(cfg, f"'max_batch_size' must be non-negative value, got {cfg.max_batch_size}")
    if not cfg.HasField("dynamic_batching"):
        return
    db = cfg.dynamic_batching
    if cfg.max_batch_size == 0:
        raise _err(cfg, "dynamic batching requires 'max_batch_size' > 0")
    for p in db.preferred_batch_size:
        if p < 1 or p > cfg.max_batch_size:
            raise _err(
                cfg,
                f"dynamic batching preferred size {p} must be positive and not exceed "
                f"max_batch_size {cfg.max_batch_size}",
            )
    if db.priority_levels == 0:
        if db.default_priority_level != 0 or db.priority_queue_policy:
            raise _err(cfg, "priority settings need 'priority_levels' > 0")
        return
    if not 1 <= db.default_priority_level <= db.priority_levels:
        raise _err(
            cfg,
            f"default priority level {db.default_priority_level} must be in [1, "
            f"{db.priority_levels}]",
        )
    for level in db.priority_queue_policy:
        if not 1 <= level <= db.priority_levels:
            raise _err(
                cfg, f"priority queue policy for level {level} outside [1, {db.priority_levels}]"
            )


def _check_instances(cfg: mc.ModelConfig, gpu_count: int) -> None:
    for group in cfg.instance_group:
        if group.count < 1:
            raise _err(
                cfg, f"instance group '{group.name}' must have count >= 1, got {group.count}"
            )
        if group.kind == _KIND.KIND_GPU:
            if gpu_count == 0:
                raise _err(
                    cfg,
                    f"instance group '{group.name}' has kind KIND_GPU but no GPU is available "
                    "(kind: KIND_CPU, or KIND_AUTO, runs it on the CPU)",
                )
            for g in group.gpus:
                if not 0 <= g < gpu_count:
                    raise _err(
                        cfg,
                        f"instance group '{group.name}' specifies invalid gpu id {g}; "
                        f"available ids are 0..{gpu_count - 1}",
                    )
        elif group.gpus and group.kind != _KIND.KIND_GPU:
            raise _err(
                cfg,
                f"instance group '{group.name}' lists gpus but has kind {_KIND.Kind.Name(group.kind)}",
            )


def _check_warmup(cfg: mc.ModelConfig) -> None:
    inputs = {i.name: i for i in cfg.input}
    for w in cfg.model_warmup:
        if cfg.max_batch_size and w.batch_size > cfg.max_batch_size:
            raise _err(
                cfg,
                f"warmup '{w.name}' batch size {w.batch_size} exceeds max_batch_size "
                f"{cfg.max_batch_size}",
            )
        for name, spec in w.inputs.items():
            if name not in inputs:
                raise _err(cfg, f"warmup '{w.name}' sets unknown input '{name}'")
            if spec.data_type != inputs[name].data_type:
                raise _err(
                    cfg,
                    f"warmup '{w.name}' input '{name}' has data type "
                    f"{mc.DataType.Name(spec.data_type)}, the model expects "
                    f"{mc.DataType.Name(inputs[name].data_type)}",
                )
            if spec.WhichOneof("input_data_type") is None:
                raise _err(cfg, f"warmup '{w.name}' input '{name}' gives no data source")
        missing = [n for n, i in inputs.items() if not i.optional and n not in w.inputs]
        if missing:
            raise _err(cfg, f"warmup '{w.name}' is missing required input(s) {missing}")


def _check_file_names(cfg: mc.ModelConfig) -> None:
    """File names in a config stay inside the model folder (they may come from a load request)."""
    names = [("default_model_filename", cfg.default_model_filename)]
    names += [(f"output '{o.name}' label_filename", o.label_filename) for o in cfg.output]
    for w in cfg.model_warmup:
        for key, spec in w.inputs.items():
            if spec.WhichOneof("input_data_type") == "input_data_file":
                names.append((f"warmup '{w.name}' input '{key}' file", spec.input_data_file))
    for what, value in names:
        if value and ("/" in value or "\\" in value or value in (".", "..")):
            raise _err(cfg, f"{what} '{value}' must be a plain file name")


def validate_config(
    cfg: mc.ModelConfig, dir_name: str, known_backends: Iterable[str], gpu_count: int = 0
) -> None:
    """Raise ModelConfigError naming the first problem; `cfg` must be autocompleted."""
    if cfg.name != dir_name:
        raise ModelConfigError(
            f"model name '{cfg.name}' in config.pbtxt does not match the directory name "
            f"'{dir_name}'"
        )
    if cfg.HasField("sequence_batching"):
        validate_sequence_batching(cfg)
    known = set(known_backends)
    if not cfg.backend:
        if cfg.platform in OTHER_FRAMEWORKS:
            raise _err(cfg, f"platform '{cfg.platform}' ({OTHER_FRAMEWORKS[cfg.platform]}) is not "
                            "served here: export the model to ONNX (platform "
                            "'onnxruntime_onnx', model.onnx) or TorchScript ('pytorch_libtorch', "
                            "model.pt), or wrap it in a python backend (model.py)")
        if cfg.platform:
            raise _err(cfg, f"unknown platform '{cfg.platform}'")
        raise _err(
            cfg, "must specify 'backend' or 'platform' (no model.py/model.pt/model.onnx found)"
        )
    if cfg.backend not in known:
        raise _err(cfg, f"unknown backend '{cfg.backend}'; available backends: {sorted(known)}")
    is_ensemble = cfg.backend == "ensemble" or cfg.platform == "ensemble"
    if is_ensemble and cfg.backend != "ensemble":
        raise _err(cfg, f"platform 'ensemble' cannot use backend '{cfg.backend}'")
    if is_ensemble != cfg.HasField("ensemble_scheduling"):
        raise _err(
            cfg,
            "an ensemble needs 'ensemble_scheduling'"
            if is_ensemble
            else "'ensemble_scheduling' is only valid with platform 'ensemble'",
        )
    if cfg.response_cache.enable and cfg.model_transaction_policy.decoupled:
        # Triton's words (its response cache test greps for them)
        raise _err(
            cfg,
            f"Response Cache does not currently support model '{cfg.name}' with 'decoupled' "
            "transaction policy. Please disable the response cache.",
        )
    _check_batching(cfg)
    _check_io(cfg, "input", cfg.input)
    _check_io(cfg, "output", cfg.output)
    if not is_ensemble:
        _check_instances(cfg, gpu_count)
    _check_warmup(cfg)
    _check_file_names(cfg)
    if cfg.version_policy.WhichOneof("policy_choice") == "specific":
        if not cfg.version_policy.specific.versions:
            raise _err(cfg, "version_policy 'specific' lists no versions")
