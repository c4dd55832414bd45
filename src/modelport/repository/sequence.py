"""Triton's `sequence_batching` for stateful models: config checks and control tensors.

The scheduling itself (slots, backlog, idle release) is serving/sequence_batcher.py; this
module reads the config block and builds the control input tensors the server fills in for
the model on every request: START / END / READY (int32, fp32 or bool `*_false_true` pairs)
and CORRID (the correlation id as TYPE_UINT64 / INT64 / UINT32 / INT32 / STRING). Each is
shaped [1], plus the batch dimension ([1, 1]) when max_batch_size > 0, as in Triton.

Supported: strategies `direct` (the default; max_queue_delay_microseconds with
minimum_slot_utilization) and `oldest` (max_candidate_sequences, preferred_batch_size,
max_queue_delay_microseconds, preserve_ordering), max_sequence_idle_microseconds,
control_input. Refused at load: implicit state (`state`), `iterative_sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from modelport.repository.errors import InvalidArgument, ModelConfigError
from modelport.serving.sequence_batcher import SeqEntry, SequenceBatcherConfig

_SB = mc.ModelSequenceBatching
_K = _SB.Control
DEFAULT_IDLE_US = 1_000_000  # Triton's default max_sequence_idle_microseconds
_CORRID_TYPES = {
    mc.TYPE_UINT64: np.uint64,
    mc.TYPE_INT64: np.int64,
    mc.TYPE_UINT32: np.uint32,
    mc.TYPE_INT32: np.int32,
    mc.TYPE_STRING: np.object_,
}
_BOOL_KINDS = (_K.CONTROL_SEQUENCE_START, _K.CONTROL_SEQUENCE_END, _K.CONTROL_SEQUENCE_READY)


def is_sequence(cfg: mc.ModelConfig) -> bool:
    return cfg.HasField("sequence_batching")


def _err(cfg: mc.ModelConfig, message: str) -> ModelConfigError:
    return ModelConfigError(f"model '{cfg.name}': {message}")


def validate_sequence_batching(cfg: mc.ModelConfig) -> None:
    """Raise ModelConfigError for what modelport does not run (or a malformed block)."""
    sb = cfg.sequence_batching
    if sb.state:
        raise _err(
            cfg,
            "sequence_batching 'state' (implicit state management) is not supported by "
            "modelport; keep the state in the model (e.g. per CORRID) instead",
        )
    if sb.iterative_sequence:
        raise _err(cfg, "sequence_batching 'iterative_sequence' is not supported by modelport")
    if sb.WhichOneof("strategy_choice") == "oldest":
        o = sb.oldest
        if o.max_candidate_sequences < 1:
            raise _err(cfg, "sequence_batching 'oldest' needs 'max_candidate_sequences' >= 1")
        for p in o.preferred_batch_size:
            if p < 1 or p > max(cfg.max_batch_size, 1):
                raise _err(
                    cfg,
                    f"sequence_batching 'oldest' preferred batch size {p} must be positive "
                    f"and not exceed max_batch_size {cfg.max_batch_size}",
                )
    inputs = {i.name for i in cfg.input}
    seen_names: set[str] = set()
    seen_kinds: set[int] = set()
    for ci in sb.control_input:
        if not ci.name:
            raise _err(cfg, "every sequence_batching control_input must have a name")
        if ci.name in seen_names:
            raise _err(cfg, f"sequence batching control input '{ci.name}' is given twice")
        if ci.name in inputs:
            raise _err(
                cfg,
                f"sequence batching control input '{ci.name}' is also a model input; control "
                "inputs are filled by the server and must not be listed under 'input'",
            )
        seen_names.add(ci.name)
        if len(ci.control) != 1:
            raise _err(
                cfg,
                f"sequence batching control input '{ci.name}' must have exactly one control, "
                f"has {len(ci.control)}",
            )
        c = ci.control[0]
        kind = _K.Kind.Name(c.kind)
        if c.kind in seen_kinds:
            raise _err(cfg, f"sequence batching specifies multiple {kind} tensors")
        seen_kinds.add(c.kind)
        pairs = [
            n
            for n in ("int32_false_true", "fp32_false_true", "bool_false_true")
            if len(getattr(c, n))
        ]
        if c.kind in _BOOL_KINDS:
            if len(pairs) != 1 or len(getattr(c, pairs[0])) != 2:
                raise _err(
                    cfg,
                    f"sequence batching control '{kind}' of input '{ci.name}' must specify "
                    "exactly one of 'int32_false_true', 'fp32_false_true' or "
                    "'bool_false_true', with two values (false, true)",
                )
        elif c.kind == _K.CONTROL_SEQUENCE_CORRID:
            if pairs:
                raise _err(
                    cfg,
                    f"sequence batching control '{kind}' of input '{ci.name}' must not specify "
                    f"'{pairs[0]}'",
                )
            if c.data_type not in _CORRID_TYPES:
                raise _err(
                    cfg,
                    f"unexpected control data type {mc.DataType.Name(c.data_type)} for {kind} "
                    f"input '{ci.name}', expected TYPE_UINT64, TYPE_INT64, TYPE_UINT32, "
                    "TYPE_INT32, or TYPE_STRING",
                )
        else:
            raise _err(cfg, f"sequence batching control '{kind}' is not supported by modelport")


def batcher_config(cfg: mc.ModelConfig) -> SequenceBatcherConfig:
    sb = cfg.sequence_batching
    idle_us = sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US
    if sb.WhichOneof("strategy_choice") == "oldest":
        o = sb.oldest
        return SequenceBatcherConfig(
            slots_per_instance=o.max_candidate_sequences,
            idle_timeout_s=idle_us / 1e6,
            oldest=True,
            max_batch_size=max(cfg.max_batch_size, 1),
            max_queue_delay_s=o.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(o.preferred_batch_size),
            preserve_ordering=o.preserve_ordering,
        )
    return SequenceBatcherConfig(
        slots_per_instance=max(cfg.max_batch_size, 1),
        idle_timeout_s=idle_us / 1e6,
        max_queue_delay_s=sb.direct.max_queue_delay_microseconds / 1e6,
        minimum_slot_utilization=sb.direct.minimum_slot_utilization,
    )


@dataclass(frozen=True)
class _Control:
    name: str
    kind: int
    wire: str
    values: tuple  # (false, true) for START / END / READY
    dtype: type


class ControlInputs:
    """The control tensors of one request (or of a null request in an empty slot)."""

    def __init__(self, cfg: mc.ModelConfig) -> None:
        from modelport.repository.tensors import wire_of_config

        self.batched = cfg.max_batch_size > 0
        self._controls: list[_Control] = []
        self.corrid_type: int | None = None
        for ci in cfg.sequence_batching.control_input:
            c = ci.control[0]
            if c.kind == _K.CONTROL_SEQUENCE_CORRID:
                self.corrid_type = c.data_type
                wire = wire_of_config(mc.DataType.Name(c.data_type))
                self._controls.append(
                    _Control(ci.name, c.kind, wire, (), _CORRID_TYPES[c.data_type])
                )
            elif len(c.int32_false_true):
                self._controls.append(
                    _Control(ci.name, c.kind, "INT32", tuple(c.int32_false_true), np.int32)
                )
            elif len(c.fp32_false_true):
                self._controls.append(
                    _Control(ci.name, c.kind, "FP32", tuple(c.fp32_false_true), np.float32)
                )
            else:
                self._controls.append(
                    _Control(ci.name, c.kind, "BOOL", tuple(c.bool_false_true), np.bool_)
                )

    def check_corrid(self, model: str, corrid: int | str) -> None:
        """A string id for an integer CORRID control (or the reverse) cannot be passed on."""
        if self.corrid_type is None:
            return
        if (self.corrid_type == mc.TYPE_STRING) != isinstance(corrid, str):
            want = "string" if self.corrid_type == mc.TYPE_STRING else "unsigned integer"
            raise InvalidArgument(
                f"inference request to model '{model}' has correlation ID {corrid!r} but the "
                f"model's CONTROL_SEQUENCE_CORRID input expects a {want} ID "
                f"({mc.DataType.Name(self.corrid_type)})"
            )

    def tensors(self, e: SeqEntry) -> dict:
        from modelport.repository.tensors import InferTensor

        shape = (1, 1) if self.batched else (1,)
        out = {}
        for c in self._controls:
            if c.kind == _K.CONTROL_SEQUENCE_CORRID:
                if c.dtype is np.object_:
                    v = str(e.corrid).encode() if e.ready else b""
                    arr = np.full(shape, v, dtype=np.object_)
                else:
                    v = int(e.corrid) if e.ready and not isinstance(e.corrid, str) else 0
                    arr = np.full(shape, v % (2 ** (8 * np.dtype(c.dtype).itemsize)), np.uint64)
                    arr = arr.astype(c.dtype)  # wraps like Triton's byte copy
            else:
                flag = {
                    _K.CONTROL_SEQUENCE_START: e.start,
                    _K.CONTROL_SEQUENCE_END: e.end,
                    _K.CONTROL_SEQUENCE_READY: e.ready,
                }[c.kind]
                arr = np.full(shape, c.values[1 if (flag and e.ready) else 0], dtype=c.dtype)
            out[c.name] = InferTensor(c.name, c.wire, arr)
        return out


__all__ = [
    "ControlInputs",
    "DEFAULT_IDLE_US",
    "batcher_config",
    "is_sequence",
    "validate_sequence_batching",
]
